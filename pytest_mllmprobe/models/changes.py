"""What a fine-tune changed, per pipeline stage.

Two ways to know it without running the model:

* a PEFT adapter: the modules its weights file names (LoRA factors, ``modules_to_save`` copies),
  read from the safetensors header, each placed in the stage whose module tree holds it;
* a full fine-tune compared with a reference checkpoint: one sha256 per stage over the tensors
  whose names fall in that stage, for both folders (the bytes are read, once per comparison).

:func:`stage_roots` says where each stage lives (the vision encoder, the connector, the language
model, the output head for ``answer``); the longest matching root wins, so Qwen-VL's merger inside
``model.visual`` belongs to the connector. :func:`describe` turns the per-stage findings into
``changed: llm (8 LoRA modules); unchanged: vision, connector, answer`` and :func:`contradictions`
names the regressed stages that nothing at or upstream of them changed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

STAGES = ("vision", "connector", "llm", "answer")


def stage_roots(model: Any, stage_map: Any) -> dict[str, str]:
    """``{stage: module path}`` of a model (a ``meta`` structure is enough)."""
    from .stages import VISION_NAMES, _find_named, _language_model_path

    modules = dict(model.named_modules())
    roots: dict[str, str] = {"connector": stage_map.connector}
    vision = _find_named(modules, VISION_NAMES) or _parent(_parent(stage_map.vision_layers[0]))
    language = _language_model_path(model, modules) or _parent(stage_map.llm_layers[0])
    roots["vision"], roots["llm"] = vision, language
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for path, module in modules.items():
        if head is not None and module is head and path:
            roots["answer"] = path
            break
    return {stage: path for stage, path in roots.items() if path}


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def stage_of(name: str, roots: dict[str, str]) -> str | None:
    """The stage holding module or tensor ``name`` (the longest matching root), or ``None``."""
    best, length = None, -1
    for stage, root in roots.items():
        if (name == root or name.startswith(root + ".")) and len(root) > length:
            best, length = stage, len(root)
    return best


# -- PEFT adapters ------------------------------------------------------------------------------
PEFT_PREFIX = "base_model.model."


def adapter_modules(tensors: dict[str, tuple[int, ...]]) -> dict[str, str]:
    """``{module path: "lora" | "saved"}`` from an adapter's tensor names (peft's saved layout).

    ``...q_proj.lora_A.weight`` is a LoRA module; a plain ``weight``/``bias`` of any other module
    is a ``modules_to_save`` copy (trained whole); ``base_layer`` copies belong to their LoRA module.
    """
    found: dict[str, str] = {}
    for key in tensors:
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        if ".lora_" in name:
            found[name[: name.index(".lora_")]] = "lora"
    for key in tensors:
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        if ".lora_" in name:
            continue
        module = _parent(name)
        if module.endswith(".base_layer"):
            module = _parent(module)
        found.setdefault(module, "saved")
    return found


def adapter_changes(modules: dict[str, str], roots: dict[str, str]) -> dict[str, Any]:
    """The per-stage record of an adapter's modules."""
    stages: dict[str, dict[str, Any]] = {s: {"changed": False, "lora_modules": 0, "saved_modules": 0} for s in STAGES}
    other: list[str] = []
    for module, kind in sorted(modules.items()):
        stage = stage_of(module, roots)
        if stage is None:
            other.append(module)
            continue
        stages[stage]["changed"] = True
        stages[stage]["lora_modules" if kind == "lora" else "saved_modules"] += 1
    return _record("adapter", stages, other)


def _record(source: str, stages: dict[str, dict[str, Any]], other: list[str]) -> dict[str, Any]:
    record = {"source": source, "stages": stages, "other_modules": other}
    record["changed"] = [s for s in STAGES if stages[s]["changed"]]
    record["unchanged"] = [s for s in STAGES if not stages[s]["changed"]]
    record["text"] = describe(record)
    return record


def describe(record: dict[str, Any]) -> str:
    """``changed: llm (8 LoRA modules); unchanged: vision, connector, answer``."""
    parts = []
    for stage in record["changed"]:
        info = record["stages"][stage]
        what = []
        if info.get("lora_modules"):
            what.append(f"{info['lora_modules']} LoRA module{'s' * (info['lora_modules'] != 1)}")
        if info.get("saved_modules"):
            what.append(f"{info['saved_modules']} module{'s' * (info['saved_modules'] != 1)} trained whole")
        if info.get("tensors"):
            what.append(f"{info['tensors']} of {info['total']} tensors differ")
        parts.append(f"{stage} ({', '.join(what)})" if what else stage)
    text = f"changed: {', '.join(parts) or 'nothing'}"
    if record["unchanged"]:
        text += f"; unchanged: {', '.join(record['unchanged'])}"
    if record.get("other_modules"):
        text += f"; outside the stages: {len(record['other_modules'])} module(s)"
    return text


