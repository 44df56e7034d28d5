"""Cheap checks made before any test runs: weight files, the device, where outputs go.

Each problem is a :class:`~pytest_mllmprobe.errors.ConfigError` (exit code 4 under pytest) found
at plan time, instead of a traceback or a row of failing tests after minutes of work:

* every weight file of a local model folder is present, and each ``.safetensors`` file's header
  is read (8 bytes of length, the JSON header, never the tensors): a truncated or corrupt file
  is named with its size and the size its header needs;
* the asked device exists (``--mllm-device cuda`` on a machine without a GPU);
* output paths (the report folder, a baseline file) can be written.

Nothing here imports torch at module import; nothing reads the weights themselves.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

from .errors import ConfigError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SAVE_HINT = "save the model again with model.save_pretrained(path), or copy the missing files"
HEADER_LIMIT = 100 * 2**20  # safetensors refuses headers larger than 100 MB


def check_weights(folder: str | os.PathLike[str], flag: str = "--mllm-model") -> None:
    """Raise ConfigError when a saved model folder's weights are missing, truncated or corrupt."""
    root = Path(folder)
    indexes = [root / name for name in INDEX_NAMES if (root / name).is_file()]
    shards: set[Path] = set()
    for index in indexes:
        shards |= {root / name for name in _index_files(index, flag)}
    loose = {p for p in root.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES and not p.name.startswith(".")}
    if not shards and not loose:
        raise ConfigError(
            f"{flag} {str(root)!r} holds no weights: no *.safetensors or pytorch_model*.bin file beside "
            f"config.json; {SAVE_HINT}"
        )
    missing = sorted(p.name for p in shards if not p.is_file())
    if missing:
        raise ConfigError(
            f"{flag} {str(root)!r}: the weight index names {len(missing)} shard(s) that are not in the "
            f"folder ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); {SAVE_HINT}"
        )
    for path in sorted(shards | loose):
        if path.suffix == ".safetensors":
            problem = safetensors_problem(path)
        elif path.stat().st_size == 0:
            problem = "the file is empty"
        else:
            problem = None
        if problem:
            raise ConfigError(f"{flag} {str(root)!r}: weight file {path.name!r} is unreadable: {problem}; {SAVE_HINT}")


def _index_files(index: Path, flag: str) -> set[str]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not a mapping")
        return {str(v) for v in weight_map.values()}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"{flag}: the weight index {str(index)!r} is not a valid index ({type(exc).__name__}: {exc}); "
            f"{SAVE_HINT}"
        ) from None


def safetensors_problem(path: str | os.PathLike[str]) -> str | None:
    """Why a ``.safetensors`` file cannot be loaded, from its header alone; ``None`` when it can."""
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        return f"{size} bytes, shorter than the 8-byte header length"
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > min(size - 8, HEADER_LIMIT):
            return f"its header claims {length} bytes, but the file has {size} (truncated or not safetensors)"
        raw = handle.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
        ends = [int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"]
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, IndexError) as exc:
        return f"its header is not valid safetensors JSON ({type(exc).__name__})"
    needed = 8 + length + max(ends, default=0)
    if size < needed:
        return f"{size} bytes, but its header needs {needed} (the file is truncated)"
    return None


def check_device(device: str) -> None:
    """Raise ConfigError when ``--mllm-device`` names a device this machine does not have."""
    if device == "auto" or device == "cpu":
        return
    from .models.load import pick_device

    torch_device = pick_device(device)  # ConfigError without CUDA
    import torch

    if torch_device.type == "cuda" and torch_device.index is not None and torch_device.index >= torch.cuda.device_count():
        raise ConfigError(
            f"--mllm-device {device!r}: this machine has {torch.cuda.device_count()} GPU(s) "
            f"(cuda:0 to cuda:{torch.cuda.device_count() - 1}); use one of them, cuda or auto"
        )


def check_output(path: str | os.PathLike[str] | None, what: str, *, folder: bool) -> None:
    """Raise ConfigError when ``path`` cannot be written: a folder where a file must go (or the
    reverse), or no permission to create it. Nothing is created."""
    if not path:
        return
    target = Path(path).expanduser()
    if folder:
        from .report.writer import folder_problem

        problem = folder_problem(target)
        if problem:
            raise ConfigError(f"{what} {problem}")
    if not folder and target.is_dir():
        raise ConfigError(f"{what} {str(path)!r} is a folder; give the path of a .json file")
    start = target if folder and target.exists() else target.parent
    probe: Any = start
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{what} {str(path)!r}: {str(probe)!r} is a file, so nothing can be created below it")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {str(path)!r}: no permission to write in {str(probe)!r}; choose another path")
