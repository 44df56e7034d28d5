"""How the engine loads, feeds and reads one model: the one way in.

A :class:`ModelAdapter` says

* ``structure()``: the model's module tree (on the ``meta`` device: no weights read), for stage
  detection and test names at collection time;
* ``load(device, dtype, device_map)``: ``(model, processor)`` with real weights, eval mode; the
  processor also carries the tokenizer and the chat template;
* ``encode(processor, images, prompts, device, dtype, padding_side)``: the forward's keyword
  arguments for a batch (extra inputs such as Hulu-Med's ``modals`` / ``grid_sizes`` included);
* ``positions(inputs)``: extra forward arguments derived from the inputs (position ids);
* ``segments(stage_map, model, inputs)``: how a flattened or tiled vision / connector output
  splits into images (:class:`~pytest_mllmprobe.models.families.Segments`);
* ``stages``: module paths that replace detection (``vision``, ``connector``, ``llm``).

Every built-in model goes through this class: transformers families (``AutoModelForImageTextToText``
and the registry of :mod:`.families`), checkpoints of the original LLaVA code, and causal-LM remote
code (Hulu-Med). A model none of them fits is described by a subclass and named with
``--mllm-model module:function``, the function returning the adapter (docs/architectures.md).
"""

from __future__ import annotations

from typing import Any, ClassVar

from .families import Segments, family
from .load import ModelSpec

class ModelAdapter:
    """The transformers way: Auto classes, the model's processor, the family registry.

    ``source`` is a folder or hub id (what ``from_pretrained`` takes); subclasses override what
    their model does differently and keep the rest.
    """

    #: module paths that replace detection (``--mllm-stages`` and threshold files still win)
    stages: ClassVar[dict[str, str]] = {}
    #: whether a forward may be ended early, by an exception from the hook of the last locus a
    #: selection of tests needs (:mod:`pytest_mllmprobe.selection`); ``False`` for a model whose
    #: forward must run to the end (it then does, with a note)
    stops_early: ClassVar[bool] = True

    def __init__(self, source: str = "", *, trust_remote_code: bool = False) -> None:
        self.source = str(source)
        self.trust_remote_code = trust_remote_code

    # -- what the model is ----------------------------------------------------------------
    def config(self) -> Any:
        """The model's config (clear messages for missing files and remote code without the opt-in)."""
        from .load import load_config

        return load_config(ModelSpec(self.source, self.source), self.trust_remote_code)

    def structure(self) -> Any:
        from .load import load_structure

        return load_structure(ModelSpec(self.source, self.source), trust_remote_code=self.trust_remote_code)

    def load(self, device: str = "auto", dtype: str = "auto", device_map: str | None = None) -> tuple[Any, Any]:
        from .load import load_model

        loaded = load_model(ModelSpec(self.source, self.source), device=device, dtype=dtype,
                            trust_remote_code=self.trust_remote_code, device_map=device_map)
        return loaded.model, loaded.processor

    # -- how to feed it -------------------------------------------------------------------
    def encode(self, processor: Any, images: list[Any], prompts: list[str], device: Any, dtype: Any,
               padding_side: str = "left", *, family_name: str = "") -> dict[str, Any]:
        """The processor's output for a batch, tensors on ``device`` (floats in ``dtype``)."""
        from ..inputs import prepare_inputs

        quirks = family(family_name)
        inputs = prepare_inputs(processor, images, prompts, device, dtype, padding_side, nested=quirks.nested_images)
        return quirks.adjust(inputs) if quirks.adjust is not None else inputs

    def positions(self, inputs: dict[str, Any], *, family_name: str = "") -> dict[str, Any]:
        """Position ids rebuilt from the attention mask, for 1-D rotary families (exact under padding)."""
        if not family(family_name).mask_positions:
            return {}
        return {"position_ids": (inputs["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)}

    def segments(self, stage_map: Any, model: Any, inputs: dict[str, Any]) -> Segments:
        fn = family(stage_map.family).segments
        return fn(stage_map, model, inputs) if fn is not None else Segments()
