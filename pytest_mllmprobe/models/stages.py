"""Find the vision encoder, connector and language-model stages from a model's module tree.

Detection works from structure, not from one hard-coded path per class: known attribute
names in priority order, the largest layer list inside each stage, and ``get_decoder()``.
The result is a :class:`StageMap` of module *paths*, so it can be computed on a ``meta``
model at collection time and applied to the loaded model later.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError, close_matches
from .families import FAMILIES, family as family_quirks

VISION_NAMES = ("vision_tower", "vision_model", "visual", "vision_encoder", "image_encoder")
CONNECTOR_NAMES = (
    "multi_modal_projector", "mm_projector", "connector", "projector", "aligner", "merger",
)
LANGUAGE_NAMES = ("language_model", "text_model", "llm", "decoder")

# Families whose one-dimensional rotary positions can be rebuilt from the attention mask,
# which makes left-padded rows exactly equal to unpadded ones.
MASK_POSITION_FAMILIES = tuple(name for name, quirks in FAMILIES.items() if quirks.mask_positions)


@dataclass(frozen=True)
class StageMap:
    """Where each pipeline stage lives, as dotted module paths."""

    family: str
    vision_layers: tuple[str, ...]
    connector: str
    llm_layers: tuple[str, ...]
    consumed_vision_layers: tuple[int, ...]
    vision_feature_layer: Any
    drop_cls: bool
    image_token_id: int | None
    notes: tuple[str, ...] = field(default=())
    #: language-model readouts: ``image`` (mean over image tokens) and ``last``; cross-attention
    #: models have no image tokens in the stream, so only ``last``
    llm_readouts: tuple[str, ...] = ("image", "last")
    #: the first language-model layer whose output can carry the image (0, or a cross-attention
    #: model's first cross-attention layer): where the LLM stage rules start
    llm_entry: int = 0

    @property
    def loci(self) -> tuple[str, ...]:
        """Locus names in pipeline order."""
        names = [f"vision.{i}" for i in range(len(self.vision_layers))]
        names.append("connector")
        for i in range(len(self.llm_layers)):
            names += [f"llm.{i}.{readout}" for readout in self.llm_readouts]
        names.append("answer")
        return tuple(names)

    @property
    def consumed_description(self) -> str:
        layers = ", ".join(f"vision.{i}" for i in self.consumed_vision_layers)
        return f"{layers} (vision_feature_layer={self.vision_feature_layer!r})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "vision_layers": list(self.vision_layers),
            "connector": self.connector,
            "llm_layers": list(self.llm_layers),
            "consumed_vision_layers": list(self.consumed_vision_layers),
            "vision_feature_layer": self.vision_feature_layer,
            "drop_cls": self.drop_cls,
            "image_token_id": self.image_token_id,
            "notes": list(self.notes),
            "llm_readouts": list(self.llm_readouts),
            "llm_entry": self.llm_entry,
        }


OVERRIDE_KEYS = ("vision", "connector", "llm")

NO_VISION_ENCODER = (
    "this {family!r} model ({cls}) has no vision encoder: no module named "
    + ", ".join(VISION_NAMES)
    + ". Models that feed image patches straight into the language model (e.g. fuyu) have no "
    "vision or connector stage to probe, so feature probing does not apply to them."
)


def detect_stages(
    model: Any, overrides: dict[str, str] | None = None, sources: dict[str, str] | None = None
) -> StageMap:
    """Detect the stages of a transformers vision-language model (loaded or on ``meta``).

    ``overrides`` maps ``vision`` / ``llm`` to the path of a layer list and ``connector`` to
    the path of the connector module; they win over detection. ``sources`` names where each
    override was written (``"gates.yaml: models.hulu.modules.llm"``) for error messages;
    the default is the ``--mllm-stages`` option.
    """
    config = model.config
    family = getattr(config, "model_type", type(model).__name__)
    modules = dict(model.named_modules())
    overrides = dict(overrides or {})

    def where(key: str, path: str) -> str:
        return (sources or {}).get(key, f"--mllm-stages {key}={path}")

    for key, path in overrides.items():
        if key not in OVERRIDE_KEYS:
            raise ConfigError(
                f"--mllm-stages: unknown stage {key!r}{close_matches(key, OVERRIDE_KEYS)}; "
                f"valid stages: {', '.join(OVERRIDE_KEYS)}"
            )
        if path not in modules:
            raise ConfigError(
                f"{where(key, path)}: this model has no module {path!r}"
                f"{close_matches(path, [p for p in modules if p])}"
            )

    vision = _find_named(modules, VISION_NAMES)
    language = _language_model_path(model, modules)
    quirks = family_quirks(family)
    vision_lists = [f"{vision}.{name}" for name in quirks.vision_layer_lists if f"{vision}.{name}" in modules]
    if overrides.get("vision") or not vision_lists:
        vision_lists = [overrides.get("vision") or (vision and _largest_layer_list(modules, vision))]
    vision_layers = vision_lists[0]
    # LLaVA-original code puts the vision tower and projector inside the decoder module that
    # get_decoder() returns: the language model's layers are never the vision encoder's
    llm_layers = overrides.get("llm") or (
        language and _largest_layer_list(modules, language, outside=(vision, overrides.get("vision")))
    )
    connector = overrides.get("connector") or _connector_path(
        modules, family, vision, llm_layers if _inside(vision, language) else language
    )
    _check_disjoint(vision_lists, llm_layers, where)
    missing = [
        name for name, path in (
            ("vision encoder layers", vision_layers),
            ("connector", connector),
            ("language-model layers", llm_layers),
        ) if not path
    ]
    if missing:
        found = {"vision": vision_layers, "connector": connector, "llm": llm_layers}
        if not vision and "vision" not in overrides and len(_layer_lists(modules)) < 2:
            raise ConfigError(NO_VISION_ENCODER.format(family=family, cls=type(model).__name__)
                              + " " + _unsupported_message(model, family, missing, modules, found))
        raise ConfigError(_unsupported_message(model, family, missing, modules, found))
    for key, path in [*(("vision", v) for v in vision_lists), ("llm", llm_layers)]:
        if not _is_layer_list(modules[path]):
            raise ConfigError(
                f"{where(key, path)}: {path!r} is a {type(modules[path]).__name__}, "
                "not a list of layers (nn.ModuleList); give the path of the layer list"
            )

    feature_layer = _feature_layer(config)
    vision_paths = tuple(f"{path}.{i}" for path in vision_lists for i in range(len(modules[path])))
    notes = []
    if quirks.consumed is not None and "vision" not in overrides:
        consumed = quirks.consumed(config, len(vision_paths))
        spans, first = [], 0
        for path in vision_lists:
            last = first + len(modules[path]) - 1
            spans.append(f"{path} (vision.{first}" + (f"-{last})" if last > first else ")"))
            first = last + 1
        notes.append("vision stage: " + ", then ".join(spans) + "; the connector reads "
                     + ", ".join(f"vision.{i}" for i in consumed))
    else:
        consumed = _consumed_layers(feature_layer, len(vision_paths))
        if _reads_embeddings(feature_layer, len(vision_paths)):
            notes.append(
                "the connector also reads the vision embeddings (hidden_states[0], before vision.0), "
                "which are no encoder block and are not probed"
            )
    readouts, entry = ("image", "last"), 0
    if quirks.cross_attention:
        readouts = ("last",)
        crossing = _cross_attention_layers(config, len(modules[llm_layers]), llm_layers)
        entry = min(crossing)
        notes.append(
            "the language model reads the image through cross-attention layers "
            + ", ".join(str(int(i)) for i in crossing)
            + ": no image tokens in its stream, so the image readout does not apply; the LLM stage "
            f"rules use the last-token readout from llm.{entry} on"
        )
    if feature_layer is None and quirks.consumed is None and not quirks.reads_last_layer:
        notes.append("no vision_feature_layer in the config: the connector is assumed to read the last vision layer")
    deepstack = getattr(getattr(config, "vision_config", None), "deepstack_visual_indexes", None)
    if deepstack:
        notes.append(
            "deepstack: vision blocks " + ", ".join(str(int(i)) for i in deepstack) + " also feed the first "
            "language-model layers through their own mergers; the connector readout is the main merger only"
        )

    return StageMap(
        family=family,
        vision_layers=vision_paths,
        connector=connector,
        llm_layers=tuple(f"{llm_layers}.{i}" for i in range(len(modules[llm_layers]))),
        consumed_vision_layers=consumed,
        vision_feature_layer=feature_layer,
        drop_cls=bool(vision) and _has_class_token(modules, vision),
        image_token_id=_image_token_id(config),
        notes=tuple(notes),
        llm_readouts=readouts,
        llm_entry=entry,
    )


def _connector_path(modules: dict[str, Any], family: str, vision: str | None, language: str | None) -> str | None:
    """The connector: a family's module inside the vision encoder, else one found by name."""
    quirks = family_quirks(family)
    if vision:
        for name in quirks.connector_in_vision:
            if f"{vision}.{name}" in modules:
                return f"{vision}.{name}"
    return _find_named(modules, quirks.connector_names + CONNECTOR_NAMES, outside=(vision, language))


