"""What a run produces: per-locus scores, stage scores, verdicts. Plain data, JSON-able."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .health import FAILURE_MODES, STAGE_ORDER

#: 2: intervals (loci, stage scores, ratios), the control task per locus, the random-init twin,
#: the comparisons' power; docs/reading-the-report.md lists the keys
SCHEMA_VERSION = 2


def stage_of(locus: str) -> str:
    """``vision.3`` -> vision, ``llm.2.last`` -> llm, ``stage.connector`` -> connector."""
    if locus.startswith("stage."):
        return locus.split(".", 1)[1]
    return locus.split(".", 1)[0]


@dataclass
class LocusResult:
    """One locus: its probe (or, for ``answer``, the model's own answer) on the test split."""

    name: str
    stage: str
    layer: int | None
    readout: str | None
    dim: int
    accuracy: float
    balanced_accuracy: float
    chance: dict[str, float]
    correct: np.ndarray = field(repr=False)
    macro_f1: float = float("nan")
    auroc: float = float("nan")
    finite: bool = True
    fold_accuracy: list[float] | None = None
    #: 95% bootstrap interval of each metric over the test images (patients), where computed
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: the control task (:func:`pytest_mllmprobe.uncertainty.control_summary`), where fitted
    control: dict[str, Any] | None = None
    #: the same locus of the random-initialisation twin (``--mllm-controls random-init``): metrics
    random_init: dict[str, float] | None = None

    def metric(self, name: str) -> float:
        return float(getattr(self, name))

    def interval(self, name: str) -> tuple[float, float] | None:
        return self.intervals.get(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "stage": self.stage,
            "layer": self.layer,
            "readout": self.readout,
            "dim": self.dim,
            "accuracy": _num(self.accuracy),
            "balanced_accuracy": _num(self.balanced_accuracy),
            "macro_f1": _num(self.macro_f1),
            "auroc": _num(self.auroc),
            "chance": {k: _num(v) for k, v in self.chance.items()},
            "finite": self.finite,
            "fold_accuracy": None if self.fold_accuracy is None else [_num(a) for a in self.fold_accuracy],
            "fold_mean": None if self.fold_accuracy is None else _num(float(np.mean(self.fold_accuracy))),
            "fold_std": None if self.fold_accuracy is None else _num(float(np.std(self.fold_accuracy, ddof=1))),
            "intervals": {k: _pair(v) for k, v in self.intervals.items()},
            "control": _clean(self.control),
            "random_init": _clean(self.random_init),
            "correct": [bool(c) for c in self.correct],
        }


@dataclass(frozen=True)
class Check:
    """One rule applied to one figure: ``value >= threshold``."""

    rule: str
    metric: str
    value: float
    threshold: float
    passed: bool
    explanation: str
    source: str
    reference: float | None = None
    p_value: float | None = None
    ci: tuple[float, float] | None = None
    locus: str | None = None
    #: 95% bootstrap interval of ``value``, where the run computed one
    interval: tuple[float, float] | None = None

    @property
    def delta(self) -> float:
        """``value - reference`` for a comparison, else ``value - threshold``."""
        if self.reference is not None:
            return self.value - self.reference
        return self.value - self.threshold

    def to_dict(self) -> dict[str, Any]:
        data = {
            "rule": self.rule, "metric": self.metric, "value": _num(self.value),
            "threshold": _num(self.threshold), "delta": _num(self.delta), "passed": self.passed,
            "explanation": self.explanation, "source": self.source, "locus": self.locus,
            "interval": _pair(self.interval) if self.interval is not None else None,
        }
        if self.reference is not None:
            data.update(reference=_num(self.reference), p_value=_num(self.p_value),
                        ci=[_num(x) for x in self.ci] if self.ci else None)
        return data


@dataclass(frozen=True)
class Verdict:
    """The outcome of one generated test: a locus test or a stage rule."""

    test: str
    stage: str
    locus: str
    checks: tuple[Check, ...]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failure_mode(self) -> str | None:
        return None if self.passed else FAILURE_MODES[self.stage]

    @property
    def headline(self) -> Check | None:
        """The check to report in one line: the first failing one, else the first."""
        failing = [c for c in self.checks if not c.passed]
        return (failing or list(self.checks) or [None])[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "test": self.test, "stage": self.stage, "locus": self.locus, "passed": self.passed,
            "failure_mode": self.failure_mode, "checks": [c.to_dict() for c in self.checks],
        }


def diagnosis_text(failing: Sequence[str], comparison: Mapping[str, Any] | None = None) -> str:
    """The one-line verdict from the failing stages (pipeline order) and a comparison, if any."""
    if not failing:
        text = "all stages pass"
    else:
        text = f"first failing stage: {failing[0]} ({FAILURE_MODES.get(failing[0], '?')})"
        if failing[1:]:
            text += f"; downstream also failing: {', '.join(failing[1:])}"
    if comparison is not None:
        regressed, against = comparison.get("regressed_stages") or [], comparison.get("against", "?")
        if not regressed:
            text += f"; no regression vs {against}"
        else:
            text += f"; root cause of the regression vs {against}: {regressed[0]}"
            if regressed[1:]:
                text += f" (inherited downstream: {', '.join(regressed[1:])})"
    return text


@dataclass
class ModelResult:
    """Everything measured for one model."""

    label: str
    source: str
    stage_map: dict[str, Any]
    class_names: tuple[str, ...]
    metric: str
    n_train: int
    n_test: int
    loci: dict[str, LocusResult]
    scores: dict[str, float]
    verdicts: dict[str, Verdict]
    thresholds: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    comparison: dict[str, Any] | None = None
    answers: dict[str, Any] | None = None
    #: 95% bootstrap intervals of the stage scores and transition ratios
    #: (:func:`pytest_mllmprobe.verdicts.stage_figures`), and how they were computed
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    uncertainty: dict[str, Any] = field(default_factory=dict)
    #: the random-initialisation twin's stage scores (``--mllm-controls random-init``)
    random_init: dict[str, Any] | None = None
    #: which stages the fine-tune's weights changed (:mod:`pytest_mllmprobe.models.changes`)
    changes: dict[str, Any] | None = None
    #: the tests judged and the loci read (:meth:`pytest_mllmprobe.selection.Selection.to_dict`):
    #: ``full``, ``skipped`` (loci not extracted, because not selected), ``reason``, ``notes``
    selection: dict[str, Any] | None = None

    @property
    def failing_stages(self) -> list[str]:
        failed = {v.stage for v in self.verdicts.values() if not v.passed}
        return [s for s in STAGE_ORDER if s in failed]

    @property
    def first_failing_stage(self) -> str | None:
        stages = self.failing_stages
        return stages[0] if stages else None

    @property
    def profile(self) -> str:
        return " -> ".join(f"{key} {self.figure(key)}" for key in ("FHS_V", "FHS_C", "FHS_L", "P_final"))

    def figure(self, key: str, digits: int = 3) -> str:
        """``0.762 [0.620, 0.880]``: a stage score with its interval, where there is one."""
        value = self.scores.get(key)
        text = _fmt(value) if digits == 3 else ("n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}")
        low, high = self.intervals.get(key, (float("nan"), float("nan")))
        if math.isfinite(low) and math.isfinite(high):
            text += f" [{low:.{digits}f}, {high:.{digits}f}]"
        return text

    @property
    def diagnosis(self) -> str:
        return diagnosis_text(self.failing_stages, self.comparison)

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "source": self.source,
            "stage_map": self.stage_map,
            "class_names": list(self.class_names),
            "metric": self.metric,
            "n_train": self.n_train,
            "n_test": self.n_test,
            "scores": {k: _num(v) for k, v in self.scores.items()},
            "intervals": {k: _pair(v) for k, v in self.intervals.items()},
            "uncertainty": dict(self.uncertainty),
            "random_init": _clean(self.random_init),
            "profile": self.profile,
            "diagnosis": self.diagnosis,
            "first_failing_stage": self.first_failing_stage,
            "failure_mode": FAILURE_MODES.get(self.first_failing_stage or "", None),
            "loci": {k: v.to_dict() for k, v in self.loci.items()},
            "verdicts": {k: v.to_dict() for k, v in self.verdicts.items()},
            "thresholds": self.thresholds,
            "timings": dict(self.timings),
            "comparison": self.comparison,
            "answers": self.answers,
            "changed_stages": self.changes,
            "selection": self.selection,
        }


@dataclass
class Results:
    """A whole run: one :class:`ModelResult` per model label."""

    models: dict[str, ModelResult]
    settings: dict[str, Any]
    data: dict[str, Any]

    def __getitem__(self, label: str) -> ModelResult:
        return self.models[label]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "settings": self.settings,
            "data": self.data,
            "models": {k: v.to_dict() for k, v in self.models.items()},
        }


def _fmt(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def _pair(pair: tuple[float, float]) -> list[float | None]:
    return [_num(float(x)) for x in pair]


def _clean(value: Any) -> Any:
    """JSON-able copy: NaN and infinities become null, tuples lists, numpy scalars floats."""
    if isinstance(value, Mapping):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (bool, str)) or value is None:
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return _num(float(value))
    return value


def _num(value: float | None) -> float | None:
    if value is None or (isinstance(value, float) and (math.isnan(value) or math.isinf(value))):
        return None
    return float(value)
