"""In-memory sources: MedMNIST-style ``.npz`` archives and Python ``module:function`` entries."""

from __future__ import annotations

import os
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ..entry import call_entry_point
from ..errors import ConfigError, close_matches
from .config import read_sidecar_names
from .dataset import Samples
from .images import array_problem, file_problem

NPZ_SPLITS = ("train", "val", "test")
ENTRY_SHAPE = (
    "(images, labels) or (images, labels, class_names): images a list or array of PIL images, "
    "numpy arrays or file paths; labels ints (indices into class_names) or strings"
)


# --- .npz ----------------------------------------------------------------------------------

def read_npz(path: Path, skip: bool) -> Samples:
    """``train_images``/``train_labels``, ``val_*``, ``test_*`` (or plain ``images``/``labels``).

    train and val form the train side, test the test side of a predefined split. Class names
    come from ``<name>.yaml`` beside the archive (by label index), else the label numbers.
    """
    name = f"npz {str(path)!r}"
    try:
        archive = np.load(path, allow_pickle=False)
        keys = list(archive.files)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"cannot read {name}: {exc}; expected a numpy .npz archive") from exc
    parts: list[tuple[str | None, str, str]] = []
    for split in NPZ_SPLITS:
        image_key, label_key = f"{split}_images", f"{split}_labels"
        if image_key in keys or label_key in keys:
            parts.append((split, image_key, label_key))
    if not parts and ("images" in keys or "labels" in keys):
        parts.append((None, "images", "labels"))
    if not parts:
        raise ConfigError(
            f"{name} holds {keys}; expected train_images/train_labels, val_*, test_* (MedMNIST) "
            "or images/labels"
        )
    for _, image_key, label_key in parts:
        for key, other in ((image_key, label_key), (label_key, image_key)):
            if key not in keys:
                raise ConfigError(f"{name} has {other!r} but no {key!r}; add it or remove {other!r}")
    names = read_sidecar_names(path)
    splits = {split for split, _, _ in parts}
    predefined = "test" in splits and bool(splits & {"train", "val"})
    samples = Samples(
        root=str(path), source="npz", in_memory=[], is_test=[] if predefined else None,
    )
    seen_labels: set[int] = set()
    for split, image_key, label_key in parts:
        images = _member(archive, image_key, name)
        labels = _int_labels(_member(archive, label_key, name), f"{name}: {label_key!r}")
        if len(images) != len(labels):
            raise ConfigError(
                f"{name}: {image_key!r} holds {len(images)} images but {label_key!r} holds "
                f"{len(labels)} labels; they must have the same length"
            )
        if len(images) and (images.ndim not in (3, 4) or array_problem(images[0])):
            raise ConfigError(
                f"{name}: {image_key!r} has shape {images.shape}; expected (N, H, W) or (N, H, W, C)"
            )
        prefix = "npz:" if split is None else f"npz:{split}:"
        for i, label in enumerate(labels.tolist()):
            where = f"{name} {image_key}[{i}]"
            samples.add(
                f"{prefix}{i}", _label_name(label, names, where, path), where, image=images[i],
                is_test=split == "test",
            )
            seen_labels.add(label)
    if names is None:
        samples.classes = [str(k) for k in sorted(seen_labels)]
    else:
        samples.classes = _unique_names([n for n in names if n is not None], path)
    return samples


def _member(archive: Any, key: str, name: str) -> np.ndarray:
    """One array of the archive; object arrays (which need pickle) and damaged members are usage errors."""
    try:
        return archive[key]
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise ConfigError(
                f"{name}: {key!r} is an array of Python objects, which only pickle can read (and "
                "pickle is never loaded); save it as a numeric array: np.stack(images) for images "
                "of one size, integer indices for labels"
            ) from None
        raise ConfigError(f"{name}: cannot read {key!r}: {exc}; save the archive again with np.savez") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise ConfigError(f"{name}: cannot read {key!r} ({type(exc).__name__}: {exc}); the archive is damaged") from None


