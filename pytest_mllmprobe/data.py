"""Datasets: an ImageFolder (``root/<class>/<image>``), loaded lazily, split deterministically."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")


@dataclass(frozen=True)
class Dataset:
    """Images with integer labels into ``class_names``.

    ``paths`` are image files; :meth:`image` reads one as RGB. ``ids`` are stable sample ids
    (paths relative to ``root``), used in results and baselines.
    """

    root: str
    paths: tuple[str, ...]
    labels: np.ndarray
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, index: int):
        """Sample ``index`` as an RGB PIL image."""
        return load_image(self.paths[index])

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(Path(p).relative_to(self.root).as_posix() for p in self.paths)

    @property
    def fingerprint(self) -> str:
        """A hash of the relative paths, labels and file sizes: changes when the data does."""
        digest = hashlib.sha256()
        for path, label in zip(self.paths, self.labels):
            rel = Path(path).relative_to(self.root).as_posix()
            digest.update(f"{rel}\0{int(label)}\0{Path(path).stat().st_size}\n".encode())
        return digest.hexdigest()[:16]


def load_image_folder(root: str | Path, *, max_samples: int | None = None, seed: int = 0) -> Dataset:
    """Read ``root/<class>/<image>``; classes sorted by folder name.

    ``max_samples`` keeps a class-stratified, seeded subset.
    """
    root = Path(root)
    if not root.exists():
        raise ConfigError(
            f"--mllm-data {str(root)!r} does not exist; expected a folder with one sub-folder "
            "per class (data/<class>/<image>)"
        )
    if not root.is_dir():
        raise ConfigError(
            f"--mllm-data {str(root)!r} is a file; expected a folder with one sub-folder per "
            "class (data/<class>/<image>)"
        )
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    paths: list[str] = []
    labels: list[int] = []
    counts: dict[str, int] = {}
    for index, name in enumerate(classes):
        files = sorted(
            p for p in (root / name).rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        counts[name] = len(files)
        paths.extend(str(p) for p in files)
        labels.extend([index] * len(files))
    present = [c for c in classes if counts[c] > 0]
    if not present:
        raise ConfigError(
            f"--mllm-data {str(root)!r} holds no images; expected data/<class>/<image> with "
            f"image files ({', '.join(IMAGE_SUFFIXES)}) in at least two class folders"
        )
    if len(present) < 2:
        raise ConfigError(
            f"--mllm-data {str(root)!r} has only one class with images ({present[0]!r}); a probe "
            "needs at least two classes: add a sub-folder per class (data/<class>/<image>)"
        )
    empty = [c for c in classes if counts[c] == 0]
    if empty:
        raise ConfigError(
            f"--mllm-data {str(root)!r}: class folder(s) {', '.join(map(repr, empty))} hold no "
            "images; remove them or add images"
        )
    dataset = Dataset(str(root), tuple(paths), np.asarray(labels, dtype=np.int64), tuple(classes))
    if max_samples is not None and max_samples < len(dataset):
        dataset = subsample(dataset, max_samples, seed)
    return dataset


def subsample(dataset: Dataset, n: int, seed: int) -> Dataset:
    """A class-stratified, seeded subset of ``n`` images (order kept)."""
    rng = np.random.default_rng(seed)
    k = len(dataset.class_names)
    if n < 2 * k:
        raise ConfigError(
            f"--mllm-max-samples {n} is too small for {k} classes; use at least {2 * k}"
        )
    keep: list[int] = []
    fraction = n / len(dataset)
    for c in range(k):
        idx = np.flatnonzero(dataset.labels == c)
        take = max(2, int(round(len(idx) * fraction)))
        keep.extend(rng.choice(idx, size=min(take, len(idx)), replace=False).tolist())
    keep.sort()
    return Dataset(
        dataset.root,
        tuple(dataset.paths[i] for i in keep),
        dataset.labels[keep],
        dataset.class_names,
    )


def split_indices(labels: np.ndarray, test_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified train/test split of sample indices."""
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels)
    counts = np.bincount(labels)
    small = [int(c) for c in np.flatnonzero((counts > 0) & (counts < 2))]
    if small:
        raise ConfigError(
            f"class index(es) {small} have fewer than 2 images; a stratified train/test split "
            "needs at least 2 per class (add images or remove the class)"
        )
    n_classes = int((counts > 0).sum())
    n_test = int(np.ceil(test_size * len(labels)))
    if n_test < n_classes or len(labels) - n_test < n_classes:
        raise ConfigError(
            f"--mllm-test-size {test_size} with {len(labels)} images leaves {n_test} test and "
            f"{len(labels) - n_test} train images for {n_classes} classes; each side needs at "
            "least one image per class: add images or change --mllm-test-size"
        )
    index = np.arange(len(labels))
    train, test = train_test_split(
        index, test_size=test_size, stratify=labels, random_state=seed, shuffle=True
    )
    return np.sort(train), np.sort(test)


def load_image(path: str):
    """Open an image as RGB. 16-bit and float images are min-max scaled to 8 bits."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                array = np.asarray(image, dtype=np.float64)
                low, high = float(array.min()), float(array.max())
                scaled = (array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array)
                image = Image.fromarray(scaled.round().astype(np.uint8), mode="L")
            return image.convert("RGB")
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot read image {path!r}: {exc}; remove or replace the file"
        ) from exc
