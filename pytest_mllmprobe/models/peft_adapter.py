"""PEFT adapters (LoRA, DoRA, rsLoRA) as models: the base loaded as usual, the adapter merged in.

A folder (or cached hub repo) holding ``adapter_config.json`` is what ``peft`` and every
fine-tuning framework save. Its base is ``base_model_name_or_path`` (a folder, a path relative to
the adapter, or a hub id in the local cache), or ``--mllm-base-model`` when given. The base goes
through the adapter that fits it (transformers' classes, LLaVA-original, remote code), the adapter
is applied with ``peft`` and merged (``merge_and_unload``): the merged model has the base's
module names, so the stage map, the hooks and the speed are the base's, and the features equal
those of the same model merged and saved by the user. The processor comes from the adapter
folder when it holds one, else from the base.

At plan time (no weights read) the adapter's tensors are checked against the base's module tree
(on ``meta``): every module must exist with the shapes the adapter was trained on, so an adapter
for another architecture or another vocabulary size is a usage error, not a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError, require_extra
from .adapter import ModelAdapter
from .families import Segments

ADAPTER_CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
SUPPORTED = ("LORA",)
SUPPORTED_TEXT = "LORA (with use_dora or use_rslora too)"
EXTRA_HINT = "pip install 'pytest-mllmprobe[peft]' (or pip install peft)"
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def adapter_config_file(source: str) -> Path | None:
    """``adapter_config.json`` of a local folder or of a hub repo in the local cache."""
    path = Path(source).expanduser()
    if path.is_dir():
        found = path / ADAPTER_CONFIG
        return found if found.is_file() else None
    try:
        from transformers.utils import cached_file

        hit = cached_file(source, ADAPTER_CONFIG, _raise_exceptions_for_missing_entries=False,
                          _raise_exceptions_for_connection_errors=False, local_files_only=True)
    except (OSError, ValueError, TypeError):
        return None
    return Path(hit) if hit else None


def is_peft_adapter(source: str) -> bool:
    return adapter_config_file(source) is not None


def read_adapter_config(source: str) -> dict[str, Any]:
    path = adapter_config_file(source)
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path else None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--mllm-model {source!r}: {ADAPTER_CONFIG} cannot be read: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"--mllm-model {source!r}: {ADAPTER_CONFIG} is not a JSON object")
    return data


def require_peft(source: str) -> Any:
    """The ``peft`` module, or a usage error naming the extra."""
    return require_extra("peft", f"--mllm-model {source!r} is a PEFT adapter ({ADAPTER_CONFIG}), which needs the "
                                 f"peft package: {EXTRA_HINT}")


def find_base(source: str, config: dict[str, Any], override: str | None) -> str:
    """The base model's folder or hub id: ``--mllm-base-model``, else ``base_model_name_or_path``
    (as given, relative to the adapter folder, or a hub id in the local cache)."""
    from .load import HUB_ID

    named = override or config.get("base_model_name_or_path")
    where = "--mllm-base-model" if override else f"{ADAPTER_CONFIG} key base_model_name_or_path"
    fix = ("give the base's folder with --mllm-base-model PATH (or the mllm_base_model ini key), or download "
           "it into the local Hugging Face cache")
    if not named:
        raise ConfigError(
            f"--mllm-model {source!r}: the adapter names no base model ({ADAPTER_CONFIG} key "
            f"base_model_name_or_path is empty); {fix}"
        )
    named = str(named)
    adapter_dir = Path(source).expanduser()
    for candidate in (Path(named).expanduser(), adapter_dir / named if adapter_dir.is_dir() else None):
        if candidate is not None and candidate.is_dir():
            if not (candidate / "config.json").is_file():
                raise ConfigError(
                    f"--mllm-model {source!r}: {where} = {named!r} is a folder without config.json, not a "
                    f"saved model; {fix}"
                )
            return str(candidate.resolve())
    if HUB_ID.match(named) and not named.startswith((".", "/", "~")) and _cached(named):
        return named
    raise ConfigError(
        f"--mllm-model {source!r}: the adapter's base model was not found: {where} = {named!r} is no "
        f"folder (nor one relative to the adapter) and no hub model in the local cache; {fix}"
    )


def _cached(repo_id: str) -> bool:
    try:
        from transformers.utils import cached_file

        return bool(cached_file(repo_id, "config.json", _raise_exceptions_for_missing_entries=False,
                                _raise_exceptions_for_connection_errors=False, local_files_only=True))
    except (OSError, ValueError, TypeError):
        return False


def adapter_tensors(source: str) -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` of the adapter's weights (the safetensors header only)."""
    folder = adapter_config_file(source).parent  # type: ignore[union-attr]
    path = folder / WEIGHTS[0]
    if path.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        except Exception as exc:  # safetensors raises its own error types for broken headers
            raise ConfigError(f"--mllm-model {source!r}: {path.name} is unreadable: {exc}") from exc
    path = folder / WEIGHTS[1]
    if path.is_file():  # tensors only, no code (as peft reads it)
        import torch

        state = torch.load(str(path), map_location="cpu", weights_only=True)
        return {key: tuple(value.shape) for key, value in state.items()}
    raise ConfigError(
        f"--mllm-model {source!r}: {ADAPTER_CONFIG} without adapter weights ({' or '.join(WEIGHTS)}); "
        "save the adapter again with peft_model.save_pretrained(path)"
    )


