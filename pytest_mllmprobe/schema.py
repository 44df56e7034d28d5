"""Shape checks for the JSON files we read back: baselines and results.json.

A file edited by hand, cut short, or written by another version must give one clear message
naming the file, the key path and what was expected, never a ``KeyError`` in the middle of a run.
Specs are plain Python values: a type, :class:`Num` (a number or null), ``[spec]`` (a list of),
``{key: spec}`` (a mapping with at least these keys) or :class:`MapOf` (any keys, each value a spec).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError


class Num:
    """A finite number, or ``null`` when ``nullable``."""

    def __init__(self, nullable: bool = True) -> None:
        self.nullable = nullable

    def __repr__(self) -> str:
        return "a number" + (" or null" if self.nullable else "")


@dataclass(frozen=True)
class MapOf:
    """A mapping whose values all follow ``value``."""

    value: Any


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, str):
        return f"{value[:40]!r} (a string)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    return f"{value!r} (a {type(value).__name__})"


def _want(spec: Any) -> str:
    if isinstance(spec, Num):
        return repr(spec)
    if isinstance(spec, list):
        return f"a list of {_want(spec[0])}s"
    if isinstance(spec, (dict, MapOf)):
        return "a mapping"
    return {str: "a string", int: "an integer", bool: "true or false", dict: "a mapping", list: "a list"}.get(
        spec, spec.__name__)


def check(value: Any, spec: Any, path: str, fail: Any) -> None:
    """Check ``value`` against ``spec``; ``fail(path, expected, got)`` raises the caller's error."""
    if isinstance(spec, Num):
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not (number or (value is None and spec.nullable)):
            fail(path, _want(spec), _describe(value))
        return
    if isinstance(spec, list):
        if not isinstance(value, list):
            fail(path, _want(spec), _describe(value))
        for i, item in enumerate(value):
            check(item, spec[0], f"{path}[{i}]", fail)
        return
    if isinstance(spec, (dict, MapOf)):
        if not isinstance(value, dict):
            fail(path, "a mapping", _describe(value))
        if isinstance(spec, MapOf):
            for key, item in value.items():
                check(item, spec.value, f"{path}[{key!r}]", fail)
            return
        for key, sub in spec.items():
            if key not in value:
                fail(f"{path}.{key}" if path else key, f"present ({_want(sub)})", "missing")
            check(value[key], sub, f"{path}.{key}" if path else key, fail)
        return
    if spec is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, spec) and not (spec is not bool and isinstance(value, bool))
    if not ok:
        fail(path, _want(spec), _describe(value))


def failer(what: str, fix: str) -> Any:
    """A ``fail`` for :func:`check` raising ConfigError ``"<what>: <key> must be ..., got ...; <fix>"``."""

    def fail(path: str, expected: str, got: str) -> None:
        raise ConfigError(f"{what}: {path or 'the file'} must be {expected}, got {got}; {fix}")

    return fail


METRIC_VALUES = {"accuracy": Num(), "balanced_accuracy": Num(), "macro_f1": Num(), "auroc": Num()}

BASELINE_ENTRY = {
    "source": str,
    "family": str,
    "loci_names": [str],
    "metric": str,
    "class_names": [str],
    "data": {"fingerprint": str, "test_ids": [str]},
    "settings": dict,
    "loci": MapOf({**METRIC_VALUES, "correct": [int]}),
    "scores": MapOf(Num()),
}

RESULTS = {
    "schema_version": int,
    "settings": dict,
    "data": dict,
    "models": MapOf({
        "label": str,
        "stage_map": dict,
        "class_names": [str],
        "metric": str,
        "scores": MapOf(Num()),
        "loci": MapOf({**METRIC_VALUES, "name": str, "stage": str}),
        "verdicts": MapOf({"test": str, "stage": str, "passed": bool, "checks": list}),
    }),
}
