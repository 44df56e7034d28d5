"""Threshold files: load, validate, merge, and resolve the rules for one model.

A threshold file (schema version 1, documented in ``docs/thresholds.md``) says how good each
locus and each stage transition must be.  :func:`load_thresholds` reads the shipped default
and then each user file on top of it; :meth:`ThresholdSet.for_model` applies the per-model
sections and gives a fully resolved :class:`Thresholds`.

Precedence, lowest first: the shipped default, the given files in order (a folder counts as
its ``*.yaml``/``*.yml`` files sorted by name), the ``models`` sections that match the model
(file order, then order inside the file), the ``metric`` passed to :func:`load_thresholds`
(``--mllm-metric``).  Scalar keys replace earlier values (``null`` replaces too: it disables
the rule); ``loci`` entries accumulate and are applied in order, so the later match wins.

This module knows nothing of pytest or torch: every problem with a file is a
:class:`~pytest_mllmprobe.errors.ConfigError` whose message names the file, the key path, the
bad value and what is valid.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

try:
    from importlib.resources.abc import Traversable
except ImportError:  # Python 3.10
    from importlib.abc import Traversable

from .errors import ConfigError, close_matches
from .settings import METRICS

VERSION = 1
STAGES = ("vision", "connector", "llm", "answer")
LOCUS_KEYS = ("min_above_chance", "floor", "min_selectivity")
STAGE_KEYS: dict[str, tuple[str, ...]] = {
    "vision": ("min_fhs", "min_end_above_chance", "min_dip_ratio", "min_selectivity"),
    "connector": ("min_keep", "min_selectivity"),
    "llm": ("min_keep", "min_fhs_ratio", "min_dip_ratio", "min_selectivity"),
    "answer": ("min_keep", "min_lens_keep", "min_consistency"),
}
#: Keys whose value is a score (FHS can exceed 1): any finite number >= 0.
UNBOUNDED_KEYS = ("min_fhs",)
#: Comparison with a baseline or a reference model (``--mllm-baseline``, ``--mllm-compare-to``).
REGRESSION_KEYS = ("max_drop", "alpha")
TOP_KEYS = ("version", "metric", "locus", "loci", "stages", "regression", "models")
MODEL_KEYS = ("metric", "locus", "loci", "stages", "regression", "modules")
#: Module paths that override stage detection for a model (as ``--mllm-stages``).
MODULE_KEYS = ("vision", "connector", "llm")
#: First dot-separated part of every locus name (``vision.3``, ``llm.5.image``, ...).
LOCUS_ROOTS = ("vision", "connector", "llm", "answer")

DEFAULT_NAME = "thresholds/default.yaml"
METRIC_OPTION = "--mllm-metric"
PRESET_SUFFIX = ".yaml"

RANGE_HINT = "a number in [0, 1], or null to disable the rule"
SCORE_HINT = "a number >= 0 (FHS can exceed 1), or null to disable the rule"
MAPPING_HINT = "write {} to change nothing, or set each key to null to disable its rule"
ALIAS_HINT = "quote glob keys that start with '*', '[' or '!', e.g. \"*.image\""


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class LocusRule:
    """The per-locus rule in force for one locus name."""

    min_above_chance: float | None
    floor: float | None
    source: str
    #: the metric minus its control task's (permuted labels) must be >= this
    min_selectivity: float | None = None


@dataclass(frozen=True)
class Thresholds:
    """Every rule, fully resolved for one model."""

    metric: str
    locus: LocusRule
    loci: tuple[tuple[str, dict[str, float | None], str], ...]
    stages: dict[str, dict[str, float | None]]
    files: tuple[str, ...]
    metric_source: str = ""
    stage_sources: dict[str, dict[str, str]] = field(default_factory=dict)
    model_sections: tuple[str, ...] = ()
    locus_sources: dict[str, str] = field(default_factory=dict)
    regression: dict[str, float | None] = field(default_factory=dict)
    regression_sources: dict[str, str] = field(default_factory=dict)
    #: ``models.<glob>.modules``: stage module paths for this model (``vision``, ``connector``, ``llm``)
    modules: dict[str, str] = field(default_factory=dict)
    module_sources: dict[str, str] = field(default_factory=dict)

    def for_locus(self, locus: str) -> LocusRule:
        """The defaults, then every ``loci`` glob that matches ``locus``, in order."""
        values = {"min_above_chance": self.locus.min_above_chance, "floor": self.locus.floor,
                  "min_selectivity": self.locus.min_selectivity}
        sources = {key: self.locus_sources.get(key, self.locus.source) for key in LOCUS_KEYS}
        for glob, overrides, source in self.loci:
            if fnmatchcase(locus, glob):
                for key, value in overrides.items():
                    values[key] = value
                    sources[key] = source
        return LocusRule(values["min_above_chance"], values["floor"], _join_sources(sources),
                         values["min_selectivity"])

    def stage(self, stage: str, key: str) -> float | None:
        """The value of ``stages.<stage>.<key>`` (``None``: the rule is disabled)."""
        _check_stage_key(stage, key)
        return self.stages[stage][key]

    def stage_source(self, stage: str, key: str) -> str:
        """Where ``stages.<stage>.<key>`` was set, e.g. ``"my.yaml: stages.llm.min_keep"``."""
        _check_stage_key(stage, key)
        return self.stage_sources.get(stage, {}).get(key, ", ".join(self.files))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form for ``results.json``."""
        return {
            "version": VERSION,
            "metric": self.metric,
            "metric_source": self.metric_source,
            "locus": {
                "min_above_chance": self.locus.min_above_chance,
                "floor": self.locus.floor,
                "min_selectivity": self.locus.min_selectivity,
                "source": self.locus.source,
            },
            "loci": [{"glob": g, **dict(o), "source": s} for g, o, s in self.loci],
            "stages": {s: dict(v) for s, v in self.stages.items()},
            "stage_sources": {s: dict(v) for s, v in self.stage_sources.items()},
            "files": list(self.files),
            "model_sections": list(self.model_sections),
            "locus_sources": dict(self.locus_sources),
            "regression": dict(self.regression),
            "regression_sources": dict(self.regression_sources),
            "modules": dict(self.modules),
        }


