"""Real PEFT adapters, saved by ``peft`` itself, over tiny bases saved with ``save_pretrained``.

:func:`save_base` writes a base model folder (the bundled demo LLaVA, or a tiny family of
:mod:`tests.tiny_families`); :func:`save_adapter` loads it with the Auto classes as a user does,
wraps it with ``get_peft_model(base, LoraConfig(...))``, lets ``plant`` set the adapter's weights
and saves the adapter with ``save_pretrained`` (``adapter_config.json`` names the base folder).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pytest_mllmprobe.demo import DEMO_MODEL

#: the language model's attention projections (not the vision tower's, which also has q_proj/v_proj)
LLM_ATTENTION = r".*language_model.*\.(q_proj|v_proj)"


def save_base(path: Path, family: str = "llava") -> Path:
    """The demo LLaVA copied to ``path``, or a tiny random ``family`` model saved there."""
    if family == "llava":
        shutil.copytree(DEMO_MODEL, path)
        return path
    from .tiny_families import save_processor, tiny_family

    model, processor = tiny_family(family, seed=0)
    model.save_pretrained(path)
    save_processor(processor, path)
    return path


def load_base(base: Path) -> Any:
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(base)


def save_adapter(path: Path, base: Path, plant: Callable[[Any], None] | None = None, **lora: Any) -> Path:
    """``get_peft_model(base, LoraConfig(**lora))`` saved by peft into ``path``; ``plant(peft_model)``
    may set its weights first (``init_lora_weights=False`` gives random, non-zero updates)."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(load_base(base), LoraConfig(**lora))
    if plant is not None:
        with torch.no_grad():
            plant(model)
    model.save_pretrained(path)
    return path


def collapse_connector(model: Any) -> None:
    """A full-rank LoRA on the projector's ``linear_2`` whose update leaves only the top singular
    direction of its weight: ``W + B A = s0 u0 v0^T`` (A = identity, B = rank-1 part minus W)."""
    import torch

    layer = model.base_model.model.model.multi_modal_projector.linear_2
    weight = layer.base_layer.weight
    u, s, vh = torch.linalg.svd(weight)
    layer.lora_A["default"].weight.copy_(torch.eye(weight.shape[1]))
    layer.lora_B["default"].weight.copy_((s[0] * torch.outer(u[:, 0], vh[0]) - weight) / layer.scaling["default"])


def merge_by_hand(adapter: Path, base: Path, target: Path) -> Path:
    """What a user does without this plugin: merge the adapter and save a full copy."""
    from peft import PeftModel
    from transformers import AutoProcessor

    merged = PeftModel.from_pretrained(load_base(base), adapter).merge_and_unload()
    merged.save_pretrained(target)
    try:
        AutoProcessor.from_pretrained(base).save_pretrained(target)
    except (ImportError, OSError, ValueError, TypeError):  # a processor with a video slot, no torchvision
        for name in base.iterdir():
            if name.suffix in (".json", ".jinja") and name.name not in ("config.json", "model.safetensors.index.json",
                                                                      "generation_config.json"):
                shutil.copy(name, target / name.name)
    return target
