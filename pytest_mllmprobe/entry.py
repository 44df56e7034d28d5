"""``package.module:function`` options (``--mllm-data``, ``--mllm-model``): import, call, and turn
every failure of the user's code into a :class:`~pytest_mllmprobe.errors.ConfigError`."""

from __future__ import annotations

import importlib
from typing import Any

from .errors import ConfigError, close_matches


def call_entry_point(spec: str, flag: str) -> Any:
    """Import ``module`` of ``spec`` (``module:function``) and return ``function()``."""
    module_name, _, func_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"{flag} {spec!r}: cannot import module {module_name!r} ({exc}); put it on "
            "sys.path (PYTHONPATH, a conftest.py folder or an installed package), or check the spelling"
        ) from exc
    func = getattr(module, func_name, None)
    if not callable(func):
        choices = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise ConfigError(
            f"{flag} {spec!r}: module {module_name!r} has no function {func_name!r}"
            f"{close_matches(func_name, choices)}"
        )
    try:
        return func()
    except ConfigError:
        raise
    except Exception as exc:  # the user's code: its error, named, not a traceback of ours
        raise ConfigError(f"{flag} {spec!r}: {func_name}() raised {type(exc).__name__}: {exc}") from exc