def _find_named(modules: dict[str, Any], names: tuple[str, ...], outside: tuple[str | None, ...] = ()) -> str | None:
    """The shallowest module whose own name is the first of ``names`` that occurs."""
    fences = [o for o in outside if o]
    for wanted in names:
        hits = [
            path for path in modules
            if path.split(".")[-1] == wanted
            and not any(path == f or path.startswith(f + ".") for f in fences)
        ]
        if hits:
            return min(hits, key=lambda p: p.count("."))
    return None


def _language_model_path(model: Any, modules: dict[str, Any]) -> str | None:
    decoder = None
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            decoder = get_decoder()
        except (AttributeError, NotImplementedError, TypeError):
            decoder = None
    if decoder is not None and decoder is not model:
        for path, module in modules.items():
            if module is decoder and path:
                return path
    return _find_named(modules, LANGUAGE_NAMES)


def _largest_layer_list(modules: dict[str, Any], root: str, outside: tuple[str | None, ...] = ()) -> str | None:
    """The longest ``nn.ModuleList`` under ``root`` and not under ``outside``.

    Ties go to the shallowest list, then to the first one the model registered (its forward
    order): Qwen3-VL's ``visual.blocks`` before its ``visual.deepstack_merger_list``.
    """
    import torch.nn as nn

    fences = [o for o in outside if o and o != root]
    best: tuple[int, int] | None = None
    chosen = None
    for path, module in modules.items():
        if not (path == root or path.startswith(root + ".")):
            continue
        if any(path == f or path.startswith(f + ".") for f in fences):
            continue
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            key = (len(module), -path.count("."))
            if best is None or key > best:
                best, chosen = key, path
    return chosen


