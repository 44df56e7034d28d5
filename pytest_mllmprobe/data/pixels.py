"""Wide-range pixel values to 8 bits, by the rules of :mod:`.images` (shared with :mod:`.dicom`)."""

from __future__ import annotations

import numpy as np

SKIP_HINT = "--mllm-skip-bad-images (skip_bad_images=True in Python)"


def scale_to_uint8(array: np.ndarray) -> np.ndarray:
    """Scale a wide-range array to ``uint8`` by the module's rules (float 0..1 x255, else min-max)."""
    array = np.asarray(array)
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    values = _finite(array.astype(np.float64))
    if np.issubdtype(array.dtype, np.floating) and values.min() >= 0.0 and values.max() <= 1.0:
        return np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8)
    return minmax_to_uint8(values)


def minmax_to_uint8(array: np.ndarray) -> np.ndarray:
    """Linear map of the image's own minimum..maximum to 0..255 (a constant image is black)."""
    values = _finite(np.asarray(array, dtype=np.float64))
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values - low) / (high - low) * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _finite(values: np.ndarray) -> np.ndarray:
    finite = np.isfinite(values)
    if finite.all():
        return values
    fill = values[finite].min() if finite.any() else 0.0
    return np.where(finite, values, fill)
