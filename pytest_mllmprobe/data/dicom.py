"""DICOM files to 8-bit RGB, faithfully; needs the optional ``pydicom`` (``pytest-mllmprobe[dicom]``).

Greyscale conversion, in the order the DICOM standard applies it (PS3.3 C.11):

1. Modality LUT: ``value * RescaleSlope + RescaleIntercept`` (Hounsfield units for CT);
   slope 1 and intercept 0 when absent.
2. VOI window: the file's first ``WindowCenter``/``WindowWidth`` with the standard linear
   function (C.11.2.1.2), values below the window black, above it white. Without a window (or
   with a width of 1 or less), min-max of the image, as for 16-bit PNGs.
3. ``MONOCHROME1`` (high values dark) is inverted so that the picture looks as a reader sees it.

Colour files (``SamplesPerPixel`` 3) are taken as RGB (YBR converted), wide ones min-max scaled.
Multi-frame files are refused: export one frame per file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, require_extra
from .pixels import SKIP_HINT, minmax_to_uint8, scale_to_uint8

DICOM_EXTRA = 'pip install "pytest-mllmprobe[dicom]"'


def require_pydicom(what: str) -> Any:
    """Import pydicom or raise a :class:`ConfigError` naming the optional extra."""
    return require_extra("pydicom", f"{what} is a DICOM file, and reading DICOM needs the optional pydicom "
                                    f"package: {DICOM_EXTRA} (or pip install pydicom)")
    return pydicom


def _read(path: str | Path, **kwargs: Any) -> Any:
    pydicom = require_pydicom(repr(str(path)))
    return pydicom.dcmread(str(path), **kwargs)


def dicom_problem(path: str | Path) -> str | None:
    """Why a DICOM file cannot be an image (parsed, pixels not decoded), or ``None``."""
    try:
        ds = _read(path)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for broken files
        return f"not a readable DICOM file ({type(exc).__name__}: {exc})"
    return _dataset_problem(ds)


def _dataset_problem(ds: Any) -> str | None:
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        return "the DICOM file holds no pixel data"
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        return f"multi-frame DICOM ({frames} frames) is not supported; export one frame per file"
    return None


def window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """The DICOM linear VOI function (PS3.3 C.11.2.1.2) to 0..255 floats."""
    low = center - 0.5 - (width - 1) / 2
    high = center - 0.5 + (width - 1) / 2
    out = ((values - (center - 0.5)) / (width - 1) + 0.5) * 255.0
    out = np.where(values <= low, 0.0, out)
    return np.where(values > high, 255.0, out)


def _first(value: Any) -> float | None:
    """A DICOM number, or the first of a multi-valued one (pydicom's MultiValue is a list)."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else None
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def dicom_to_uint8(ds: Any) -> np.ndarray:
    """The pixels of a parsed DICOM dataset as an 8-bit (H, W) or (H, W, 3) array."""
    pixels = np.asarray(ds.pixel_array)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if samples > 1:
        if photometric.startswith("YBR") and _needs_colour_conversion():
            from pydicom.pixel_data_handlers.util import convert_color_space

            pixels = convert_color_space(pixels, photometric, "RGB")
        return scale_to_uint8(pixels)
    values = pixels.astype(np.float64)
    slope = _first(ds.get("RescaleSlope", None))
    intercept = _first(ds.get("RescaleIntercept", None))
    values = values * (1.0 if slope is None else slope) + (0.0 if intercept is None else intercept)
    center = _first(ds.get("WindowCenter", None))
    width = _first(ds.get("WindowWidth", None))
    if center is not None and width is not None and width > 1:
        out = np.clip(np.rint(window(values, center, width)), 0, 255).astype(np.uint8)
    else:
        out = minmax_to_uint8(values)
    if photometric == "MONOCHROME1":
        out = 255 - out
    return out


def _needs_colour_conversion() -> bool:
    import pydicom

    return int(str(pydicom.__version__).split(".")[0]) < 3


def read_dicom(path: str | Path):
    """A DICOM file as an RGB PIL image (rules in the module docstring)."""
    from PIL import Image

    try:
        ds = _read(path)
        problem = _dataset_problem(ds)
        if problem:
            raise ValueError(problem)
        array = dicom_to_uint8(ds)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - decoding errors (missing codec, bad data)
        raise ConfigError(
            f"cannot read DICOM image {str(path)!r}: {exc}; remove or replace the file (compressed "
            "transfer syntaxes may need pylibjpeg or gdcm installed), or skip unreadable images with "
            f"{SKIP_HINT}"
        ) from exc
    mode = "L" if array.ndim == 2 else "RGB"
    return Image.fromarray(np.ascontiguousarray(array), mode=mode).convert("RGB")