def _check_stage_key(stage: str, key: str) -> None:
    if stage not in STAGE_KEYS:
        raise ConfigError(
            f"unknown stage {stage!r}{close_matches(stage, STAGES)}; valid stages: {', '.join(STAGES)}"
        )
    if key not in STAGE_KEYS[stage]:
        valid = STAGE_KEYS[stage]
        raise ConfigError(
            f"unknown key 'stages.{stage}.{key}'{close_matches(key, valid)}; "
            f"valid keys: {', '.join(valid)}"
        )


def _join_sources(sources: Mapping[str, str]) -> str:
    distinct = list(dict.fromkeys(sources.values()))
    if len(distinct) == 1:
        return distinct[0]
    return "; ".join(f"{key} from {src}" for key, src in sources.items())


# --------------------------------------------------------------------------- parsed files

Value = tuple[Any, str]  # (value, source)


@dataclass(frozen=True)
class _Section:
    """The rules one mapping sets: the file's top level or one ``models`` entry."""

    metric: Value | None = None
    locus: dict[str, Value] = field(default_factory=dict)
    loci: tuple[tuple[str, dict[str, float | None], str], ...] = ()
    stages: dict[str, dict[str, Value]] = field(default_factory=dict)
    regression: dict[str, Value] = field(default_factory=dict)
    modules: dict[str, Value] = field(default_factory=dict)


@dataclass(frozen=True)
class _File:
    name: str
    base: _Section
    models: tuple[tuple[str, _Section, str], ...]


