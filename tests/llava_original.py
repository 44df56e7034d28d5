"""A checkpoint in the layout the original LLaVA code writes (HuatuoGPT-Vision-34B, LLaVA-Med).

:func:`save_llava_original` takes a transformers LLaVA (the bundled demo by default) and writes
it as the original code would: ``config.json`` = the language model's flat config + ``mm_*`` keys
(``model_type`` ``llava_llama``, ``LlavaLlamaForCausalLM``), state-dict names
``model.embed_tokens``, ``model.layers.*``, ``model.mm_projector.0/2``,
``model.vision_tower.vision_tower.vision_model.*``, ``lm_head``; the CLIP tower and its image
processor in ``vit/clip_tiny`` (``mm_vision_tower`` relative to the checkpoint, as HuatuoGPT's),
the tokenizer at the top, no processor files. Converted back on load, it must compute what the
transformers model computes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TOWER = "./vit/clip_tiny"


def original_name(key: str) -> str | None:
    """A transformers LLaVA state-dict key as the original code names it."""
    for new, old in (
        ("model.language_model.", "model."),
        ("model.vision_tower.vision_model.", "model.vision_tower.vision_tower.vision_model."),
        ("model.vision_tower.", "model.vision_tower.vision_tower.vision_model."),  # as CLIP names it in 4.x
        ("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
        ("model.multi_modal_projector.linear_2.", "model.mm_projector.2."),
    ):
        if key.startswith(new):
            return old + key[len(new):]
    return key if key == "lm_head.weight" else None


def save_llava_original(path: Path, source: Any = None, *, tower_inside: bool = True,
                        model_type: str = "llava_llama", tokenizer: Any = None, **mm: Any) -> Path:
    """Write ``source`` (a saved transformers LLaVA folder; the demo by default) in the original layout.

    ``tower_inside=False`` leaves the tower's weights out of the checkpoint (the released
    liuhaotian checkpoints): they are read from ``mm_vision_tower``. ``mm`` overrides ``mm_*`` keys.
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from pytest_mllmprobe.demo import DEMO_MODEL

    source = DEMO_MODEL if source is None else source
    model = AutoModelForImageTextToText.from_pretrained(source)
    processor = AutoProcessor.from_pretrained(source)
    path.mkdir(parents=True, exist_ok=True)
    weights = {}
    for key, value in model.state_dict().items():
        name = original_name(key)
        if name is None or (not tower_inside and name.startswith("model.vision_tower.")):
            continue
        weights[name] = value.contiguous()
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    tower = path / TOWER
    model.model.vision_tower.save_pretrained(tower)
    processor.image_processor.save_pretrained(tower)
    config = model.config
    text = {k: v for k, v in config.text_config.to_dict().items() if k not in ("architectures", "model_type")}
    vision = config.vision_config
    text.update(
        model_type=model_type, architectures=["LlavaLlamaForCausalLM"], mm_vision_tower=TOWER,
        mm_projector_type="mlp2x_gelu", mm_hidden_size=vision.hidden_size,
        mm_vision_select_layer=config.vision_feature_layer, mm_vision_select_feature="patch",
        image_aspect_ratio="square", tokenizer_padding_side="left", use_mm_proj=True, tie_word_embeddings=False,
    )
    text.update(mm)
    (path / "config.json").write_text(json.dumps(text, indent=2))
    tokenizer = processor.tokenizer if tokenizer is None else tokenizer
    tokenizer.chat_template = processor.chat_template
    tokenizer.save_pretrained(path)
    return path