def _int_labels(labels: np.ndarray, what: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise ConfigError(
            f"{what} has shape {labels.shape}; expected one label per image, shape (N,) or (N, 1) "
            "(multi-label data is not supported)"
        )
    if labels.dtype.kind == "f" and np.all(np.isfinite(labels)) and np.all(labels == np.round(labels)):
        labels = labels.astype(np.int64)
    if labels.dtype.kind not in "iu":
        raise ConfigError(f"{what} has dtype {labels.dtype}; expected integer class indices")
    return labels.astype(np.int64)


def _label_name(label: int, names: list[str | None] | None, where: str, path: Path) -> str:
    if names is None:
        return str(label)
    if 0 <= label < len(names) and names[label] is not None:
        return names[label]  # type: ignore[return-value]
    raise ConfigError(
        f"{where}: label {label} has no class name in {str(path.with_suffix('.yaml'))!r}, which "
        f"names labels {[k for k, n in enumerate(names) if n is not None]}; add its name there"
    )


def _unique_names(names: list[str], where: Any) -> list[str]:
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{str(where)!r}: class name {dupes[0]!r} is given twice; name each class once")
    return names


# --- module:function -----------------------------------------------------------------------

def read_entry(spec: str, skip: bool) -> Samples:
    """Call ``module:function`` (no arguments); it returns :data:`ENTRY_SHAPE`."""
    result = call_entry_point(spec, "--mllm-data")
    if not isinstance(result, (tuple, list)) or len(result) not in (2, 3):
        raise ConfigError(f"--mllm-data {spec!r} returned {type(result).__name__}; expected {ENTRY_SHAPE}")
    images, labels = result[0], result[1]
    class_names = None if len(result) == 2 or result[2] is None else result[2]
    if class_names is not None:
        if isinstance(class_names, (str, bytes)) or not hasattr(class_names, "__iter__"):
            raise ConfigError(
                f"--mllm-data {spec!r} returned class_names {class_names!r}; expected a list of "
                f"strings, one per class index ({ENTRY_SHAPE})"
            )
        class_names = [str(c) for c in class_names]
    try:
        n_images, n_labels = len(images), len(labels)
    except TypeError:
        raise ConfigError(
            f"--mllm-data {spec!r}: images and labels must be sequences; expected {ENTRY_SHAPE}"
        ) from None
    if n_images != n_labels:
        raise ConfigError(
            f"--mllm-data {spec!r} returned {n_images} images but {n_labels} labels; they must "
            "have the same length"
        )
    if class_names is not None:
        _unique_names(class_names, spec)
    samples = Samples(root=spec, source="entry", in_memory=[])
    raw = [_plain(v) for v in _raw(labels)]
    names = [_entry_label(v, class_names, f"--mllm-data {spec!r} sample entry:{i}") for i, v in enumerate(raw)]
    for i, (image, name) in enumerate(zip(images, names)):
        sample_id, where = f"entry:{i}", f"--mllm-data {spec!r} sample entry:{i}"
        if isinstance(image, (str, os.PathLike)):
            file = Path(image).expanduser()
            if not file.is_file():
                raise ConfigError(
                    f"{where}: file {str(image)!r} does not exist (relative paths are taken from "
                    f"the working directory {os.getcwd()!r}); return existing paths"
                )
            problem = file_problem(file, decode=skip)
            if problem:
                samples.bad(sample_id, where, problem, skip)
                continue
            samples.add(sample_id, name, where, path=str(file.resolve()))
            continue
        problem = None if _is_pil(image) else array_problem(image)
        if problem:
            samples.bad(sample_id, where, problem, skip)
            continue
        samples.add(sample_id, name, where, image=image if _is_pil(image) else np.asarray(image))
    if class_names is not None:
        samples.classes = class_names
    elif all(isinstance(v, int) for v in raw):
        samples.classes = [str(k) for k in sorted(set(raw))]
    else:
        samples.classes = sorted(set(names))
    return samples


def _raw(labels: Any) -> list[Any]:
    if _is_column(labels):
        return np.asarray(labels)[:, 0].tolist()
    return np.asarray(labels).tolist() if isinstance(labels, np.ndarray) else list(labels)


def _is_column(labels: Any) -> bool:
    return isinstance(labels, np.ndarray) and labels.ndim == 2 and labels.shape[1] == 1


def _is_pil(image: Any) -> bool:
    from PIL import Image

    return isinstance(image, Image.Image)


def _plain(label: Any) -> Any:
    if isinstance(label, np.generic):
        label = label.item()
    if isinstance(label, float) and label.is_integer():
        label = int(label)
    return label


def _entry_label(label: Any, class_names: list[str] | None, where: str) -> str:
    if isinstance(label, bool) or not isinstance(label, (int, str)):
        raise ConfigError(f"{where}: label {label!r} is neither an int nor a string; expected {ENTRY_SHAPE}")
    if class_names is None:
        return str(label)
    if isinstance(label, str):
        if label not in class_names:
            raise ConfigError(
                f"{where}: label {label!r} is not in the class_names returned{close_matches(label, class_names)}; "
                f"class_names are {class_names}"
            )
        return label
    if not 0 <= label < len(class_names):
        raise ConfigError(
            f"{where}: label {label} is outside class_names (indices 0..{len(class_names) - 1}: "
            f"{class_names}); fix the label or add the class name"
        )
    return class_names[label]