class ThresholdSet:
    """Everything loaded from the threshold files, not yet resolved for a model."""

    def __init__(self, files: Sequence[_File], metric: str | None = None,
                 metric_source: str = f"command line ({METRIC_OPTION})") -> None:
        self._files = tuple(files)
        self.files: tuple[str, ...] = tuple(f.name for f in self._files)
        self.metric_override = metric
        self._metric_source = metric_source

    def __repr__(self) -> str:
        return f"ThresholdSet(files={self.files!r}, metric_override={self.metric_override!r})"

    def model_globs(self) -> tuple[tuple[str, str], ...]:
        """Every ``models`` glob with its source, in precedence order."""
        return tuple((glob, source) for f in self._files for glob, _, source in f.models)

    def matching_sections(self, label: str, model_id: str | os.PathLike[str] | None = None) -> tuple[str, ...]:
        """Sources of the ``models`` sections that apply to this model, in order."""
        return tuple(src for _, src in self._matching(label, model_id))

    def _matching(self, label: str, model_id: Any) -> list[tuple[_Section, str]]:
        names = _model_names(label, model_id)
        return [
            (section, source)
            for f in self._files
            for glob, section, source in f.models
            if any(fnmatchcase(name, glob) for name in names)
        ]

    def for_model(self, label: str, model_id: str | os.PathLike[str] | None = None) -> Thresholds:
        """Resolve the rules for one model (label such as ``"demo"``, path or hub id)."""
        metric: Value = ("accuracy", "built-in fallback")
        locus: dict[str, Value] = {k: (None, "built-in fallback") for k in LOCUS_KEYS}
        stages = {s: {k: (None, "built-in fallback") for k in keys} for s, keys in STAGE_KEYS.items()}
        regression: dict[str, Value] = {k: (None, "built-in fallback") for k in REGRESSION_KEYS}
        modules: dict[str, Value] = {}
        loci: list[tuple[str, dict[str, float | None], str]] = []
        matching = self._matching(label, model_id)
        for section in [f.base for f in self._files] + [s for s, _ in matching]:
            metric = section.metric or metric
            locus.update(section.locus)
            regression.update(section.regression)
            modules.update(section.modules)
            for stage, values in section.stages.items():
                stages[stage].update(values)
            loci.extend(section.loci)
        if self.metric_override is not None:
            metric = (self.metric_override, self._metric_source)
        locus_sources = {key: locus[key][1] for key in LOCUS_KEYS}
        return Thresholds(
            metric=metric[0],
            locus=LocusRule(locus["min_above_chance"][0], locus["floor"][0],
                            _join_sources(locus_sources), locus["min_selectivity"][0]),
            loci=tuple((g, dict(o), s) for g, o, s in loci),
            stages={s: {k: v[0] for k, v in values.items()} for s, values in stages.items()},
            files=self.files,
            metric_source=metric[1],
            stage_sources={s: {k: v[1] for k, v in values.items()} for s, values in stages.items()},
            model_sections=tuple(src for _, src in matching),
            locus_sources=locus_sources,
            regression={k: v[0] for k, v in regression.items()},
            regression_sources={k: v[1] for k, v in regression.items()},
            modules={k: v[0] for k, v in modules.items()},
            module_sources={k: v[1] for k, v in modules.items()},
        )


def _model_names(label: str, model_id: Any) -> list[str]:
    """The strings a ``models`` glob is matched against: label, id/path, and the path's last part."""
    names = [str(label)]
    if model_id is not None:
        text = os.fspath(model_id) if isinstance(model_id, os.PathLike) else str(model_id)
        names.append(text)
        stripped = text.rstrip("/\\")
        base = re.split(r"[/\\]", stripped)[-1] if stripped else ""
        if base:
            names.append(base)
    return names


# --------------------------------------------------------------------------- loading


def default_threshold_file() -> Traversable:
    """The shipped ``default.yaml`` (package resource ``pytest_mllmprobe.presets``)."""
    return _presets_dir() / "default.yaml"


