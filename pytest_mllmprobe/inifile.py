"""Did pytest read the project's configuration file, or did our option values mislead it?

pytest picks its rootdir and ini file from the command line *before* plugins add their options.
In ``pytest --mllm-model /models/x --mllm-data /data/busi`` (a space before each value) the
values are unknown words at that moment and count as test paths: pytest then looks for the ini
file from their common folder, not from the project, and a project ``pytest.ini`` that sets
``mllm_thresholds`` is silently not read — the gate switches itself off. With ``=``
(``--mllm-model /models/x``) the value stays part of its option and nothing goes wrong.

:func:`misread_ini` redoes pytest's search (``determine_setup`` in pytest's own
``config/findpaths.py``, whose rules this module follows) twice: with the words pytest took for
paths, and without our option values. It reports a difference only when the first search agrees
with what pytest actually chose, so a change in pytest's rules can never produce a false alarm.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

#: pytest's configuration files, in the order it tries them in each folder
CONFIG_NAMES = ("pytest.toml", ".pytest.toml", "pytest.ini", ".pytest.ini", "pyproject.toml", "tox.ini", "setup.cfg")


def holds_pytest_config(path: Path) -> bool:
    """Whether pytest takes ``path`` (one of :data:`CONFIG_NAMES`) as its configuration file."""
    name = path.name
    try:
        if name in ("pytest.toml", ".pytest.toml", "pytest.ini", ".pytest.ini"):
            return True  # dedicated files count even when empty
        if name == "pyproject.toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # pragma: no cover - Python 3.10
                import tomli as tomllib
            tool = tomllib.loads(path.read_text(encoding="utf-8")).get("tool", {})
            return isinstance(tool, dict) and "pytest" in tool
        import iniconfig

        sections = iniconfig.IniConfig(str(path)).sections
        return ("tool:pytest" if name == "setup.cfg" else "pytest") in sections
    except Exception:  # noqa: BLE001 - an unreadable file: pytest reports it itself
        return False


def _locate(args: Iterable[Path]) -> Path | None:
    """The first configuration file in the folders of ``args`` and their parents (pytest's
    ``locate_config``: a ``pyproject.toml`` without a pytest table is the last resort)."""
    fallback = None
    for arg in args:
        for base in (arg, *arg.parents):
            for name in CONFIG_NAMES:
                candidate = base / name
                if candidate.is_file():
                    if name == "pyproject.toml" and fallback is None:
                        fallback = candidate
                    if holds_pytest_config(candidate):
                        return candidate
    return fallback


def _dir_of(path: Path) -> Path:
    return path.parent if path.is_file() else path


def _common_ancestor(invocation_dir: Path, paths: Sequence[Path]) -> Path:
    existing = [p for p in paths if p.exists()]
    if not existing:
        return invocation_dir
    common = Path(os.path.commonpath([str(p) for p in existing]))
    return common.parent if common.is_file() else common


def find_ini(invocation_dir: Path, args: Sequence[str]) -> Path | None:
    """The configuration file pytest finds for these free command-line words (no ``-c``)."""
    words = [a.split("::")[0] for a in args if not a.startswith("-")]
    paths = [Path(os.path.abspath(os.path.join(invocation_dir, w))) for w in words]
    dirs = [_dir_of(p) for p in paths if p.exists()]
    ancestor = _common_ancestor(invocation_dir, dirs)
    found = _locate([ancestor])
    if found is None and not any((d / "setup.py").is_file() for d in (ancestor, *ancestor.parents)):
        if dirs and dirs != [ancestor]:
            found = _locate(dirs)
    return found


def option_values(args: Sequence[str], flags: Iterable[str]) -> list[str]:
    """The values given to ``flags`` in the space form (``--mllm-model X``), in order."""
    wanted = set(flags)
    values = []
    for flag, value in zip(args, args[1:]):
        if flag in wanted and not value.startswith("-"):
            values.append(value)
    return values


@dataclass(frozen=True)
class Misread:
    """pytest read ``used`` (``None``: no file) where this invocation's own is ``wanted``."""

    used: Path | None
    wanted: Path | None
    values: tuple[str, ...]


def misread_ini(invocation_dir: Path, args: Sequence[str], positional: Sequence[str],
                flags: Iterable[str], used: Path | None) -> Misread | None:
    """A :class:`Misread` when our space-form option values changed pytest's ini file.

    ``args`` are the words pytest searched with (the command line and ``PYTEST_ADDOPTS``),
    ``positional`` the real test paths among them, ``used`` the file pytest chose.
    """
    values = option_values(args, flags)
    if not values:
        return None
    as_searched = find_ini(invocation_dir, [*positional, *values])
    if not _same(as_searched, used):
        return None  # this module does not model the search pytest made: say nothing
    wanted = find_ini(invocation_dir, positional)
    if _same(wanted, used):
        return None
    return Misread(used, wanted, tuple(values))


def _same(a: Path | None, b: Path | None) -> bool:
    if a is None or b is None:
        return a is b
    return Path(a).resolve() == Path(b).resolve()
