"""On-disk cache of pooled features, so a re-run that only changes thresholds or probes loads no model.

One entry per key: ``<key>.npz`` (the arrays, ``numpy.savez``, read back with
``allow_pickle=False``) and ``<key>.json`` (what produced them). Both are written atomically: a
temporary file in the cache folder, then ``os.replace``, so a reader sees the old entry or the new
one, never half of one. An entry that cannot be read (truncated, corrupt, inconsistent) is
reported with a :class:`CacheWarning` naming the file and treated as missing; it is recomputed.

:func:`locked` serialises the work on one key across processes (``fcntl.flock`` on
``<key>.lock``), so two pytest-xdist workers do not extract the same model twice: the second
waits, then finds the first one's entry.

Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .extract import Features
from .selection import Need
from .atomic import atomic_write, remove_stale
from .data.images import quick_file_hash

FORMAT = 3
"""Bumped whenever the entry layout or the meaning of the arrays changes.
2: the class names' first-token logits, the lens's norm and head rows, the answer variants.
3: an entry may hold some of the loci (a run that selected some tests) and no answer scores;
the sidecar says which (``loci``, ``answer``, ``complete``). A format-2 entry is read as a
complete one; any other format is unreadable (a :class:`CacheWarning`, then recomputed)."""

READABLE = (2, 3)
KEY_FORMAT = 2
"""The format number hashed into the keys: unchanged by format 3, of whose entries format-2
entries are a case (every locus, with the answer), so that they stay found."""

ANSWER = "answer_scores"
NAMES = "locus_names"
LOCUS_PREFIX = "locus/"
FIRST_LOGITS = "first_logits"
LENS_PREFIX = "lens/"
VARIANT_PREFIX = "variant/"

CONFIG_FILES = (
    "config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.json",
    "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model", "adapter_config.json",
)
"""Small files hashed in full: they decide the prompt, the pixels and the architecture."""

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
EDGE_BYTES = 1 << 16
"""Bytes hashed at each end of a weight file (with its size and mtime): cheap, not a full read."""


class CacheWarning(UserWarning):
    """A cache entry could not be used; it is recomputed."""


def feature_key(model_fingerprint: str, data_fingerprint: str, extraction: dict[str, Any]) -> str:
    """The sha256 of the canonical JSON of everything that decides the extracted features."""
    payload = {"format": KEY_FORMAT, "model": model_fingerprint, "data": data_fingerprint, "extraction": extraction}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def model_fingerprint(model_dir_or_id: str | os.PathLike[str]) -> str:
    """A cheap hash of a saved model: config/processor files in full, weights by size, mtime, ends.

    ``demo`` is the bundled model. A hub id is fingerprinted by its local snapshot when the hub
    cache has one (the snapshot folder name is the commit), else by the id alone.
    """
    source = str(model_dir_or_id)
    if source == "demo":
        from .demo import DEMO_MODEL

        source = str(DEMO_MODEL)
    path = Path(source).expanduser()
    if not path.is_dir():
        snapshot = _hub_snapshot(source)
        if snapshot is None:
            return hashlib.sha256(f"hub:{source}".encode()).hexdigest()[:32]
        path = snapshot
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        if file.name in CONFIG_FILES:
            digest.update(f"{rel}\0".encode() + file.read_bytes() + b"\n")
        elif file.name.endswith(WEIGHT_SUFFIXES) or file.name.endswith(".index.json"):
            stat = file.stat()
            digest.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\0{quick_file_hash(file, EDGE_BYTES)}\n".encode())
    return digest.hexdigest()[:32]


def _hub_snapshot(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached, not a hub id, or no huggingface_hub: fall back to the id
        return None


def extraction_settings(the_plan: Any, model_plan: Any) -> dict[str, Any]:
    """Everything besides model and data that decides one model's features in ``engine.evaluate``.

    Thresholds, metric, split, folds and probe settings are left out on purpose: changing them
    reuses the features. Versions are read from package metadata (no torch/transformers import).
    """
    from importlib.metadata import PackageNotFoundError, version

    from .models.load import pick_device, pick_dtype
    from .prompts import DEFAULT_QUESTION

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    settings, dataset = the_plan.settings, the_plan.dataset
    device = pick_device(settings.device)
    return {
        "batch_size": settings.batch_size,
        "device": device.type,
        "dtype": str(pick_dtype(settings.dtype, device)),
        "question": dataset.prompt or DEFAULT_QUESTION,
        "prompts": list(dataset.prompts),
        "answer_orders": settings.answer_orders,
        "class_names": list(dataset.class_names),
        "display_names": list(dataset.display_names),
        "stage_map": model_plan.stage_map.to_dict(),
        "stages": dict(settings.stages),
        "trust_remote_code": settings.trust_remote_code,
        "padding_side": "left",
        "versions": {name: installed(name) for name in ("pytest-mllmprobe", "transformers", "torch")},
    }


def extraction_key(the_plan: Any, model_plan: Any, variant: str | None = None) -> tuple[str, dict[str, Any]]:
    """``(key, meta)`` of one model's features in a planned run; no weights are read.

    ``variant`` names features of a modified model (e.g. ``random-init seed=0``, the random
    initialisation twin), kept beside the model's own."""
    extraction = extraction_settings(the_plan, model_plan)
    if variant is not None:
        extraction["variant"] = variant
    adapter = model_plan.adapter  # which adapter read the weights, and the folder it read them from
    extraction["adapter"] = f"{type(adapter).__module__}.{type(adapter).__qualname__}"
    fingerprint = model_fingerprint(adapter.source or model_plan.spec.source)
    base = getattr(adapter, "base", None)  # a PEFT adapter: its own files and its base's
    if base:
        fingerprint = hashlib.sha256(f"{fingerprint}+{model_fingerprint(base)}".encode()).hexdigest()[:32]
    key = feature_key(fingerprint, the_plan.dataset.fingerprint, extraction)
    meta = {
        "model": model_plan.spec.source, "label": model_plan.spec.label, "model_fingerprint": fingerprint,
        "data": the_plan.dataset.root, "data_fingerprint": the_plan.dataset.fingerprint,
        "n_images": len(the_plan.dataset), "extraction": extraction,
    }
    return key, meta