def available_presets() -> tuple[str, ...]:
    """Names of the shipped presets, usable in place of a path (e.g. ``"paper-strict"``)."""
    return tuple(sorted(
        p.name[: -len(PRESET_SUFFIX)] for p in _presets_dir().iterdir()
        if p.name.endswith(PRESET_SUFFIX) and p.is_file()
    ))


def _presets_dir() -> Traversable:
    try:
        return resources.files("pytest_mllmprobe.presets")
    except ModuleNotFoundError:  # a source checkout that was never installed
        return Path(__file__).resolve().parent.parent / "thresholds"


def load_thresholds(
    paths: Sequence[str | os.PathLike[str]] | str | os.PathLike[str] | None = None,
    *,
    metric: str | None = None,
    metric_source: str = f"command line ({METRIC_OPTION})",
) -> ThresholdSet:
    """Load the shipped default, then each of ``paths`` on top of it, in order.

    A path may be a file, a folder (its ``*.yaml``/``*.yml`` files, sorted by name) or the name
    of a shipped preset (:func:`available_presets`).  ``metric`` overrides every file's metric.
    """
    if metric is not None and metric not in METRICS:
        raise ConfigError(
            f"{METRIC_OPTION} {metric!r} is not a metric{close_matches(str(metric), METRICS)}; "
            f"valid metrics: {', '.join(METRICS)}"
        )
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files = [_parse(DEFAULT_NAME, _read(default_threshold_file(), DEFAULT_NAME))]
    for given in paths or ():
        for name, source in _expand(given):
            files.append(_parse(name, _read(source, name)))
    return ThresholdSet(files, metric, metric_source)


def _expand(given: str | os.PathLike[str]) -> list[tuple[str, Traversable]]:
    text = os.fspath(given)
    path = Path(text).expanduser()
    if path.is_dir():
        found = sorted(
            (p for p in path.iterdir()
             if p.suffix in (".yaml", ".yml") and p.is_file() and not p.name.startswith(".")),
            key=lambda p: p.name,
        )
        if not found:
            raise ConfigError(
                f"{text}: threshold folder has no *.yaml or *.yml files; put threshold files in it "
                "or pass the files themselves"
            )
        return [(str(Path(text) / p.name), p) for p in found]
    if path.is_file():
        return [(text, path)]
    presets = available_presets()
    if text in presets:
        return [(f"thresholds/{text}{PRESET_SUFFIX}", _presets_dir() / f"{text}{PRESET_SUFFIX}")]
    hint = close_matches(text, presets) if os.sep not in text and "/" not in text else ""
    raise ConfigError(
        f"{text}: threshold file not found (looked for {path.resolve()}){hint}; give an existing "
        f"YAML file or folder, or a shipped preset: {', '.join(presets)}"
    )


def _read(source: Traversable, name: str) -> str:
    try:
        return source.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{name}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read the threshold file ({exc.strerror or exc})") from None


def _parse(name: str, text: str) -> _File:
    try:
        _check_duplicates(name, yaml.compose(text, Loader=yaml.SafeLoader))
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(_yaml_message(name, exc)) from None
    if data is None:  # an empty file changes nothing
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{name}: the top level must be a mapping of keys ({', '.join(TOP_KEYS)}), "
            f"got {_describe(data)}"
        )
    _check_keys(name, data, "", TOP_KEYS, extra=_top_key_hint)
    if "version" in data:
        version = data["version"]
        if type(version) is not int or version != VERSION:
            raise ConfigError(
                f"{name}: version must be {VERSION}, got {_describe(version)}; this release reads "
                f"schema version {VERSION} only (see docs/thresholds.md)"
            )
    base = _section(name, data, "")
    models: list[tuple[str, _Section, str]] = []
    for glob, section in _mapping(name, data.get("models") or {}, "models").items():
        path = f"models{_glob_seg(glob)}"
        section = _mapping(name, section, path)
        _check_keys(name, section, path, MODEL_KEYS, extra=_model_key_hint)
        models.append((glob, _section(name, section, path), f"{name}: {path}"))
    return _File(name, base, tuple(models))


