"""Model inputs shared by extraction and answer scoring: the processor call, positions, flags;
and the main tensor of a module's output, which extraction and the data-flow check both read.

Both :mod:`.extract` (the one forward per batch) and :mod:`.answer` (scoring and generation)
feed the model the same way; this module is the one place that knows how.
"""

from __future__ import annotations

import inspect
from typing import Any

_TAKES_USE_CACHE: dict[type, bool] = {}


def no_cache(model: Any) -> dict[str, Any]:
    """``{"use_cache": False}`` where the model's forward takes it, else ``{}``.

    Scoring and extraction never read the KV cache; building it on every forward costs memory
    (every layer's keys and values) and raises the peak RSS. A forward that names ``use_cache``
    takes it. One that only has ``**kwargs`` takes it when its class is transformers' own (they
    route it to the language model); remote code often hands ``**kwargs`` on to a submodule
    that rejects it, so there the cache is left to the model. Decided per class, from the
    class's ``forward`` (an instance's may be wrapped, e.g. by accelerate's device hooks).
    """
    kind = type(model)
    if kind not in _TAKES_USE_CACHE:
        try:
            parameters = list(inspect.signature(kind.forward).parameters.values())
        except (AttributeError, TypeError, ValueError):
            parameters = []
        named = any(p.name == "use_cache" for p in parameters)
        routed = kind.__module__.startswith("transformers.") and any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters
        )
        _TAKES_USE_CACHE[kind] = named or routed
    return {"use_cache": False} if _TAKES_USE_CACHE[kind] else {}


def last_prompt_index(attention_mask: Any) -> Any:
    """Index of the last attended position per row: correct for left and right padding."""
    import torch

    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * (positions + 1)).argmax(dim=1)


def prepare_inputs(
    processor: Any, images: list[Any], prompts: list[str], device: Any, dtype: Any, padding_side: str = "left",
    *, nested: bool = False,
) -> dict[str, Any]:
    """Run the processor (left padding by default); move tensors to the device (floats to ``dtype``).

    ``nested`` passes the images as one list per prompt, for processors that ask for it.
    """
    import torch

    tokenizer = getattr(processor, "tokenizer", processor)
    side = getattr(tokenizer, "padding_side", None)
    try:
        tokenizer.padding_side = padding_side
        batch = processor(
            images=[[image] for image in images] if nested else images, text=prompts,
            return_tensors="pt", padding=True,
        )
    finally:
        if side is not None:
            tokenizer.padding_side = side
    moved = {}
    for key, value in batch.items():
        if key == "labels":  # training targets some processors add (PaliGemma): never a model input here
            continue
        if isinstance(value, torch.Tensor):
            value = value.to(device)
            if value.is_floating_point():
                value = value.to(dtype)
        moved[key] = value
    return moved


def first_tensor(output: Any) -> Any:
    """The main tensor of a module's output (a tensor, the first of a tuple, or a model output's
    ``last_hidden_state`` / ``hidden_states``); ``None`` when it has none."""
    import torch

    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    for key in ("last_hidden_state", "hidden_states"):
        value = getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            return value
    return None
