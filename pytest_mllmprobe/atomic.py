"""Atomic writes: a reader sees the old file (or folder) or the new one, never half of one.

Used for everything the package writes that is read back: feature caches, baselines, reports.
Temporary files and folders are named ``.<name>.<host>-<pid>.<random>.tmp`` beside their
target, so that :func:`remove_stale` can tell the leftovers of a killed run (a process of this
host that no longer exists, or anything older than a day) from the work of a live one (an
xdist worker writing the same cache right now).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

STALE_AFTER_S = 24 * 3600
OLD_SUFFIX = ".old"


def _prefix(name: str) -> str:
    host = socket.gethostname().replace(".", "_").replace("-", "_") or "host"
    return f".{name}.{host}-{os.getpid()}."


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(handle)`` on a temporary file beside ``path``, flush it to disk, then rename
    it over ``path``. On any error the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_prefix(path.name), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """:func:`atomic_write` of a bytes object."""
    return atomic_write(path, lambda handle: handle.write(data))


def _owner_gone(name: str) -> bool:
    """Whether the ``<host>-<pid>`` in a temporary name is a dead process of this host."""
    parts = name.split(".")
    tag = next((p for p in reversed(parts) if "-" in p and p.rsplit("-", 1)[1].isdigit()), None)
    if tag is None:
        return False
    host, pid = tag.rsplit("-", 1)
    if host != socket.gethostname().replace(".", "_").replace("-", "_"):
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError, ValueError):
        return False
    return False


def remove_stale(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files and folders that killed runs left in ``folder``; the removed paths.

    A leftover is removed when its writer (host and pid in its name) is gone, or when it is older
    than a day; a temporary of a live process is left alone. A report folder whose swap was cut
    between its two renames (only ``.<name>.<...>.old`` left) is put back in place first.
    """
    root = Path(folder)
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    now = time.time()
    for entry in root.iterdir():
        if not entry.name.startswith(".") or not entry.name.endswith((".tmp", OLD_SUFFIX)):
            continue
        try:
            old = now - entry.lstat().st_mtime > STALE_AFTER_S
        except OSError:
            continue
        if not (old or _owner_gone(entry.name)):
            continue
        if entry.name.endswith(OLD_SUFFIX) and entry.is_dir():
            target = root / entry.name[1:].rsplit(".", 3)[0]  # .<name>.<host>-<pid>.swap.old
            if not target.exists():  # the swap was cut: the old folder is the only report left
                with contextlib.suppress(OSError):
                    entry.rename(target)
                    continue
        with contextlib.suppress(OSError):
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            removed.append(entry)
    return removed


def staging_dir(target: str | os.PathLike[str]) -> Path:
    """A new temporary folder beside ``target`` to build its next version in."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=target.parent, prefix=_prefix(target.name), suffix=".tmp"))


def swap_dir(staged: str | os.PathLike[str], target: str | os.PathLike[str]) -> Path:
    """Put the folder ``staged`` in place of ``target`` (two renames, then the old one is deleted).

    A run killed between the two renames leaves ``.<name>.<host>-<pid>.old``, which the next
    :func:`remove_stale` of the parent folder renames back: a reader finds the old folder or the
    new one, never a mix of both.
    """
    staged, target = Path(staged), Path(target)
    old = None
    if target.exists():
        old = target.parent / (_prefix(target.name) + "swap" + OLD_SUFFIX)
        os.rename(target, old)
    try:
        os.rename(staged, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target