def _section(name: str, data: Mapping[str, Any], prefix: str) -> _Section:
    def at(key: str) -> str:
        return f"{prefix}.{key}" if prefix else key

    metric: Value | None = None
    if "metric" in data:
        value = data["metric"]
        if not isinstance(value, str) or value not in METRICS:
            guess = close_matches(value, METRICS) if isinstance(value, str) else ""
            raise ConfigError(
                f"{name}: {at('metric')} must be one of {', '.join(METRICS)}, got {_describe(value)}{guess}"
            )
        metric = (value, f"{name}: {at('metric')}")
    locus: dict[str, Value] = {}
    if "locus" in data:
        values = _rule(name, data["locus"], at("locus"))
        locus = {k: (v, f"{name}: {at('locus')}") for k, v in values.items()}
    loci: list[tuple[str, dict[str, float | None], str]] = []
    for glob, entry in _mapping(name, data.get("loci") or {}, at("loci")).items():
        path = f"{at('loci')}{_glob_seg(glob)}"
        _check_locus_glob(name, glob, path)
        loci.append((glob, _rule(name, entry, path), f"{name}: {path}"))
    stages: dict[str, dict[str, Value]] = {}
    stage_map = _mapping(name, data.get("stages", {}), at("stages"))
    _check_keys(name, stage_map, at("stages"), STAGES)
    for stage, entry in stage_map.items():
        path = f"{at('stages')}.{stage}"
        entry = _mapping(name, entry, path)
        _check_keys(name, entry, path, STAGE_KEYS[stage])
        stages[stage] = {
            key: (_number(name, value, f"{path}.{key}", key in UNBOUNDED_KEYS), f"{name}: {path}.{key}")
            for key, value in entry.items()
        }
    regression: dict[str, Value] = {}
    if "regression" in data:
        path = at("regression")
        entry = _mapping(name, data["regression"], path)
        _check_keys(name, entry, path, REGRESSION_KEYS)
        for key, value in entry.items():
            number = _number(name, value, f"{path}.{key}", False)
            if key == "alpha" and number is not None and number <= 0:
                raise ConfigError(
                    f"{name}: {path}.alpha must be in (0, 1], got {_describe(value)}; "
                    "e.g. 0.05 for a 5% false-alarm rate per model"
                )
            regression[key] = (number, f"{name}: {path}.{key}")
    modules: dict[str, Value] = {}
    if "modules" in data:  # only in a models section (checked by the caller's key list)
        path = at("modules")
        entry = _mapping(name, data["modules"], path)
        _check_keys(name, entry, path, MODULE_KEYS)
        for key, value in entry.items():
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(
                    f"{name}: {path}.{key} must be a module path such as "
                    f"'model.language_model.layers', got {_describe(value)}"
                )
            modules[key] = (value.strip(), f"{name}: {path}.{key}")
    return _Section(metric, locus, tuple(loci), stages, regression, modules)


def _rule(name: str, data: Any, path: str) -> dict[str, float | None]:
    data = _mapping(name, data, path)
    _check_keys(name, data, path, LOCUS_KEYS)
    return {key: _number(name, value, f"{path}.{key}", False) for key, value in data.items()}


# --------------------------------------------------------------------------- validation helpers


def _glob_seg(glob: str) -> str:
    return f"[{json.dumps(glob)}]"


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, str):
        return f"{value!r} (a string)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, (int, float)):
        return repr(value)
    return f"{value!r} (a {type(value).__name__})"