class PeftAdapter(ModelAdapter):
    """A PEFT adapter over its base: structure, feeding and reading are the base's."""

    def __init__(self, source: str, base_adapter: ModelAdapter, base: str, adapter_config: dict[str, Any]) -> None:
        super().__init__(source, trust_remote_code=base_adapter.trust_remote_code)
        self.base = base
        self.base_adapter = base_adapter
        self.adapter_config = adapter_config
        self.stages = dict(base_adapter.stages)  # type: ignore[misc]
        self._tensors: dict[str, tuple[int, ...]] | None = None
        #: the base model already loaded in this process (its own pass), taken by :meth:`load`
        self._offered: tuple[Any, Any] | None = None
        self.reused_base = False

    # -- what the model is ----------------------------------------------------------------
    def tensors(self) -> dict[str, tuple[int, ...]]:
        if self._tensors is None:
            self._tensors = adapter_tensors(self.source)
        return self._tensors

    def config(self) -> Any:
        self.check_type()
        require_peft(self.source)
        config = self.base_adapter.config()
        if Path(self.base).is_dir():
            from ..preflight import check_weights

            check_weights(self.base, f"--mllm-model {self.source!r}: the adapter's base")
        return config

    def check_type(self) -> None:
        kind = str(self.adapter_config.get("peft_type", "?"))
        if kind.upper() not in SUPPORTED:
            raise ConfigError(
                f"--mllm-model {self.source!r}: {ADAPTER_CONFIG} key peft_type = {kind!r} is not supported; "
                f"supported: {SUPPORTED_TEXT}. Merge it yourself (peft_model.merge_and_unload(), then "
                "save_pretrained) and pass the merged folder"
            )

    def structure(self) -> Any:
        """The base's module tree (the merged model has the same), checked against the adapter."""
        structure = self.base_adapter.structure()
        self.check_fits(structure)
        return structure

    def check_fits(self, structure: Any) -> None:
        """Every module the adapter changes exists in the base with the adapter's shapes."""
        from .changes import PEFT_PREFIX, adapter_modules

        modules = dict(structure.named_modules())
        params = dict(structure.named_parameters())
        kind = getattr(structure.config, "model_type", type(structure).__name__)
        tensors = self.tensors()
        missing = [m for m in adapter_modules(tensors) if m not in modules]
        if missing:
            raise ConfigError(
                f"--mllm-model {self.source!r}: the adapter was made for another architecture: its base "
                f"{self.base!r} ({kind}) has no module {missing[0]!r}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + "; check base_model_name_or_path in adapter_config.json or --mllm-base-model"
            )
        for key, shape in tensors.items():
            name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
            problem = _shape_problem(name, shape, modules, params)
            if problem:
                vocab = _vocab_size(structure)
                what = "another vocabulary size" if vocab is not None and vocab in problem[1:] else "another architecture"
                raise ConfigError(
                    f"--mllm-model {self.source!r}: the adapter was made for {what}: {name} has shape "
                    f"{list(shape)} in the adapter, but {problem[0]} in the base {self.base!r} ({kind}"
                    + (f", vocabulary size {vocab}" if vocab is not None else "")
                    + "); check base_model_name_or_path in adapter_config.json or --mllm-base-model"
                )
        self.check_tokenizer(structure, kind)

    def check_tokenizer(self, structure: Any, kind: str) -> None:
        """A tokenizer saved with the adapter must fit the base's embedding rows (added tokens need
        a resized embedding, saved with ``modules_to_save``)."""
        path = adapter_config_file(self.source).parent / "tokenizer.json"  # type: ignore[union-attr]
        vocab = _vocab_size(structure)
        if vocab is None or not path.is_file():
            return
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        ids = [int(t["id"]) for t in data.get("added_tokens") or [] if isinstance(t, dict) and "id" in t]
        words = (data.get("model") or {}).get("vocab")
        if isinstance(words, dict):
            ids += [int(i) for i in words.values() if isinstance(i, int)]
        largest = max(ids, default=-1)
        if largest >= vocab:
            rows = dict(structure.named_parameters()).get("lm_head.weight")
            raise ConfigError(
                f"--mllm-model {self.source!r}: the adapter was made for another vocabulary size: its "
                f"tokenizer.json has token ids up to {largest}, but the base {self.base!r} ({kind}) has "
                f"vocabulary size {vocab}"
                + (f" ({rows.shape[0]} output rows)" if rows is not None else "")
                + "; save the resized embeddings with the adapter (modules_to_save=['embed_tokens', 'lm_head']) "
                "or check base_model_name_or_path in adapter_config.json or --mllm-base-model"
            )

    def changes(self, roots: dict[str, str]) -> dict[str, Any]:
        """Which stages the adapter changes (from its tensor names), per stage."""
        from .changes import adapter_changes, adapter_modules

        return adapter_changes(adapter_modules(self.tensors()), roots)

    # -- loading ---------------------------------------------------------------------------
    def offer_base(self, model: Any, processor: Any) -> None:
        """The base, loaded by its own pass with the same settings: reused instead of reloading
        (``None`` lets go of one offered and not taken)."""
        self._offered = None if model is None else (model, processor)

    def load(self, device: str = "auto", dtype: str = "auto", device_map: str | None = None) -> tuple[Any, Any]:
        import warnings

        peft = require_peft(self.source)
        #: whether the last load took the base from the base's own pass (read once for both)
        self.reused_base = self._offered is not None
        if self._offered is not None:
            model, processor = self._offered
            self._offered = None
        else:
            model, processor = self.base_adapter.load(device, dtype, device_map)
        try:
            with warnings.catch_warnings():  # peft asks transformers about gradient checkpointing
                warnings.filterwarnings("ignore", category=FutureWarning, message=".*checkpointing.*")
                wrapped = peft.PeftModel.from_pretrained(model, str(adapter_config_file(self.source).parent))
        except (ValueError, KeyError, RuntimeError, OSError) as exc:
            raise ConfigError(
                f"--mllm-model {self.source!r}: peft cannot apply the adapter to its base {self.base!r}: "
                f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            ) from exc
        merged = wrapped.merge_and_unload()
        return merged.eval(), self.processor() or processor

    def processor(self) -> Any:
        """The adapter folder's own processor, when it holds one (else ``None``: the base's)."""
        folder = adapter_config_file(self.source).parent  # type: ignore[union-attr]
        if not any((folder / name).is_file() for name in PROCESSOR_FILES):
            return None
        from transformers import AutoProcessor

        try:
            return AutoProcessor.from_pretrained(str(folder), trust_remote_code=self.trust_remote_code)
        except (ImportError, OSError, ValueError, TypeError) as exc:
            raise ConfigError(
                f"--mllm-model {self.source!r}: the adapter folder holds a processor that AutoProcessor "
                f"cannot load: {exc}; remove its processor files to use the base's"
            ) from exc

    # -- how to feed it: the base's way ---------------------------------------------------------
    def encode(self, processor: Any, images: list[Any], prompts: list[str], device: Any, dtype: Any,
               padding_side: str = "left", *, family_name: str = "") -> dict[str, Any]:
        return self.base_adapter.encode(processor, images, prompts, device, dtype, padding_side,
                                        family_name=family_name)

    def positions(self, inputs: dict[str, Any], *, family_name: str = "") -> dict[str, Any]:
        return self.base_adapter.positions(inputs, family_name=family_name)

    def segments(self, stage_map: Any, model: Any, inputs: dict[str, Any]) -> Segments:
        return self.base_adapter.segments(stage_map, model, inputs)


