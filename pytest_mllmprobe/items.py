"""pytest items: one per (model, locus) and one per (model, stage rule).

Item names are the locus names (``vision.3``, ``connector``, ``llm.5.image``, ``llm.5.last``,
``answer``) and ``stage.<stage>`` for the stage rules, under a node named after the model,
so ``-k connector``, ``-k "llm and last"`` or ``-k "demo and stage"`` select what they say.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from .health import FAILURE_MODES, STAGE_ORDER
from .options import MARKER, XUNIT_WITH_TESTCASE_PROPERTIES, junit_family

class ProbeFailure(AssertionError):
    """A probe or stage rule is below its threshold; ``repr_failure`` prints the table."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


class ModelNode(pytest.Collector):
    """All probe tests of one model; evaluates the model once, on its first test."""

    def setup_plan(self, model_plan: Any, evaluator: Any) -> None:
        self.model_plan = model_plan
        self.evaluator = evaluator

    def collect(self) -> list[pytest.Item]:
        loci = self.model_plan.loci
        ordered: list[str] = []
        for stage in STAGE_ORDER:
            ordered += [n for n in loci if n.split(".")[0] == stage]
            ordered.append(f"stage.{stage}")
        return [ProbeItem.from_parent(self, name=name) for name in ordered]

    def result(self) -> Any:
        """The :class:`~pytest_mllmprobe.results.ModelResult`, computed on first use."""
        __tracebackhide__ = True
        return self.evaluator.result(self.model_plan.spec.label)


