"""Reading one image, whatever its mode, as the 8-bit RGB picture a model's processor expects.

Conversion rules (also in ``docs/data.md``):

* 8-bit modes (``L``, ``RGB``, ``RGBA``, ``P``, ``1`` ...) are converted by Pillow; alpha is dropped.
* Integer images wider than 8 bits (16-bit PNG/TIFF ``I;16``, 32-bit ``I``, numpy ``uint16``,
  ``int16``, ``int32`` ...) are **min-max scaled per image** to 0..255: the darkest pixel becomes
  0, the brightest 255, linearly in between. Nothing is clipped and nothing wraps; the price is
  that absolute intensities are not comparable between images (use DICOM windowing for that).
* Float images (``F``, numpy ``float*``): values already within [0, 1] are taken as the usual
  0..1 intensity scale and multiplied by 255; any other range is min-max scaled like 16-bit.
  NaN and inf are set to the lowest finite value.
* DICOM: see :mod:`pytest_mllmprobe.data.dicom` (rescale slope/intercept, then the file's own
  window, else min-max; ``MONOCHROME1`` inverted).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from .dicom import dicom_problem, read_dicom
from .pixels import SKIP_HINT, scale_to_uint8

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")
DICOM_SUFFIXES = (".dcm", ".dicom")
WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")

_DICOM_MAGIC_OFFSET = 128


def is_dicom(path: str | Path) -> bool:
    """A ``.dcm``/``.dicom`` file, or any file with the ``DICM`` marker after its 128-byte preamble."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return False
    try:
        with open(path, "rb") as handle:
            head = handle.read(_DICOM_MAGIC_OFFSET + 4)
    except OSError:
        return False
    return head[_DICOM_MAGIC_OFFSET:] == b"DICM"


def is_image_file(path: Path) -> bool:
    """Whether a file in a data folder is a sample (an image or a DICOM file)."""
    if path.name.startswith("."):
        return False
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES or suffix in DICOM_SUFFIXES:
        return True
    return suffix == "" and is_dicom(path)


def array_problem(array: Any) -> str | None:
    """Why ``array`` cannot be an image, or ``None`` when it can."""
    try:
        array = np.asarray(array)
    except Exception as exc:  # noqa: BLE001 - any object a user function returns
        return f"not an array ({type(exc).__name__}: {exc})"
    if array.dtype.kind not in "biuf":
        return f"dtype {array.dtype} is not numeric"
    if array.ndim == 3 and array.shape[-1] not in (1, 3, 4) and array.shape[0] in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (1, 3, 4)):
        if 0 in array.shape:
            return f"empty image of shape {array.shape}"
        return None
    return (
        f"shape {array.shape} is not an image; expected (H, W), (H, W, C) or (C, H, W) "
        "with C in 1, 3, 4"
    )


def to_rgb(image: Any):
    """A PIL image or numpy array as an RGB PIL image (see the module docstring for the rules)."""
    from PIL import Image

    if isinstance(image, Image.Image):
        if image.mode in WIDE_MODES:
            return Image.fromarray(scale_to_uint8(np.asarray(image)), mode="L").convert("RGB")
        if image.mode == "RGB":
            return image
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        return image.convert("RGB")
    problem = array_problem(image)
    if problem:
        raise ValueError(problem)
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 3 and array.shape[-1] == 4:
        array = array[..., :3]
    array = np.ascontiguousarray(scale_to_uint8(array))
    if array.ndim == 2:
        return Image.fromarray(array, mode="L").convert("RGB")
    return Image.fromarray(array, mode="RGB")


def load_image(path: str | Path):
    """Open an image file (any Pillow format, or DICOM) as RGB; :class:`ConfigError` if unreadable."""
    if is_dicom(path):
        return read_dicom(path)
    return decoded(path, f"cannot read image {str(path)!r}", "remove or replace the file")


def file_problem(path: str | Path, *, decode: bool = False) -> str | None:
    """Why the image file at ``path`` is unreadable, or ``None``: a cheap check made at load time.

    Pillow formats are opened and run through the format's own integrity check (``verify``:
    PNG chunk CRCs and truncation, for example); DICOM files are parsed without decoding pixels.
    With ``decode`` (``--mllm-skip-bad-images``) every image is also decoded in full, so that a
    file that only fails when its pixels are read (a truncated JPEG passes ``verify``) is skipped
    here rather than stopping the extraction later.
    """
    from PIL import Image

    if is_dicom(path):
        problem = dicom_problem(path)
        if problem is None and decode:
            try:
                read_dicom(path)
            except ConfigError as exc:
                return str(exc)
        return problem
    try:
        with Image.open(path) as image:
            image.verify()
        if decode:
            with Image.open(path) as image:
                image.load()
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for broken files
        return f"{type(exc).__name__}: {exc}"
    return None


class StoredImage:
    """An encoded image (PNG, JPEG ...) inside a table file, read only when asked for.

    ``read(row)`` returns the encoded bytes of row ``row`` (the table reader keeps one record
    batch at a time); ``digest`` is :func:`bytes_hash` of those bytes, taken when the source was
    checked at load time, so hashing a dataset reads nothing again.
    """

    __slots__ = ("read", "row", "digest")

    def __init__(self, read: Callable[[int], bytes], row: int, digest: str) -> None:
        self.read = read
        self.row = row
        self.digest = digest

    def load(self, where: str):
        """The image as RGB; :class:`ConfigError` naming ``where`` when it cannot be decoded."""
        return decoded(io.BytesIO(self.read(self.row)), f"{where}: cannot decode image", "remove or replace it")


def bytes_problem(data: bytes, *, decode: bool = False) -> str | None:
    """:func:`file_problem` for encoded image bytes held in a table."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
        if decode:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for broken data
        return f"{type(exc).__name__}: {exc}"
    return None


def bytes_hash(data: bytes) -> str:
    """:func:`file_hash` of bytes held in memory: equal for the same image in a file or a table."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def file_hash(path: str | Path) -> str:
    """Hash of a file's bytes: equal for byte-identical copies."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def quick_file_hash(path: str | Path, chunk: int = 8192) -> str:
    """Size plus the first and last ``chunk`` bytes: cheap, and changes when a file is replaced."""
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str(size).encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(chunk))
        if size > chunk:
            handle.seek(max(chunk, size - chunk))
            digest.update(handle.read(chunk))
    return digest.hexdigest()


def memory_hash(image: Any) -> str:
    """Hash of an in-memory image's pixels, shape and dtype/mode (a table image: its bytes)."""
    from PIL import Image

    if isinstance(image, StoredImage):
        return image.digest
    digest = hashlib.blake2b(digest_size=16)
    if isinstance(image, Image.Image):
        digest.update(f"{image.mode}{image.size}".encode())
        digest.update(image.tobytes())
    else:
        array = np.ascontiguousarray(image)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def decoded(source: Any, what: str, fix: str) -> np.ndarray:
    """The image at ``source`` (a path or a file object) as 8-bit RGB; an unreadable one is a
    :class:`ConfigError` saying ``what``, the reader's reason, ``fix`` and how to skip it."""
    from PIL import Image

    try:
        with Image.open(source) as image:
            image.load()
            return to_rgb(image)
    except (OSError, ValueError, SyntaxError) as exc:
        raise ConfigError(f"{what}: {exc}; {fix}, or skip unreadable images with {SKIP_HINT}") from exc