def entry_paths(cache_dir: str | os.PathLike[str], key: str) -> tuple[Path, Path]:
    """The ``.npz`` and ``.json`` files of one entry."""
    root = Path(cache_dir)
    return root / f"{key}.npz", root / f"{key}.json"


def load_features(cache_dir: str | os.PathLike[str], key: str) -> Features | None:
    """The cached features of ``key``; ``None`` when absent or unreadable (with a CacheWarning)."""
    arrays_path, meta_path = entry_paths(cache_dir, key)
    if not arrays_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") not in READABLE or meta.get("key") != key:
            raise ValueError(f"its sidecar {meta_path.name} belongs to another format "
                             f"({meta.get('format')}; this version reads {READABLE}) or key")
        with np.load(arrays_path, allow_pickle=False) as stored:
            names = [str(n) for n in stored[NAMES]]
            loci = {name: np.array(stored[LOCUS_PREFIX + name]) for name in names}
            answer_scores = np.array(stored[ANSWER]) if meta.get("answer", True) else None
            first_logits = np.array(stored[FIRST_LOGITS]) if FIRST_LOGITS in stored.files else None
            lens_arrays = {f[len(LENS_PREFIX):]: np.array(stored[f]) for f in stored.files if f.startswith(LENS_PREFIX)}
            variants = {name: np.array(stored[VARIANT_PREFIX + name]) for name in meta.get("variants", [])}
        _check_consistent(loci, answer_scores, meta)
        for name, X in variants.items():
            if answer_scores is None or X.shape != answer_scores.shape:
                raise ValueError(f"answer variant {name} has shape {X.shape}, expected {answer_scores.shape}")
        lens = None
        if meta.get("lens") is not None:
            from .lens import LensHead

            lens = LensHead.from_parts(meta["lens"], lens_arrays)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        warnings.warn(CacheWarning(
            f"feature cache entry {arrays_path} is unreadable ({type(exc).__name__}: {exc}); "
            "its features are recomputed"
        ), stacklevel=2)
        return None
    return Features(loci=loci, answer_scores=answer_scores, first_logits=first_logits, lens=lens,
                    lens_note=meta.get("lens_note"), variant_scores=variants)


def is_complete(cache_dir: str | os.PathLike[str], key: str) -> bool:
    """Whether the entry of ``key`` holds every locus and the answer (format 2 entries always do)."""
    try:
        meta = json.loads(entry_paths(cache_dir, key)[1].read_text())
    except (OSError, ValueError):
        return False
    return bool(meta.get("complete", meta.get("format") == 2))


def _check_consistent(loci: dict[str, np.ndarray], answer_scores: np.ndarray | None, meta: dict[str, Any]) -> None:
    if answer_scores is None:
        n = int(meta.get("n_images", -1))
    else:
        n = answer_scores.shape[0] if answer_scores.ndim == 2 else -1
        if n < 0:
            raise ValueError(f"answer_scores has shape {answer_scores.shape}, expected [images, classes]")
    for name, X in loci.items():
        if X.ndim != 2 or X.shape[0] != n:
            raise ValueError(f"locus {name} has shape {X.shape}, expected [{n}, features]")
    if list(loci) != meta.get("loci"):
        raise ValueError("its loci differ from those its sidecar lists")


