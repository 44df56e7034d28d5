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

#: key of ``config.workeroutput`` that carries a worker's usage error to the xdist controller
USAGE_ERROR_KEY = "mllmprobe_usage_error"
#: the usage errors this process stopped the session with (printed as ``ERROR:`` lines at the end)
USAGE_ERRORS = pytest.StashKey[list]()
#: under torchrun: why the process group broke (no baseline or report is written then)
RANK_LOST = pytest.StashKey[str]()
TIMEOUT_HINT = (
    "it runs once, in the model's first test, for all its tests, and is not restarted: give it "
    "time with a longer --timeout, or set timeout_func_only = true (the limit then applies to "
    "each test's own check, not to the shared evaluation)"
)


class ProbeFailure(AssertionError):
    """A probe or stage rule is below its threshold; ``repr_failure`` prints the table."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


def end_with_usage_error(node: pytest.Node, message: str) -> None:
    """Stop the session with exit code 4 and ``message``: bad input is not a failing model.

    Under pytest-xdist the worker stops the controller (``shouldstop``) and hands the message
    over in ``workeroutput``; the controller then exits with 4 too (``ProbeReporter``).
    """
    __tracebackhide__ = True
    text = f"mllmprobe usage error: {message}"
    node.config.stash.setdefault(USAGE_ERRORS, []).append(message)
    workeroutput = getattr(node.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: stop the controller and the other workers too
        workeroutput[USAGE_ERROR_KEY] = message
        node.session.shouldstop = text
    pytest.exit(text, returncode=pytest.ExitCode.USAGE_ERROR)


class ModelNode(pytest.Collector):
    """All probe tests of one model; evaluates the model once, in its setup (its first test).

    Bad input found only then (a tokenizer that cannot tell two class names apart, an image
    that fails to decode, ...) ends the session with exit code 4, not as failing tests. Any
    other failure (a timeout included) is kept and re-raised for every later test of the model:
    the evaluation is never restarted.
    """

    _failure: BaseException | None = None
    #: the test whose report showed the failure in full
    _failure_shown: str = ""

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

    def setup(self) -> None:
        __tracebackhide__ = True
        if self._failure is not None:
            raise self._failure
        try:
            self.result()
        except pytest.fail.Exception as exc:  # pytest-timeout fails the test it interrupts
            if not str(exc).startswith("Timeout") or not self.config.pluginmanager.hasplugin("timeout"):
                self._failure = exc
                raise
            self._failure = pytest.fail.Exception(
                f"mllmprobe: {self.name}: the evaluation (model load, extraction, probes) was stopped "
                f"by pytest-timeout ({exc}); {TIMEOUT_HINT}", pytrace=False,
            )
            raise self._failure from None
        except Exception as exc:
            self._failure = exc
            from .distributed import RankLost

            if isinstance(exc, RankLost):  # the process group is broken: no later model can run
                self.config.stash[RANK_LOST] = str(exc)
                pytest.exit(f"mllmprobe: {self.name}: {exc}", returncode=pytest.ExitCode.TESTS_FAILED)
            raise

    def result(self) -> Any:
        """The :class:`~pytest_mllmprobe.results.ModelResult`, computed on first use.

        A :class:`~pytest_mllmprobe.errors.ConfigError` ends the session (exit code 4).
        """
        __tracebackhide__ = True
        from .errors import ConfigError

        try:
            return self.evaluator.result(self.model_plan.spec.label)
        except ConfigError as exc:
            end_with_usage_error(self, f"{self.name}: {exc}")
            raise  # not reached: pytest.exit raises


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

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
        if isinstance(excinfo.value, ProbeFailure):
            return excinfo.value.text
        node = self.parent
        if isinstance(node, ModelNode) and excinfo.value is node._failure:
            # the model's evaluation failed in its setup: the full report once, then one line
            if node._failure_shown:
                return (f"{type(excinfo.value).__name__}: {_first_line(excinfo.value)} (the evaluation of "
                        f"{node.name} failed in its first test, {node._failure_shown}; see that report)")
            node._failure_shown = self.nodeid
            if isinstance(excinfo.value, pytest.fail.Exception):
                return str(excinfo.value)
            return super().repr_failure(excinfo, style="short")
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
        "value_low": _round(check.interval[0]) if check and check.interval else None,
        "value_high": _round(check.interval[1]) if check and check.interval else None,
        "threshold": _round(check.threshold) if check else None,
        "delta": _round(check.delta) if check else None,
        "rule": check.rule if check else None,
        "passed": verdict.passed,
        "failure_mode": verdict.failure_mode,
        **comparison_figures(verdict),
        **answer_figures(result, verdict),
        **control_figures(result, verdict),
    }


def control_figures(result: Any, verdict: Any) -> dict[str, Any]:
    """The control task of a locus test: control metric, selectivity, permutation p-value."""
    name = next((c.locus for c in verdict.checks if c.rule == "min_selectivity"), verdict.test)
    locus = result.loci.get(name)  # a stage test: the locus its selectivity rule read
    control = ((locus.control or {}).get(result.metric) if locus is not None else None)
    if not control:
        return {}
    return {
        "control": _round(control["control"]),
        "selectivity": _round(control["selectivity"]),
        "permutation_p": _round(control["p_value"]),
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
    if verdict.test == "stage.answer":  # the lens loci have no test of their own: their figures ride here
        for name, locus in result.loci.items():
            if name.startswith("lens."):
                figures[name] = _round(locus.metric(result.metric))
        for group, found in (answers.get("invariance") or {}).items():
            if isinstance(found, dict):
                figures[f"consistency_{group}"] = _round(found["consistency"])
                figures[f"circular_accuracy_{group}"] = _round(found["circular_accuracy"])
    return figures


def lens_line(result: Any) -> str | None:
    """``logit lens (llm.0 -> llm.3): 0.65 0.97 0.97 0.97 (P_final 0.97)``, or why there is none."""
    lens = (result.answers or {}).get("lens") or {}
    values = [locus.metric(result.metric) for name, locus in result.loci.items() if name.startswith("lens.")]
    if not values:
        return f"logit lens: none ({lens['note']})" if lens.get("note") else None
    return (f"logit lens, {result.metric} of the model's own words at each decoder layer (llm.0 -> llm.{len(values) - 1}): "
            f"{' '.join(_cell(v) for v in values)} (P_final {_cell(result.scores.get('P_final', math.nan))})")


def invariance_line(result: Any) -> str | None:
    """The answer under other option orders and wordings: per-prompt accuracy, consistency,
    CircularEval accuracy, and the extra forwards it cost."""
    found = (result.answers or {}).get("invariance") or {}
    said = []
    for group, what in (("orders", "option orders"), ("prompts", "wordings")):
        info = found.get(group)
        if info:
            said.append(
                f"{info['n_prompts']} {what}: accuracy {'/'.join(_cell(a) for a in info['accuracy'])}, "
                f"consistency {_cell(info['consistency'])}, CircularEval accuracy {_cell(info['circular_accuracy'])}"
            )
    if not said:
        return None
    extra = sum(found[g]["n_prompts"] - 1 for g in ("orders", "prompts") if found.get(g))
    cost = found.get("cost_s")
    how = f"{cost:.1f} s" if cost is not None else "from the cache"
    return f"answer invariance: {'; '.join(said)} [cost: {extra} more forward(s) per image, {how}]"


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
        "uncertainty": uncertainty_line(result),
        "power": power_line(result),
        "random_init": random_init_line(result),
        "lens": lens_line(result),
        "invariance": invariance_line(result),
        "selection": selection_lines(result),
        **changes_lines(result),
    }


def selection_lines(result: Any) -> list[str]:
    """What a run of selected tests left out or could not leave out, and why (empty: a full run)."""
    selection = getattr(result, "selection", None) or {}
    lines = list(selection.get("notes") or [])
    if selection.get("reason"):
        lines.append(selection["reason"])
    pooled, cached = result.timings.get("pooled_loci"), result.timings.get("cached_loci")
    if cached and pooled:
        lines.append(f"features: {int(cached)} loci from the cache, {int(pooled)} extracted")
    return lines


def uncertainty_line(result: Any) -> str | None:
    """How the intervals and controls were measured, and what they cost."""
    info = result.uncertainty or {}
    said = []
    if info.get("bootstrap_resamples"):
        said.append(f"[95% intervals: bootstrap over {info['n_units']} test {info['unit']}s, "
                    f"{info['bootstrap_resamples']} resamples, {result.timings.get('bootstrap_s', 0.0):.2f} s]")
    if info.get("permutations"):
        said.append(f"[controls: {info['permutations']} permuted-label probes per locus, fitted with the probes "
                    f"({result.timings.get('probe_s', 0.0):.1f} s in all)]")
    elif info:  # --mllm-permutations 0, or the MLP probe's default: say what is not checked
        said.append("[controls: none fitted, so min_selectivity is not checked; --mllm-permutations N fits them]")
    return " ".join(said) or None


def power_line(result: Any) -> str | None:
    """The warning of a gate that cannot see its own ``max_drop``, when comparing."""
    from .baseline import power_warning

    info = (result.comparison or {}).get("power")
    return power_warning(result.label, info) if info else None


def random_init_line(result: Any) -> str | None:
    """The random-initialisation twin's profile and what it cost (``--mllm-controls random-init``)."""
    twin = result.random_init
    if not twin:
        return None
    scores = twin.get("scores", {})
    profile = " -> ".join(f"{k} {_cell(scores[k]) if scores.get(k) is not None else 'n/a'}"
                          for k in ("FHS_V", "FHS_C", "FHS_L"))
    cost = twin.get("cost_s")
    return (f"random-init twin: {profile} (same architecture, re-initialised weights; "
            f"cost {cost:.1f} s{', from the cache' if twin.get('cached') else ''})")