class ProbeItem(pytest.Item):
    """Asserts one verdict of one model."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_marker(MARKER)
        self.figures: dict[str, Any] | None = None
        self.model_summary: dict[str, Any] | None = None

    @property
    def stage(self) -> str:
        return self.name.split(".")[1] if self.name.startswith("stage.") else self.name.split(".")[0]

    def runtest(self) -> None:
        __tracebackhide__ = True
        assert isinstance(self.parent, ModelNode)
        result = self.parent.result()
        verdict = result.verdicts[self.name]
        self.figures = figures(result, verdict)
        self.model_summary = model_summary(result)
        if junit_family(self.config) in XUNIT_WITH_TESTCASE_PROPERTIES:
            self.user_properties.extend(
                (key, value) for key, value in self.figures.items() if value is not None
            )
        if not verdict.passed:
            raise ProbeFailure(failure_table(result, verdict))

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, ProbeFailure):
            return excinfo.value.text
        from .errors import ConfigError

        if isinstance(excinfo.value, ConfigError):
            return f"{self.parent.name}: {excinfo.value}"
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self) -> tuple[Any, int | None, str]:
        return self.path, None, f"mllm {self.parent.name}::{self.name}"


def figures(result: Any, verdict: Any) -> dict[str, Any]:
    """The figures of one test, for JUnit and reporters (JSON-able)."""
    check = verdict.headline
    return {
        "model": result.label,
        "stage": verdict.stage,
        "locus": verdict.locus,
        "test": verdict.test,
        "metric": check.metric if check else result.metric,
        "value": _round(check.value) if check else None,
        "threshold": _round(check.threshold) if check else None,
        "delta": _round(check.delta) if check else None,
        "rule": check.rule if check else None,
        "passed": verdict.passed,
        "failure_mode": verdict.failure_mode,
        **comparison_figures(verdict),
        **answer_figures(result, verdict),
    }


def answer_figures(result: Any, verdict: Any) -> dict[str, Any]:
    """Both readings of ``P_final`` (and the parse-failure rate) on the answer tests."""
    answers = result.answers or {}
    if verdict.stage != "answer" or not answers:
        return {}
    figures = {"answer_mode": answers.get("mode"),
               "p_final_likelihood": _round(answers["likelihood"][result.metric])}
    if "generate" in answers:
        figures["p_final_generate"] = _round(answers["generate"][result.metric])
        figures["parse_failure_rate"] = _round(answers["generate"]["parse_failure_rate"])
    return figures


def comparison_figures(verdict: Any) -> dict[str, Any]:
    """``baseline``, ``baseline_delta``, ``p_value`` and the interval, when the test compares."""
    for check in verdict.checks:
        if check.rule == "no_regression":
            return {
                "baseline": _round(check.reference),
                "baseline_delta": _round(check.value - check.reference),
                "p_value": None if check.p_value is None else float(f"{check.p_value:.4g}"),
                "ci_low": _round(check.ci[0]) if check.ci else None,
                "ci_high": _round(check.ci[1]) if check.ci else None,
                "regressed": not check.passed,
            }
    return {}


def model_summary(result: Any) -> dict[str, Any]:
    consumed = ", ".join(f"vision.{i}" for i in result.stage_map["consumed_vision_layers"])
    return {
        "label": result.label,
        "family": result.stage_map["family"],
        "n_test": result.n_test,
        "consumed": f"{consumed} (vision_feature_layer={result.stage_map['vision_feature_layer']!r})",
        "profile": result.profile,
        "diagnosis": result.diagnosis,
        "first_failing_stage": result.first_failing_stage,
        "scores": {k: _round(v) for k, v in result.scores.items()},
        "answers": answers_line(result),
        "cached": bool(result.timings.get("cache")),
        "memory": memory_line(result.timings),
    }


def memory_line(timings: dict[str, float]) -> str | None:
    """What running out of accelerator memory changed in this run, or ``None``."""
    said = []
    if timings.get("oom_halvings"):
        said.append(f"out of memory at batch size {int(timings['batch_size_asked'])}: halved "
                    f"{int(timings['oom_halvings'])} time(s), finished with batch size {int(timings['batch_size'])}")
    if timings.get("probe_cpu_fallback"):
        said.append("the probes ran out of accelerator memory and were fitted on the CPU")
    return "; ".join(said) or None


def answers_line(result: Any) -> str | None:
    """``P_final by likelihood 0.97, by generation 0.93 (parse failures 2.2%)``, when generating."""
    answers = result.answers or {}
    if "generate" not in answers:
        return None
    like = answers["likelihood"][result.metric]
    gen = answers["generate"]
    return (
        f"P_final ({result.metric}) by likelihood {_cell(like if like is not None else math.nan)}, "
        f"by generation {_cell(gen[result.metric] if gen[result.metric] is not None else math.nan)} "
        f"(parse failures {100 * gen['parse_failure_rate']:.1f}%, counted wrong)"
    )


def failure_table(result: Any, verdict: Any) -> str:
    """A short table (model, stage, locus, metric, value, threshold, [baseline,] delta, [p,] rule),
    then the failure mode in words and the threshold keys that decided."""
    compared = any(c.reference is not None for c in verdict.checks)
    header = ["model", "stage", "locus", "metric", "value", "threshold"]
    header += ["baseline", "delta", "p"] if compared else ["delta"]
    rows = [header]
    for check in verdict.checks:
        row = [result.label, verdict.stage, verdict.locus, check.metric, _cell(check.value), _cell(check.threshold)]
        if compared:
            row.append("-" if check.reference is None else _cell(check.reference))
        row.append(_cell(check.delta, signed=True))
        if compared:
            row.append("-" if check.p_value is None else f"{check.p_value:.3g}")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for row, check in zip(rows, [None, *verdict.checks]):
        cells = "  ".join(cell.ljust(w) for cell, w in zip(row, widths))
        rule = "rule" if check is None else ("ok   " if check.passed else "FAIL ") + check.explanation
        lines.append(f"{cells}  {rule}")
    failing = [c for c in verdict.checks if not c.passed]
    lines.append(f"failure mode: {FAILURE_MODES[verdict.stage]} (stage {verdict.stage})")
    lines.append("thresholds: " + "; ".join(sorted({c.source for c in failing})))
    first = result.first_failing_stage
    if first is not None and first != verdict.stage:
        lines.append(
            f"note: the first failing stage of {result.label} is {first} ({FAILURE_MODES[first]}); "
            "this stage may inherit that loss"
        )
    return "\n".join(lines)


def _round(value: Any) -> Any:
    if value is None or not math.isfinite(float(value)):
        return None
    return round(float(value), 4)


def _cell(value: float, signed: bool = False) -> str:
    if not math.isfinite(value):
        return "-"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