def save_features(
    cache_dir: str | os.PathLike[str], key: str, features: Features, meta: dict[str, Any] | None = None,
    complete: bool = True,
) -> Path:
    """Write one entry atomically (arrays, then sidecar); returns the ``.npz`` path.

    ``complete``: the features hold every locus of the model and the answer (a later run of
    any selection reads them); otherwise later runs extract what they miss and merge it in."""
    root = Path(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    arrays_path, meta_path = entry_paths(root, key)
    arrays = {NAMES: np.array(list(features.loci), dtype=str)}
    if features.answer_scores is not None:
        arrays[ANSWER] = np.asarray(features.answer_scores)
    for name, X in features.loci.items():
        arrays[LOCUS_PREFIX + name] = np.asarray(X)
    if features.first_logits is not None:
        arrays[FIRST_LOGITS] = np.asarray(features.first_logits)
    if features.lens is not None:
        for name, X in features.lens.arrays().items():
            arrays[LENS_PREFIX + name] = np.asarray(X)
    for name, X in features.variant_scores.items():
        arrays[VARIANT_PREFIX + name] = np.asarray(X)
    atomic_write(arrays_path, lambda fh: np.savez(fh, **arrays))
    sidecar = {
        "format": FORMAT, "key": key, "loci": list(features.loci),
        "answer": features.answer_scores is not None, "complete": bool(complete),
        "n_images": features.n_images,
        "bytes": int(sum(a.nbytes for a in arrays.values())),
        "lens": None if features.lens is None else features.lens.meta(),
        "lens_note": features.lens_note,
        "variants": list(features.variant_scores),
        "meta": meta or {},
    }
    text = json.dumps(sidecar, indent=1, sort_keys=True, default=str)
    atomic_write(meta_path, lambda fh: fh.write(text.encode()))
    return arrays_path


class CacheUnavailable(OSError):
    """The cache folder cannot be written (read-only, no permission): the lock cannot be taken."""


@contextlib.contextmanager
def locked(cache_dir: str | os.PathLike[str], key: str) -> Iterator[Path]:
    """Hold an exclusive cross-process lock on ``key`` (blocks until it is free).

    Raises :class:`CacheUnavailable` when the lock file cannot be created or opened.
    """
    root = Path(cache_dir)
    lock_path = root / f"{key}.lock"
    try:
        root.mkdir(parents=True, exist_ok=True)
        fh = open(lock_path, "a+b")
    except OSError as exc:
        raise CacheUnavailable(exc.errno, f"cannot take the lock {lock_path}: {exc.strerror or exc}") from exc
    with fh:
        try:
            import fcntl
        except ImportError:  # Windows: no flock; concurrent workers may both extract (still safe)
            yield lock_path
            return
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield lock_path
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def cached_features(
    cache_dir: str | os.PathLike[str] | None, key: str, compute: Any, meta: dict[str, Any] | None = None,
    need: Need | None = None, whole: Need | None = None,
) -> tuple[Features, bool]:
    """``(features, hit)``: the entry of ``key``, or ``compute()`` saved under it, under the lock.

    Without ``need`` the entry must be complete (every locus and the answer) and ``compute()``
    makes a complete one. With ``need`` (what this run reads) an entry that holds it is a hit
    (restricted to ``need``: no model is loaded); otherwise ``compute(missing)`` extracts only
    what the entry lacks and the union is written back as one entry, atomically and under the
    lock, marked complete when it holds all of ``whole``. ``hit`` is true only when nothing was
    computed.

    ``cache_dir=None`` disables the cache (``compute`` every time). A cache that cannot be
    written still serves an entry that holds what is needed (read without the lock: entries are
    only ever replaced whole); otherwise the features are computed and not kept, with one
    :class:`CacheWarning`. Leftovers of killed runs (temporary files) are removed first.
    """

    def run(missing: Need | None) -> Features:
        return compute() if need is None else compute(missing)

    def usable(found: Features | None) -> bool:
        if found is None:
            return False
        return is_complete(cache_dir, key) if need is None else found.has(need)

    if cache_dir is None:
        return run(need), False
    remove_stale(cache_dir)
    try:
        with locked(cache_dir, key):  # only locked() raises CacheUnavailable
            found = load_features(cache_dir, key)
            if usable(found):
                return (found if need is None else found.only(need)), True
            if need is None or found is None:
                features = run(need)
            else:  # extract only what the entry lacks, keep the union
                features = found.merged(run(need.missing_from(found.loci, found.answer_scores is not None)))
            complete = need is None or (whole is not None and features.has(whole))
            try:
                save_features(cache_dir, key, features, meta, complete=complete)
            except OSError as exc:  # full disk, lost permission: the run goes on without keeping them
                warnings.warn(CacheWarning(f"could not keep the features in {cache_dir}: {exc}"), stacklevel=2)
            return (features if need is None else features.only(need)), False
    except CacheUnavailable as exc:
        found = load_features(cache_dir, key)
        if usable(found):
            return (found if need is None else found.only(need)), True
        warnings.warn(CacheWarning(f"the feature cache is not used: {exc}; the features are computed and not kept"),
                      stacklevel=2)
        return run(need), False