def _mapping(name: str, value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{name}: {path} must be a mapping, got {_describe(value)}; {MAPPING_HINT}")
    for key in value:
        if not isinstance(key, str):
            raise ConfigError(
                f"{name}: key {_describe(key)} in {path} is not a string; quote it "
                f"(YAML reads bare yes/no/on/off/true/false as booleans and digits as numbers)"
            )
    return value


def _check_keys(name: str, data: Mapping[str, Any], path: str, valid: Iterable[str], extra: Any = None) -> None:
    valid = tuple(valid)
    for key in data:
        if not isinstance(key, str):
            raise ConfigError(
                f"{name}: key {_describe(key)} in {path or 'the top level'} is not a string; "
                f"valid keys: {', '.join(valid)}"
            )
        if key not in valid:
            full = f"{path}.{key}" if path else key
            hint = extra(key) if extra else ""
            raise ConfigError(
                f"{name}: unknown key '{full}'{close_matches(key, valid)}; valid keys: "
                f"{', '.join(valid)}{hint}"
            )


def _model_key_hint(key: str) -> str:
    if key in ("version", "models"):
        return f" ('{key}' is allowed only at the top level of the file)"
    return ""


def _top_key_hint(key: str) -> str:
    if key == "modules":
        return " ('modules' names one model's stage modules: put it in a models section)"
    return ""


def _check_locus_glob(name: str, glob: str, path: str) -> None:
    """Catch misspelled stage names; a glob whose first part can match no locus is a typo."""
    root = glob.split(".", 1)[0]
    if any(c in root for c in "*?[") or root in LOCUS_ROOTS:
        return  # a wildcard may span dots ("*image"): only literal first parts are checked
    raise ConfigError(
        f"{name}: {path} can match no locus: locus names start with {', '.join(LOCUS_ROOTS)}"
        f"{close_matches(root, LOCUS_ROOTS)}; valid names look like vision.<i>, connector, "
        "llm.<i>.image, llm.<i>.last, answer"
    )


def _number(name: str, value: Any, path: str, unbounded: bool) -> float | None:
    valid = SCORE_HINT if unbounded else RANGE_HINT
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        hint = ""
        if isinstance(value, str):
            try:
                float(value)
                hint = "; write the number without quotes"
                if "e" in value.lower():
                    hint += " (PyYAML reads 1e-3 as text: write 1.0e-3 or 0.001)"
            except ValueError:
                if value.strip().lower() in ("none", "off", "disabled", "~", ""):
                    hint = "; write null to disable the rule"
        raise ConfigError(f"{name}: {path} must be {valid}, got {_describe(value)}{hint}")
    number = float(value)
    low_ok = math.isfinite(number) and number >= 0.0
    if not low_ok or (not unbounded and number > 1.0):
        hint = ""
        if not unbounded and 2.0 <= number <= 100.0:
            hint = f"; fractions, not percent: {number:g}% is {number / 100:g}"
        raise ConfigError(f"{name}: {path} must be {valid}, got {_describe(value)}{hint}")
    return number


def _check_duplicates(name: str, node: Any) -> None:
    """YAML keeps only the last of two equal keys; say so instead of dropping rules silently."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                line = key.start_mark.line + 1
                if key.value in seen:
                    raise ConfigError(
                        f"{name}: duplicate key {key.value!r} at line {line} (first at line "
                        f"{seen[key.value]}); YAML would silently keep only the last one: merge the two entries"
                    )
                seen[key.value] = line
            _check_duplicates(name, value)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_duplicates(name, item)


def _yaml_message(name: str, exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    detail = f"{context}, {problem}" if context else problem
    hint = "; check the indentation and that every key ends with ':'"
    if "alias" in detail:
        hint = f"; {ALIAS_HINT}"
    elif "flow" in detail:
        hint = f"; close every '[' and '{{', and {ALIAS_HINT}"
    return f"{name}: YAML syntax error{where}: {detail}{hint}"


__all__ = [
    "METRICS",
    "STAGES",
    "STAGE_KEYS",
    "LocusRule",
    "ThresholdSet",
    "Thresholds",
    "available_presets",
    "default_threshold_file",
    "load_thresholds",
]
