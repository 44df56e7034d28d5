"""Planted faults: copies of the trained demo model with one stage damaged on purpose."""

from __future__ import annotations

from pathlib import Path

from pytest_mllmprobe.demo import DEMO_MODEL
from pytest_mllmprobe.demo.synth import CLASSES


def _load():
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoModelForImageTextToText.from_pretrained(DEMO_MODEL), AutoProcessor.from_pretrained(DEMO_MODEL)


def rank1_connector(model, processor) -> None:
    """The projector's output layer keeps only its top singular direction."""
    import torch

    weight = model.model.multi_modal_projector.linear_2.weight.data
    u, s, vh = torch.linalg.svd(weight)
    weight.copy_(s[0] * torch.outer(u[:, 0], vh[0]))


def permuted_answer_rows(model, processor) -> None:
    """The LM-head rows of the class-name tokens are rotated: the model says the wrong name."""
    ids = [processor.tokenizer.convert_tokens_to_ids(name) for name in CLASSES]
    weight = model.lm_head.weight.data
    weight[ids] = weight[ids[1:] + ids[:1]].clone()


def corrupted_middle_layer(model, processor) -> None:
    """One weight of the middle decoder layer's MLP overflows to inf (a corrupted shard)."""
    layers = model.model.language_model.layers
    layers[len(layers) // 2].mlp.down_proj.weight.data[0, 0] = float("inf")


FAULTS = {
    "rank1-connector": rank1_connector,
    "permuted-answer": permuted_answer_rows,
    "corrupted-layer": corrupted_middle_layer,
}


def build_faulty(name: str, root: Path) -> Path:
    """Save the demo model with fault ``name`` planted into ``root/name``."""
    model, processor = _load()
    FAULTS[name](model, processor)
    target = root / name
    model.save_pretrained(target)
    processor.save_pretrained(target)
    return target