# -- full fine-tunes: per-stage weight fingerprints ----------------------------------------------
def weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a saved model (its index's shards, or every ``*.safetensors``)."""
    root = Path(folder)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map") or {}
        return sorted({root / name for name in weight_map.values()})
    return sorted(root.glob("*.safetensors"))


def tensor_names(folder: str | Path, structure: Any, adapter: Any = None) -> dict[str, str]:
    """``{tensor name in the files: the model's name for it}`` of a saved model folder (``{}`` for a
    hub id or a PEFT adapter): transformers may save the legacy layout
    (``language_model.model.layers.0...``); names are renamed as loading renames them."""
    from safetensors import safe_open

    if _knows_its_changes(adapter) or not Path(folder).is_dir():
        return {}
    rename = _renamer(structure)
    found: dict[str, str] = {}
    for path in weight_files(folder):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                found[key] = rename(key)
    return found


def _renamer(structure: Any) -> Any:
    """Saved tensor name -> the model's parameter name, with transformers' own loading renames."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(structure)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        meta = structure.state_dict()
        prefix = getattr(structure, "base_model_prefix", None)
    except (ImportError, AttributeError, TypeError, ValueError):  # another transformers: names as saved
        return lambda key: key

    def rename(key: str) -> str:
        try:
            return rename_source_key(key, renamings, converters, prefix, meta)[0]
        except (AttributeError, TypeError, ValueError, KeyError):
            return key

    return rename


def tensor_hashes(folder: str | Path) -> dict[str, str]:
    """``{tensor name: sha256 of dtype, shape and bytes}`` of a saved model's safetensors files."""
    import torch
    from safetensors import safe_open

    hashes: dict[str, str] = {}
    for path in weight_files(folder):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                tensor = handle.get_tensor(key).contiguous()
                digest = hashlib.sha256(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
                digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
                hashes[key] = digest.hexdigest()
    return hashes


def weight_changes(model: str | Path, reference: str | Path, names: dict[str, str],
                   reference_names: dict[str, str], roots: dict[str, str]) -> dict[str, Any] | None:
    """Per-stage weight fingerprints of two saved models compared (``names``: each one's
    :func:`tensor_names`); ``None`` when either has no safetensors files."""
    ours = {names.get(k, k): v for k, v in tensor_hashes(model).items()}
    theirs = {reference_names.get(k, k): v for k, v in tensor_hashes(reference).items()}
    if not ours or not theirs:
        return None
    stages: dict[str, dict[str, Any]] = {s: {"changed": False, "tensors": 0, "total": 0} for s in STAGES}
    mine: dict[str, list[str]] = {s: [] for s in STAGES}
    other: list[str] = []
    for name in sorted(set(ours) | set(theirs)):
        stage = stage_of(name, roots)
        differs = ours.get(name) != theirs.get(name)
        if stage is None:
            other += [name] if differs else []
            continue
        stages[stage]["total"] += 1
        mine[stage].append(ours.get(name, "-"))
        if differs:
            stages[stage]["changed"] = True
            stages[stage]["tensors"] += 1
    for stage in STAGES:
        if mine[stage]:
            stages[stage]["fingerprint"] = hashlib.sha256("".join(mine[stage]).encode()).hexdigest()[:16]
    return _record("weights", stages, other)


def fine_tune_changes(model: Any, reference: Any = None) -> dict[str, Any] | None:
    """What a model's fine-tune changed, per stage: a PEFT adapter's from its tensors (against its
    base); a saved full fine-tune's from per-stage weight fingerprints against its saved reference
    model (``ModelPlan``s); ``None`` when neither applies."""
    if _knows_its_changes(model.adapter):
        return {**model.adapter.changes(model.roots), "against": f"its base {model.adapter.base}"}
    if reference is None or _knows_its_changes(reference.adapter):
        return None
    folders = [model.spec.source, reference.spec.source]
    if not all(Path(f).is_dir() and weight_files(f) for f in folders):
        return None
    record = weight_changes(*folders, model.tensor_names, reference.tensor_names, model.roots)
    return None if record is None else {**record, "against": f"model {reference.spec.label!r}"}


def _knows_its_changes(adapter: Any) -> bool:
    """A PEFT adapter (:class:`~.peft_adapter.PeftAdapter`) tells its changes from its tensors."""
    return callable(getattr(adapter, "changes", None)) and hasattr(adapter, "base")


def contradictions(record: dict[str, Any] | None, regressed: list[str]) -> list[str]:
    """Regressed stages whose weights, and every upstream stage's, did not change: a regression
    there cannot come from the fine-tune (noise, or a bug in the measurement)."""
    if not record:
        return []
    changed = set(record["changed"])
    found = []
    for stage in regressed:
        upstream = STAGES[: STAGES.index(stage) + 1] if stage in STAGES else ()
        if upstream and not changed & set(upstream):
            found.append(stage)
    return found
