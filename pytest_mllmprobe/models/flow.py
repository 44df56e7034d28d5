"""The stage map proven by data flow, not by names: one image, a few forwards, before extraction.

Detection and overrides name modules; only the forward shows what feeds what. On the loaded
model, with one image of the data:

1. noise added to the output of the vision block the connector reads must change the
   connector's inputs (the connector is fed by the vision encoder; a dead projection whose
   output stays zero is the probes' finding, not a wrong map);
2. noise added to the connector's output must change the language model's states at the
   image-token positions of its entry layer (the last token's, for cross-attention models);
3. the connector emits as many tokens as the prompt holds image tokens (families that re-pack
   tiles, such as LLaVA-NeXT, are exempt) at the language model's width.

A map that fails is a usage error naming the check and the modules that pass it; a module that
fails is never suggested.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from ..errors import ConfigError
from ..inputs import first_tensor, no_cache
from .families import family

#: relative change below which an output counts as unchanged
TOLERANCE = 1e-5
#: modules tried as the connector when the chosen one fails
MAX_CANDIDATES = 6


def _add_noise(output: Any, seed: int = 0) -> None:
    """Gaussian noise (of the output's own scale) added IN PLACE to a module output's main tensor.

    In place, because transformers records ``hidden_states`` with hooks of its own that may run
    before this one: the recorded tensor is the same object, so every reader sees the noise.
    """
    import torch

    tensor = first_tensor(output)
    if tensor is None or not tensor.is_floating_point():
        return
    generator = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(tensor.shape, generator=generator).to(tensor.device, tensor.dtype)
    tensor.add_(noise * (tensor.detach().float().std().clamp(min=1e-3).item() + 1.0))


def _changed(before: Any, after: Any) -> bool:
    if before is None or after is None:
        return False
    if before.shape != after.shape:
        return True
    scale = before.detach().float().abs().max().item() + 1e-12
    return (after.detach().float() - before.detach().float()).abs().max().item() > TOLERANCE * scale


def _input_tensors(args: Any, kwargs: dict[str, Any]) -> Any:
    """The floating-point tensors a module is called with, flattened into one vector."""
    import torch

    found = [value for value in (*args, *kwargs.values())
             if isinstance(value, torch.Tensor) and value.is_floating_point()]
    return torch.cat([value.detach().float().reshape(-1) for value in found]) if found else None


@contextlib.contextmanager
def _hooks(model: Any, capture: list[str], perturb: str | None, store: dict[str, Any],
           inputs_of: tuple[str, ...] = ()) -> Iterator[None]:
    """Capture the outputs of ``capture`` (and the inputs of ``inputs_of``, under ``path + "<"``),
    with noise added to the output of ``perturb``."""
    handles = []

    def inputs_hook(path: str) -> Any:
        def hook(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
            if path + "<" not in store:
                store[path + "<"] = _input_tensors(args, kwargs)

        return hook

    def capturing(path: str) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:
            tensor = first_tensor(output)
            if tensor is not None and path not in store:
                store[path] = tensor.detach().float().clone()

        return hook

    def perturbing(module: Any, args: Any, output: Any) -> None:
        _add_noise(output)

    try:
        if perturb is not None:
            handles.append(model.get_submodule(perturb).register_forward_hook(perturbing))
        for path in capture:
            handles.append(model.get_submodule(path).register_forward_hook(capturing(path)))
        for path in inputs_of:
            handles.append(model.get_submodule(path).register_forward_pre_hook(inputs_hook(path), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


class _Stop(BaseException):
    """Ends a check's forward before the language model (a selection that never runs it)."""


def _run(model: Any, inputs: dict[str, Any], capture: list[str], perturb: str | None = None,
         inputs_of: tuple[str, ...] = (), stop_before: str | None = None) -> dict[str, Any]:
    import torch

    def stop(*_: Any) -> None:
        raise _Stop

    store: dict[str, Any] = {}
    handle = model.get_submodule(stop_before).register_forward_pre_hook(stop, prepend=True) if stop_before else None
    try:
        with _hooks(model, capture, perturb, store, tuple(inputs_of)), torch.inference_mode():
            model(**inputs, **no_cache(model))
    except _Stop:
        pass
    finally:
        if handle is not None:
            handle.remove()
    return store


def check_data_flow(model: Any, stage_map: Any, inputs: dict[str, Any], language_model: bool = True) -> None:
    """Raise :class:`ConfigError` unless vision -> connector -> language model is the data flow.

    ``inputs``: the forward's arguments for one image (position ids included). Without
    ``language_model`` (a selection that reads no decoder layer) the forwards stop before the
    first decoder layer: checks 1 and 3 only.
    """
    vision = stage_map.vision_layers[max(stage_map.consumed_vision_layers)]
    connector = stage_map.connector
    entry = stage_map.llm_layers[stage_map.llm_entry]
    read = _reader(stage_map, inputs)
    stop = None if language_model else stage_map.llm_layers[0]
    base = _run(model, inputs, [connector, entry], inputs_of=(connector,), stop_before=stop)
    if connector not in base:
        raise ConfigError(
            f"stage map check: the connector {connector!r} did not run during the forward pass; "
            + _suggestion(model, stage_map, inputs, read)
        )
    # what the connector is fed, not what it emits: a dead (all-zero) projection is a finding of
    # the probes, not a wrong map
    from_vision = _run(model, inputs, [], perturb=vision, inputs_of=(connector,), stop_before=stop)
    if not _changed(base[connector + "<"], from_vision.get(connector + "<")):
        raise ConfigError(
            f"stage map check: the connector {connector!r} is not fed by the vision encoder: noise on the "
            f"output of {vision} (the vision block it should read) leaves its inputs unchanged. "
            + _suggestion(model, stage_map, inputs, read)
        )
    into_llm = _run(model, inputs, [entry], perturb=connector) if language_model else None
    if into_llm is not None and not _changed(read(base.get(entry)), read(into_llm.get(entry))):
        where = "last-token state" if stage_map.llm_readouts == ("last",) else "states at the image tokens"
        raise ConfigError(
            f"stage map check: the language model does not read the connector {connector!r}: noise on its "
            f"output leaves the {where} of {entry} unchanged. " + _suggestion(model, stage_map, inputs, read)
        )
    _check_token_count(model, stage_map, inputs, base[connector], read)


def _reader(stage_map: Any, inputs: dict[str, Any]) -> Any:
    """What of the entry layer's output counts: the image-token rows, or the last token's."""
    import torch

    if "image" in stage_map.llm_readouts and stage_map.image_token_id is not None:
        mask = inputs["input_ids"] == stage_map.image_token_id

        def image_rows(hidden: Any) -> Any:
            return None if hidden is None else hidden[mask.to(hidden.device)]

        return image_rows

    def last_row(hidden: Any) -> Any:
        return None if hidden is None else hidden[torch.arange(hidden.shape[0]), -1]

    return last_row


def _check_token_count(model: Any, stage_map: Any, inputs: dict[str, Any], output: Any, read: Any) -> None:
    if "image" not in stage_map.llm_readouts or stage_map.image_token_id is None or family(stage_map.family).repacks:
        return
    width = model.get_input_embeddings().weight.shape[-1] if hasattr(model, "get_input_embeddings") else None
    tokens = int(output.numel() // output.shape[-1])
    image_tokens = int((inputs["input_ids"] == stage_map.image_token_id).sum())
    if (width is not None and output.shape[-1] != width) or tokens != image_tokens:
        raise ConfigError(
            f"stage map check: the connector {stage_map.connector!r} emits {tokens} tokens of width "
            f"{output.shape[-1]}, but the language model receives {image_tokens} image tokens of width {width}: "
            "it is not what the language model reads at the image positions. "
            + _suggestion(model, stage_map, inputs, read)
        )


def _suggestion(model: Any, stage_map: Any, inputs: dict[str, Any], read: Any) -> str:
    passing = connector_candidates(model, stage_map, inputs, read)
    if passing:
        return (f"Modules that pass: {', '.join(passing)}; e.g. --mllm-stages connector={passing[0]} "
                "(see docs/architectures.md)")
    return ("No module between the vision encoder and the language model passes; name the stages with "
            "--mllm-stages vision=...,connector=...,llm=... or an adapter (docs/architectures.md)")


def connector_candidates(model: Any, stage_map: Any, inputs: dict[str, Any], read: Any) -> list[str]:
    """Modules outside both layer lists whose output the vision block changes and whose own
    change reaches the language model: connectors that pass the check (shallowest first)."""
    vision = stage_map.vision_layers[max(stage_map.consumed_vision_layers)]
    entry = stage_map.llm_layers[stage_map.llm_entry]
    lists = {path.rpartition(".")[0] for path in (*stage_map.vision_layers, *stage_map.llm_layers)}
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    paths = [
        path for path, module in model.named_modules()
        if path and module is not embeddings and any(True for _ in module.parameters())
        and not any(path == root or path.startswith(root + ".") for root in lists)
        and not any(root.startswith(path + ".") for root in lists)  # not an ancestor of a stage
    ]
    base = _run(model, inputs, [entry], inputs_of=tuple(paths))
    moved = _run(model, inputs, [], perturb=vision, inputs_of=tuple(paths))
    fed = [p for p in paths if _changed(base.get(p + "<"), moved.get(p + "<"))]
    fed.sort(key=lambda p: p.count("."))
    passing = []
    for path in fed[:MAX_CANDIDATES]:
        after = _run(model, inputs, [entry], perturb=path)
        if _changed(read(base.get(entry)), read(after.get(entry))):
            passing.append(path)
    return [p for p in passing if not any(p.startswith(q + ".") for q in passing)]