def _shape_problem(name: str, shape: tuple[int, ...], modules: dict[str, Any],
                   params: dict[str, Any]) -> tuple[str, ...] | None:
    """``(what the base has, its sizes...)`` when ``name`` does not fit the base, else ``None``."""
    if ".lora_" not in name:
        target = name.replace(".base_layer.", ".")
        if target in params and tuple(params[target].shape) != tuple(shape):
            return (str(list(params[target].shape)), *params[target].shape)
        return None
    module = modules.get(name[: name.index(".lora_")])
    part = name[name.index(".lora_") + 1:]
    if module is None or len(shape) < 2:
        return None
    weight = getattr(module, "weight", None)
    if weight is None:
        return None
    out_size, in_size = int(weight.shape[0]), int(weight.shape[1])
    if part.startswith("lora_embedding_A"):  # [r, num_embeddings]; the embedding weight is [num, dim]
        return None if shape[1] == out_size else (f"{out_size} rows", out_size)
    if part.startswith("lora_embedding_B"):
        return None if shape[0] == in_size else (f"width {in_size}", in_size)
    if part.startswith("lora_A"):
        return None if shape[1] == in_size else (f"{in_size} inputs", in_size)
    if part.startswith("lora_B"):
        return None if shape[0] == out_size else (f"{out_size} outputs", out_size)
    return None