#: config keys naming the vision layer the connector reads: transformers' (a list for VipLLaVA)
#: and the original LLaVA code's
FEATURE_LAYER_KEYS = ("vision_feature_layer", "vision_feature_layers", "mm_vision_select_layer")


def _feature_layer(config: Any) -> Any:
    for key in FEATURE_LAYER_KEYS:
        value = getattr(config, key, None)
        if value is not None:
            return value
    return None


def _hidden_states_read(feature_layer: Any, n_layers: int) -> list[tuple[int, int]]:
    """``vision_feature_layer`` (an int or a list, negative from the end) as ``(index, position
    in hidden_states)`` pairs: position 0 is the embeddings, ``i`` the output of block ``i - 1``."""
    indices = feature_layer if isinstance(feature_layer, (list, tuple)) else [feature_layer]
    return [(int(i), n_layers + 1 + int(i) if int(i) < 0 else int(i)) for i in indices]


def _consumed_layers(feature_layer: Any, n_layers: int) -> tuple[int, ...]:
    """Map ``vision_feature_layer`` (an index into hidden_states, whose entry 0 is the
    embeddings) to the encoder blocks whose outputs the connector reads.

    The embeddings (index 0, or ``-(n_layers + 1)``) are no block: they are left out (the
    summary notes them); a config that reads nothing but the embeddings, or an index past the
    encoder, is a usage error.
    """
    if feature_layer is None:
        return (n_layers - 1,)
    layers = []
    for index, hidden_state in _hidden_states_read(feature_layer, n_layers):
        if not 0 <= hidden_state <= n_layers:
            raise ConfigError(
                f"vision_feature_layer {feature_layer!r}: index {index} is outside the vision encoder's "
                f"hidden states (embeddings + {n_layers} blocks: -{n_layers + 1} .. {n_layers}); fix the "
                "model's config"
            )
        if hidden_state > 0:
            layers.append(hidden_state - 1)
    if not layers:
        raise ConfigError(
            f"vision_feature_layer {feature_layer!r} reads only the vision embeddings (hidden_states[0]), "
            "not the output of any encoder block: the vision stage has nothing the connector reads; fix "
            "the model's config or name the vision layers with --mllm-stages vision=..."
        )
    return tuple(sorted(set(layers)))


def _reads_embeddings(feature_layer: Any, n_layers: int) -> bool:
    if feature_layer is None:
        return False
    return any(hidden_state == 0 for _, hidden_state in _hidden_states_read(feature_layer, n_layers))


