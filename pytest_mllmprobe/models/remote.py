"""Vision-language models that ship their own code as a causal LM (Hulu-Med style).

Hulu-Med's checkpoints map only ``AutoModelForCausalLM`` in their ``auto_map``: the vision encoder
and the projector live inside the decoder module (``model.vision_encoder``, ``model.mm_projector``
beside ``model.layers``), the forward takes extra inputs (``grid_sizes``, ``merge_sizes``,
``modals``), the vision encoder turns the whole batch into one flat ``[sum of patches, D]``
sequence, and the processor reads one prompt per call. This adapter loads such a model with
``AutoModelForCausalLM`` + ``AutoProcessor`` (``--mllm-trust-remote-code`` required), runs the
processor once per image and pads the prompts itself, and splits the flat outputs per image from
the grid inputs (``t * h * w`` patches per image in the vision blocks, ``/ merge**2`` after the
merge). Stage detection is the usual one; the language model's layers are never looked for
inside the vision encoder.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .adapter import ModelAdapter
from .families import Segments

#: ``auto_map`` entries of classes that already read images (loaded the transformers way)
IMAGE_CLASSES = ("AutoModelForImageTextToText", "AutoModelForVision2Seq")


def is_remote_causal_lm(raw: dict[str, Any]) -> bool:
    auto_map = raw.get("auto_map") or {}
    return isinstance(auto_map, dict) and "AutoModelForCausalLM" in auto_map and not any(
        key in auto_map for key in IMAGE_CLASSES
    )


class RemoteCausalLMAdapter(ModelAdapter):
    """Causal-LM remote code with images inside (Hulu-Med): ``AutoModelForCausalLM``."""

    def structure(self) -> Any:
        import torch
        from transformers import AutoModelForCausalLM

        config = self.config()
        try:
            with torch.device("meta"):
                return AutoModelForCausalLM.from_config(config, trust_remote_code=self.trust_remote_code)
        except (ValueError, TypeError, ImportError, AttributeError) as exc:
            raise ConfigError(
                f"--mllm-model {self.source!r}: its own code (auto_map AutoModelForCausalLM) cannot build "
                f"the model: {type(exc).__name__}: {exc}"
            ) from exc

    def load(self, device: str = "auto", dtype: str = "auto", device_map: str | None = None) -> tuple[Any, Any]:
        from transformers import AutoModelForCausalLM, AutoProcessor

        from .load import pick_device, pick_dtype

        self.config()  # the remote-code opt-in, with its message
        torch_device = pick_device(device)
        try:
            processor = AutoProcessor.from_pretrained(self.source, trust_remote_code=self.trust_remote_code)
        except (ImportError, OSError, ValueError, TypeError) as exc:
            raise ConfigError(
                f"--mllm-model {self.source!r}: cannot load its processor with AutoProcessor: {exc}"
            ) from exc
        try:
            model = AutoModelForCausalLM.from_pretrained(
                self.source, dtype=pick_dtype(dtype, torch_device), trust_remote_code=self.trust_remote_code,
                **({"device_map": device_map} if device_map is not None else {}),
            )
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"--mllm-model {self.source!r}: cannot load its weights with AutoModelForCausalLM: {exc}"
            ) from exc
        # Hulu-Med's token compression drops repeated video frames and asserts a batch of one;
        # a still image keeps every token either way
        if getattr(model.config, "use_token_compression", False):
            model.config.use_token_compression = False
        if device_map is None:
            model.to(torch_device)
        return model.eval(), processor

    def encode(self, processor: Any, images: list[Any], prompts: list[str], device: Any, dtype: Any,
               padding_side: str = "left", *, family_name: str = "") -> dict[str, Any]:
        """One processor call per image, then the prompts padded and the image inputs joined."""
        import torch

        parts = [processor(images=[image], text=prompt, return_tensors="pt") for image, prompt in zip(images, prompts)]
        tokenizer = getattr(processor, "tokenizer", processor)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        length = max(int(p["input_ids"].shape[-1]) for p in parts)
        merged: dict[str, Any] = {}
        for key in parts[0].keys():
            values = [p[key] for p in parts]
            if key in ("input_ids", "attention_mask"):
                rows = []
                for value in values:
                    value = value.reshape(1, -1)
                    fill = torch.full((1, length - value.shape[1]), pad if key == "input_ids" else 0, dtype=value.dtype)
                    rows.append(torch.cat([fill, value] if padding_side == "left" else [value, fill], dim=1))
                merged[key] = torch.cat(rows)
            elif isinstance(values[0], torch.Tensor):
                merged[key] = torch.cat([v if v.dim() else v.reshape(1) for v in values])
            elif isinstance(values[0], (list, tuple)):
                merged[key] = [item for value in values for item in value]
            else:
                merged[key] = values[0]
        for key, value in merged.items():
            if isinstance(value, torch.Tensor):
                merged[key] = value.to(device, dtype) if value.is_floating_point() else value.to(device)
        return merged

    def positions(self, inputs: dict[str, Any], *, family_name: str = "") -> dict[str, Any]:
        return {"position_ids": (inputs["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)}

    def segments(self, stage_map: Any, model: Any, inputs: dict[str, Any]) -> Segments:
        """Per-image token counts of the flat vision and connector outputs, from the grid inputs."""
        grid = inputs.get("grid_sizes")
        if grid is None:
            return super().segments(stage_map, model, inputs)
        merge = inputs.get("merge_sizes")
        patches = [int(n) for n in grid.prod(-1).tolist()]
        merges = [int(m) for m in merge.tolist()] if merge is not None else [1] * len(patches)
        return Segments(vision=tuple(patches), connector=tuple(n // m**2 for n, m in zip(patches, merges)), flat=True)
