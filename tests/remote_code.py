"""A tiny model that ships its own code (``trust_remote_code``), in the style of Hulu-Med.

Its stages sit under names the detector does not know (``eye``, ``bridge``, ``brain``): a CLIP
vision tower, a LLaVA projector and a Llama decoder from transformers, wired together by a
forward written here. :func:`save_remote_model` writes the code files, the weights and a LLaVA
processor into one folder, as a hub repo with custom code would hold them.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

CONFIGURATION = '''
from transformers import LlavaConfig


class HuluTinyConfig(LlavaConfig):
    model_type = "hulu_tiny"
'''

MODELING = '''
import torch
from transformers import LlavaForConditionalGeneration, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_hulu_tiny import HuluTinyConfig


class HuluTinyForConditionalGeneration(PreTrainedModel):
    config_class = HuluTinyConfig
    base_model_prefix = ""
    _no_split_modules = []

    def __init__(self, config):
        super().__init__(config)
        parts = LlavaForConditionalGeneration(config)
        self.eye = parts.model.vision_tower            # CLIP vision transformer
        self.bridge = parts.model.multi_modal_projector
        self.brain = parts.model.language_model        # Llama decoder
        self.head = parts.lm_head
        self.post_init()

    def get_input_embeddings(self):
        return self.brain.embed_tokens

    def forward(self, input_ids, attention_mask=None, pixel_values=None, position_ids=None,
                logits_to_keep=0, **kwargs):
        embeds = self.brain.embed_tokens(input_ids)
        if pixel_values is not None:
            seen = self.eye(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
            image = self.bridge(seen).reshape(-1, embeds.shape[-1]).to(embeds.dtype)
            mask = (input_ids == self.config.image_token_id).unsqueeze(-1).expand_as(embeds)
            embeds = embeds.masked_scatter(mask, image)
        hidden = self.brain(inputs_embeds=embeds, attention_mask=attention_mask,
                            position_ids=position_ids).last_hidden_state
        keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
        return CausalLMOutputWithPast(logits=self.head(hidden[:, keep]))
'''

AUTO_MAP = {
    "AutoConfig": "configuration_hulu_tiny.HuluTinyConfig",
    "AutoModelForImageTextToText": "modeling_hulu_tiny.HuluTinyForConditionalGeneration",
}


def save_remote_model(path: Path, seed: int = 0) -> Path:
    """Write the custom code, random weights and a LLaVA processor into ``path``."""
    import torch

    from pytest_mllmprobe.demo.tiny import tiny_llava

    path.mkdir(parents=True, exist_ok=True)
    (path / "configuration_hulu_tiny.py").write_text(CONFIGURATION)
    (path / "modeling_hulu_tiny.py").write_text(MODELING)
    llava, processor = tiny_llava("llava", seed=seed)
    package = f"hulu_tiny_{seed}"  # import the written code the way transformers will
    spec = importlib.util.spec_from_file_location(package, path / "modeling_hulu_tiny.py",
                                                  submodule_search_locations=[])
    sys.modules[package] = importlib.util.module_from_spec(spec)
    config_spec = importlib.util.spec_from_file_location(f"{package}.configuration_hulu_tiny",
                                                         path / "configuration_hulu_tiny.py")
    config_module = importlib.util.module_from_spec(config_spec)
    sys.modules[config_spec.name] = config_module
    config_spec.loader.exec_module(config_module)
    modeling_spec = importlib.util.spec_from_file_location(f"{package}.modeling_hulu_tiny",
                                                           path / "modeling_hulu_tiny.py")
    modeling = importlib.util.module_from_spec(modeling_spec)
    sys.modules[modeling_spec.name] = modeling
    modeling_spec.loader.exec_module(modeling)
    config = config_module.HuluTinyConfig(**llava.config.to_dict())
    config.auto_map = AUTO_MAP
    torch.manual_seed(seed)
    model = modeling.HuluTinyForConditionalGeneration(config).eval()
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def expected_modules() -> dict[str, str]:
    return {"vision": "eye.encoder.layers", "connector": "bridge", "llm": "brain.layers"}


__all__ = ["save_remote_model", "expected_modules", "AUTO_MAP"]