def _cross_attention_layers(config: Any, n_layers: int, path: str) -> list[int]:
    """The decoder layers that cross-attend to the image, checked against the decoder's length."""
    text = getattr(config, "text_config", config)
    crossing = [int(i) for i in (getattr(text, "cross_attention_layers", None) or [0])]
    outside = [i for i in crossing if not 0 <= i < n_layers]
    if outside:
        raise ConfigError(
            f"text_config.cross_attention_layers {crossing} names decoder layer(s) "
            f"{', '.join(map(str, outside))}, but {path} has {n_layers} layers (0 .. {n_layers - 1}): "
            "the image would never reach the language model; fix the model's config"
        )
    return crossing


def _inside(path: str | None, root: str | None) -> bool:
    return bool(path and root) and (path == root or path.startswith(f"{root}."))


def _check_disjoint(vision_lists: list[str | None], llm_layers: str | None, where: Any) -> None:
    """The vision stage is never a list inside the language model's layers, nor the reverse."""
    for vision in vision_lists:
        if vision and llm_layers and (_inside(vision, llm_layers) or _inside(llm_layers, vision)):
            raise ConfigError(
                f"{where('vision', vision)} and {where('llm', llm_layers)}: one layer list lies inside the "
                "other, so one stage would be probed as the other; name two separate layer lists"
            )


def _is_layer_list(module: Any) -> bool:
    import torch.nn as nn

    return isinstance(module, nn.ModuleList) and len(module) > 0


def _has_class_token(modules: dict[str, Any], vision: str) -> bool:
    """A CLIP ``class_embedding`` or an InternViT ``cls_token`` in the vision encoder."""
    import torch

    for path, module in modules.items():
        if (path == vision or path.startswith(vision + ".")) and (
            hasattr(module, "class_embedding") or isinstance(getattr(module, "cls_token", None), torch.nn.Parameter)
        ):
            return True
    return False


def _image_token_id(config: Any) -> int | None:
    for key in ("image_token_id", "image_token_index"):
        value = getattr(config, key, None)
        if value is not None:
            return int(value)
    return None


def _layer_lists(modules: dict[str, Any]) -> list[tuple[str, int]]:
    """Every non-empty ``nn.ModuleList`` that is not inside another one: ``(path, length)``."""
    lists: list[tuple[str, int]] = []
    for path, module in modules.items():
        if path and _is_layer_list(module) and not any(path.startswith(p + ".") for p, _ in lists):
            lists.append((path, len(module)))
    return lists


def _unsupported_message(model: Any, family: str, missing: list[str], modules: dict[str, Any],
                         found: dict[str, str | None]) -> str:
    lists = _layer_lists(modules)
    top = [name for name, _ in model.named_children()]
    inner = [f"{name}.{n}" for name, child in model.named_children() for n, _ in child.named_children()]
    layer_text = ", ".join(f"{path} ({n})" for path, n in lists) or "none"
    # an override to start from: what was found, else the layer lists and modules that are left
    spare = [path for path, _ in lists if path not in (found.get("vision"), found.get("llm"))]
    llm = found.get("llm") or (spare.pop(-1) if spare else "<layer list>")
    vision = found.get("vision") or (spare.pop(0) if spare else "<layer list>")
    connector = found.get("connector") or _connector_guess(modules, vision, llm)
    return (
        f"cannot find the {', '.join(missing)} of this {family!r} model ({type(model).__name__}). "
        f"Its layer lists (length): {layer_text}; its modules: {', '.join(top + inner[:20]) or '(none)'}. "
        f"Name the stages yourself, e.g. --mllm-stages vision={vision},connector={connector},llm={llm} "
        "(or a 'modules:' entry in the model's section of a threshold file; see docs/architectures.md); "
        "the map is checked by data flow when the model loads"
    )


def _connector_guess(modules: dict[str, Any], vision: str, llm: str) -> str:
    """A module with parameters beside the vision encoder and the language model (the children
    of their common ancestor, other than the two branches): where connectors sit."""
    common = []
    for a, b in zip(vision.split("."), llm.split(".")):
        if a != b:
            break
        common.append(a)
    parent = ".".join(common)
    branches = [".".join(p.split(".")[: len(common) + 1]) for p in (vision, llm)]
    for path, module in modules.items():
        inside = path.startswith(parent + ".") if parent else bool(path)
        if inside and path.count(".") == len(common) and path not in branches \
                and path.split(".")[-1] not in NOT_CONNECTORS \
                and not _is_layer_list(module) and any(True for _ in module.parameters()):
            return path
    return "<module>"


#: modules beside the two branches that never carry the image: token embeddings, norms, heads
NOT_CONNECTORS = ("embed_tokens", "wte", "word_embeddings", "embeddings", "norm", "final_layernorm",
                  "ln_f", "lm_head", "rotary_emb")
