"""Small helpers shared by the extraction tests."""

from __future__ import annotations

from typing import Any

import numpy as np

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
        padding_side=padding_side, adapter=getattr(loaded, "adapter", None),
    )


SHORT = "Classify the image. Options: {options}."
LONG = "Please classify the image shown in this scan. Options: {options}. Answer with one option only."


def check_batch_invariance(loaded: Any, stage_map: Any, images: list[Any]) -> Features:
    """Seven images, prompts of two lengths: batch 1 vs batch 7, shuffled, right-padded must give
    the same features and answer scores; the last decoder layer's last token must tell prompts
    apart. Returns the batch-1 features."""
    from pytest_mllmprobe.prompts import build_prompt

    # prompts of different lengths: the batch of 7 is padded, the batches of 1 are not
    prompts = [build_prompt(loaded.processor, CLASSES, LONG if i % 2 else SHORT) for i in range(7)]
    alone = run_extract(loaded, stage_map, images, prompts, batch_size=1)
    together = run_extract(loaded, stage_map, images, prompts, batch_size=7)
    order = [6, 2, 4, 0, 5, 1, 3]
    shuffled = run_extract(loaded, stage_map, [images[i] for i in order], [prompts[i] for i in order], batch_size=7)
    right = run_extract(loaded, stage_map, images, prompts, batch_size=7, padding_side="right")
    assert set(alone.loci) == set(stage_map.loci) - {"answer"}
    for name, reference in alone.loci.items():
        assert reference.shape == (7, reference.shape[1])
        np.testing.assert_allclose(together.loci[name], reference, rtol=1e-4, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(shuffled.loci[name], reference[order], rtol=1e-4, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(right.loci[name], reference, rtol=1e-4, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(together.answer_scores, alone.answer_scores, rtol=1e-4, atol=1e-5)
    # the prompt really matters for the language-model readouts
    last = f"llm.{len(stage_map.llm_layers) - 1}.last"
    assert not np.allclose(alone.loci[last][0], alone.loci[last][1], atol=1e-3)
    return alone


def hooks_left(model: Any) -> int:
    """Our pooling hooks still registered (transformers registers a few of its own)."""
    return sum(
        1 for m in model.modules() for hook in m._forward_hooks.values()
        if getattr(hook, "__qualname__", "").startswith("PoolingHooks.")
    )
