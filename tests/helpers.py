"""Small helpers shared by the extraction tests."""

from __future__ import annotations

from typing import Any

from pytest_mllmprobe.answer import class_continuations
from pytest_mllmprobe.extract import Features, extract

CLASSES = ["normal", "benign", "malignant"]


def run_extract(loaded: Any, stage_map: Any, images: list[Any], prompts: list[str], batch_size: int,
                padding_side: str = "left", names: list[str] = CLASSES) -> Features:
    """``extract`` over in-memory images, the answer scored on ``names``."""
    continuations = class_continuations(loaded.processor.tokenizer, prompts[0], names)
    return extract(
        loaded.model, loaded.processor, stage_map, lambda idx: [images[i] for i in idx], prompts,
        continuations, batch_size=batch_size, device=loaded.device, dtype=loaded.dtype,
        padding_side=padding_side,
    )
