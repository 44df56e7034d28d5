"""Deterministic synthetic "breast ultrasound" images in three classes.

A crude imitation of BUSI-like B-mode images, small enough to bundle and to learn in
minutes on a CPU:

* every image has a speckled background with random gain, a depth gradient and a few faint
  horizontal tissue layers;
* ``normal``: no lesion;
* ``benign``: a smooth, wider-than-tall oval, dark inside, with a sharp edge and a bright
  band below it (posterior acoustic enhancement, as behind a cyst or fibroadenoma);
* ``malignant``: an irregular, spiculated, taller-than-wide dark mass with a blurred edge,
  heterogeneous inside, and a dark column below it (posterior acoustic shadowing).

Lesion position, size, shape, contrast, gain and noise vary per image; mean brightness
alone does not separate the classes. Each image is drawn from its own generator seeded by
``(seed, class index, image index)``, so an image does not depend on how many others are
drawn with it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES: tuple[str, ...] = ("normal", "benign", "malignant")


def make_images(n_per_class: int, *, size: int = 32, seed: int = 0) -> list[tuple[Image.Image, str]]:
    """``n_per_class`` grayscale (mode ``"L"``) images of each class, as ``(image, class)``.

    Grouped by class in :data:`CLASSES` order; fully determined by ``seed``.
    """
    if n_per_class < 0:
        raise ValueError(f"n_per_class must be >= 0, got {n_per_class}")
    if size < 16:
        raise ValueError(f"size must be >= 16 pixels, got {size}")
    images = []
    for label, name in enumerate(CLASSES):
        for index in range(n_per_class):
            rng = np.random.default_rng(np.random.SeedSequence([seed, label, index]))
            pixels = _render(name, size, rng)  # 2-D uint8: PIL makes it mode "L"
            images.append((Image.fromarray(pixels), name))
    return images


def write_image_folder(images: list[tuple[Image.Image, str]], root: str | Path) -> Path:
    """Write ``root/<class>/<class>_<i:03d>.png`` (``i`` counts within each class)."""
    root = Path(root)
    counts: dict[str, int] = {}
    for image, name in images:
        index = counts.get(name, 0)
        counts[name] = index + 1
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{name}_{index:03d}.png", format="PNG", optimize=True)
    return root


def _render(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One image as uint8 pixels."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size  # 0..1, y grows with depth
    tissue = _background(yy, rng)
    if name == "benign":
        tissue = _benign(tissue, yy, xx, size, rng)
    elif name == "malignant":
        tissue = _malignant(tissue, yy, xx, size, rng)
    elif name != "normal":
        raise ValueError(f"unknown class {name!r}; expected one of {', '.join(CLASSES)}")
    speckle = _smooth(rng.rayleigh(scale=1.0, size=(size, size)), passes=1) / np.sqrt(np.pi / 2)
    gain = rng.uniform(0.35, 0.8)
    image = gain * tissue * (0.55 + 0.45 * speckle) + rng.normal(0.0, 0.03, size=(size, size))
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _background(yy: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Echogenicity of healthy tissue: depth gradient plus faint horizontal layers."""
    tissue = 1.0 + rng.uniform(-0.45, 0.15) * yy
    for _ in range(rng.integers(1, 4)):
        depth = rng.uniform(0.1, 0.95)
        width = rng.uniform(0.02, 0.06)
        tissue = tissue + rng.uniform(-0.25, 0.25) * np.exp(-((yy - depth) ** 2) / (2 * width**2))
    return np.clip(tissue, 0.2, 1.6)


def _benign(tissue, yy, xx, size, rng):
    """Smooth oval, sharp edge, posterior enhancement."""
    cx, cy = rng.uniform(0.3, 0.7), rng.uniform(0.25, 0.6)
    rx = rng.uniform(0.13, 0.24)
    ry = rx * rng.uniform(0.5, 0.85)  # wider than tall
    angle = rng.uniform(-0.35, 0.35)
    u, v = _rotate(xx - cx, yy - cy, angle)
    r = np.sqrt((u / rx) ** 2 + (v / ry) ** 2)
    inside = _sigmoid((1.0 - r) * 12.0)  # sharp edge
    below = _sigmoid((rx * 0.8 - np.abs(xx - cx)) / 0.03) * _sigmoid((yy - cy) / 0.03)
    fade = np.exp(-np.clip(yy - cy - ry, 0, None) / rng.uniform(0.15, 0.4))
    enhancement = 1.0 + rng.uniform(0.15, 0.4) * below * (1 - inside) * fade
    lesion_level = rng.uniform(0.08, 0.3)
    return tissue * enhancement * (1 - inside) + lesion_level * inside


def _malignant(tissue, yy, xx, size, rng):
    """Irregular, spiculated, taller-than-wide mass with a posterior shadow."""
    cx, cy = rng.uniform(0.3, 0.7), rng.uniform(0.25, 0.55)
    base = rng.uniform(0.11, 0.2)
    aspect = rng.uniform(1.1, 1.6)  # taller than wide
    theta = np.arctan2((yy - cy) / aspect, xx - cx)
    radius = np.ones_like(theta)
    for k in range(2, 5):  # lobulation
        radius += rng.uniform(0.05, 0.18) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    spikes = rng.integers(5, 10)
    radius += rng.uniform(0.15, 0.35) * np.maximum(np.cos(spikes * theta + rng.uniform(0, 2 * np.pi)), 0) ** 3
    r = np.sqrt((xx - cx) ** 2 + ((yy - cy) / aspect) ** 2) / (base * radius)
    inside = _sigmoid((1.0 - r) * 5.0)  # blurred, indistinct margin
    texture = 1.0 + 0.5 * (rng.random(tissue.shape) - 0.5)
    width = base * rng.uniform(0.7, 1.1)
    column = _sigmoid((width - np.abs(xx - cx)) / 0.03) * _sigmoid((yy - cy - base * aspect * 0.6) / 0.03)
    shadow = 1.0 - rng.uniform(0.35, 0.6) * column
    lesion_level = rng.uniform(0.08, 0.3)
    return tissue * shadow * (1 - inside) + lesion_level * texture * inside


def _rotate(x: np.ndarray, y: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = np.cos(angle), np.sin(angle)
    return c * x + s * y, -s * x + c * y


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _smooth(a: np.ndarray, passes: int = 1) -> np.ndarray:
    """3x3 box blur with edge padding, ``passes`` times (speckle grain of about 2 pixels)."""
    for _ in range(passes):
        padded = np.pad(a, 1, mode="edge")
        a = sum(padded[i : i + a.shape[0], j : j + a.shape[1]] for i in range(3) for j in range(3)) / 9.0
    return a