def changes_lines(result: Any) -> dict[str, Any]:
    """What the fine-tune changed (``changes``) and the regressions its weights cannot explain
    (``contradiction``), for the summary; nothing when the run does not know."""
    changes = getattr(result, "changes", None)
    if not changes:
        return {}
    lines = {"changes": f"{changes['text']} (vs {changes['against']})"}
    found = (result.comparison or {}).get("contradictions") or []
    if found:
        lines["contradiction"] = (
            f"contradiction: regression reported in {', '.join(found)}, whose weights (and every upstream "
            "stage's) did not change: noise or a measurement bug, not the fine-tune"
        )
    return lines


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
        value = _cell(check.value)
        if check.interval is not None and all(math.isfinite(v) for v in check.interval):
            value += f" [{check.interval[0]:.3f}, {check.interval[1]:.3f}]"
        row = [result.label, verdict.stage, verdict.locus, check.metric, value, _cell(check.threshold)]
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
    lines.insert(0, headline(verdict, failing))
    lines.append(f"failure mode: {FAILURE_MODES[verdict.stage]} (stage {verdict.stage})")
    lines.append("thresholds: " + "; ".join(sorted({c.source for c in failing})))
    first = result.first_failing_stage
    if first is not None and first != verdict.stage:
        lines.append(
            f"note: the first failing stage of {result.label} is {first} ({FAILURE_MODES[first]}); "
            "this stage may inherit that loss"
        )
    return "\n".join(lines)


def headline(verdict: Any, failing: list[Any]) -> str:
    """The finding in one line, with its figures: what a CI annotation (the ``FAILED`` line, the
    JUnit ``message``) shows, e.g. ``connector: accuracy 0.333 < 0.792 (rule: ...); fidelity loss
    in connector projection``."""
    check = failing[0]
    mode = FAILURE_MODES[verdict.stage]
    more = f" (+{len(failing) - 1} more failing check(s))" if len(failing) > 1 else ""
    if check.rule == "no_regression":
        p = "" if check.p_value is None else f", Holm p = {check.p_value:.3g}"
        finding = (f"{check.metric} {_cell(check.value)} vs {_cell(check.reference)} in the reference "
                   f"(delta {_cell(check.delta, signed=True)}{p})")
    elif not math.isfinite(check.threshold):
        finding = check.explanation
    else:
        finding = f"{check.metric} {_cell(check.value)} < {_cell(check.threshold)} (rule: {check.explanation})"
    return f"{verdict.test}: {finding}; {mode}{more}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _round(value: Any) -> Any:
    if value is None or not math.isfinite(float(value)):
        return None
    return round(float(value), 4)


def _cell(value: float, signed: bool = False) -> str:
    if not math.isfinite(value):
        return "-"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


