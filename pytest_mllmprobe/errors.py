"""Errors the engine raises for bad user input.

The engine knows nothing of pytest: it raises :class:`ConfigError`, and the plugin turns it
into ``pytest.UsageError`` (exit code 4).  Every message names what was given, what was
expected and how to fix it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any


class ConfigError(ValueError):
    """A problem with the user's model, data, options or threshold files."""


def close_matches(word: str, choices: Iterable[str], n: int = 3) -> str:
    """Return ``" (did you mean 'a' or 'b'?)"`` for the closest choices, or ``""``."""
    found = difflib.get_close_matches(word, list(choices), n=n, cutoff=0.5)
    if not found:
        return ""
    return " (did you mean " + " or ".join(repr(f) for f in found) + "?)"


def require_extra(module: str, message: str) -> Any:
    """Import an optional dependency (``module``, dotted names import the submodule), or raise a
    :class:`ConfigError` with ``message``, which names the extra that installs it."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(message) from exc
    return importlib.import_module(module.split(".")[0])