def _vocab_size(structure: Any) -> int | None:
    config = structure.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    size = getattr(text, "vocab_size", None)
    return int(size) if size is not None else None


#: ``--mllm-compare-to base``: every PEFT adapter against its own base
BASE = "base"


def add_bases(compare_to: str | None, specs: list[Any], adapters: list[ModelAdapter]) -> dict[str, str]:
    """With ``--mllm-compare-to base``, add every adapter's base to ``specs``/``adapters`` (once, also
    when it is given with --mllm-model; its adapter is the one the PEFT adapter loads it with) and
    return ``{adapter label: base label}``; ``{}`` otherwise (or when a model is labelled ``base``)."""
    from .load import ModelSpec

    labels = [s.label for s in specs]
    if compare_to != BASE or BASE in labels:
        return {}
    peft = [(s, a) for s, a in zip(specs, adapters) if isinstance(a, PeftAdapter)]
    if not peft:
        raise ConfigError(
            f"--mllm-compare-to base compares PEFT adapters (folders with {ADAPTER_CONFIG}) with their base, "
            f"but no model of this run is one ({', '.join(labels)}); name the reference model's label instead"
        )
    references = {}
    for spec, adapter in peft:
        found = next((s for s in specs if _same(s.source, adapter.base)), None)
        if found is None:
            name = Path(adapter.base).name if Path(adapter.base).is_dir() else adapter.base.split("/")[-1]
            label, n = name, 1
            while label in labels:
                label, n = f"{name}-base" + (f"-{n}" if n > 1 else ""), n + 1
            found = ModelSpec(label, adapter.base)
            specs.append(found)
            adapters.append(adapter.base_adapter)
            labels.append(label)
        references[spec.label] = found.label
    return references


def _same(a: str, b: str) -> bool:
    return a == b or (Path(a).is_dir() and Path(b).is_dir() and Path(a).resolve() == Path(b).resolve())
