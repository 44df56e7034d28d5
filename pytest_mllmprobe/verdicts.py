"""Apply threshold rules to measured loci: per-locus tests and per-stage rules -> Verdicts.

Stage rules and the failure mode each one names (METHOD.md):

  stage.vision     FHS_V and the consumed layer's chance-corrected score
                   -> quality limitation in visual representation
  stage.connector  P(C) >= min_keep x P(vision layer the connector reads)
                   -> fidelity loss in connector projection
  stage.llm        P(llm.0.image) >= min_keep x P(C); FHS_L >= min_fhs_ratio x P(C)
                   -> comprehension deficit in LLM reasoning
                   (cross-attention models, which have no image tokens: the last-token
                   readout from the first cross-attention layer on)
  stage.answer     P_final >= min_keep x P(last LLM layer, last readout)
                   -> misalignment of semantic mapping

Beside them: ``min_dip_ratio`` (vision, llm): the lowest point of the stage's curve >= ratio x
its first point, which catches a layer that collapses and is repaired downstream (the FHS alone
rewards such a dip); ``min_selectivity`` (every locus, and the locus of the vision, connector
and llm stages): the metric minus its control task's (the probe fitted on permuted labels).
Every figure carries its bootstrap interval where the run computed one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .lens import PREFIX as LENS_PREFIX
from .results import Check, LocusResult, Verdict, stage_of


NON_FINITE = (
    "features are NaN or infinite here: the activations overflow (try --mllm-dtype float32) "
    "or the weights are corrupted; scored as the best constant guess"
)


NON_FINITE_ANSWER = (
    "the model's answer scores are NaN or infinite for some images: the activations overflow "
    "(try --mllm-dtype float32) or the weights are corrupted; those answers count as wrong"
)


def llm_layers(loci: dict[str, LocusResult]) -> int:
    """Decoder layers: one past the deepest ``llm.<i>`` locus (every layer up to it is counted,
    also where a partial run measured only some of them)."""
    return 1 + max((int(n.split(".")[1]) for n in loci if n.startswith("llm.")), default=-1)


def llm_readout(loci: dict[str, LocusResult]) -> str:
    """The LLM readout the stage rules use: ``image``, or ``last`` where there are no image tokens."""
    return "image" if any(n.startswith("llm.") and n.endswith(".image") for n in loci) else "last"


def stage_curves(loci: Any, consumed: tuple[int, ...], llm_entry: int = 0) -> dict[str, list[str]]:
    """The locus names of each stage's curve, in layer order: ``vision`` up to the deepest layer
    the connector reads, ``llm`` (image readout, or last where there are no image tokens) and
    ``llm_last`` from ``llm_entry`` (the first layer that can carry the image) to the last."""
    layers = range(llm_entry, llm_layers(loci))
    return {
        "vision": [f"vision.{i}" for i in range(max(consumed) + 1)],
        "llm": [f"llm.{i}.{llm_readout(loci)}" for i in layers],
        "llm_last": [f"llm.{i}.last" for i in layers],
    }


def stage_figures(value: Any, loci: Any, consumed: tuple[int, ...], llm_entry: int, fed: str,
                  names: Any = None) -> dict[str, Any]:
    """Stage scores, transition ratios and dip ratios from ``value(locus)``: a number, or an
    array of bootstrap resamples (then every figure is an array).

    ``fed`` is the vision locus the connector reads best (chosen on the point estimates).
    ``names``: every locus name of the model, where ``loci`` holds only some (a run of selected
    tests); a figure that reads a locus not in ``loci`` is NaN.
    """
    from .health import feature_health_scores

    names = loci if names is None else names
    curves = stage_curves(names, consumed, llm_entry)
    if not all(n in loci for n in names if n != "lens" and not n.startswith("lens.")):
        measured = value

        def value(n: str) -> Any:  # noqa: F811 - the same reading, NaN where nothing was measured
            if n in loci:
                return measured(n)
            shape = np.shape(measured(next(iter(loci)))) if len(loci) else ()
            return np.full(shape, np.nan) if shape else float("nan")

    def fhs(names: list[str]) -> Any:
        stacked = np.stack([np.atleast_1d(np.asarray(value(n), dtype=np.float64)) for n in names], axis=1)
        if not all(n in loci for n in names):  # a curve not measured whole has no FHS
            out = np.full(stacked.shape[0], np.nan)
        else:
            out = feature_health_scores(stacked)
        return out if np.ndim(value(names[0])) else float(out[0])

    def ratio(a: Any, b: Any) -> Any:
        with np.errstate(divide="ignore", invalid="ignore"):
            out = np.asarray(a, dtype=np.float64) / np.asarray(b, dtype=np.float64)
        return out if np.ndim(out) else float(out)

    def low(names: list[str]) -> Any:
        return np.min(np.stack([np.asarray(value(n), dtype=np.float64) for n in names]), axis=0)

    p_c = value("connector")
    n_llm = llm_layers(names)
    scores = {
        "FHS_V": fhs(curves["vision"]),
        "FHS_C": fhs(["connector"]),
        "FHS_L": fhs(curves["llm"]),
        "FHS_L_last": fhs(curves["llm_last"]),
        "P_final": value("answer"),
    }
    ratios = {
        "connector/vision": ratio(p_c, value(fed)),
        "llm/connector": ratio(value(curves["llm"][0]), p_c),
        "FHS_L/connector": ratio(scores["FHS_L"], p_c),
        "answer/llm": ratio(scores["P_final"], value(f"llm.{n_llm - 1}.last")),
        "dip/vision": ratio(low(curves["vision"]), value(curves["vision"][0])),
        "dip/llm": ratio(low(curves["llm"]), value(curves["llm"][0])),
    }
    return {**scores, **ratios}


SCORE_KEYS = ("FHS_V", "FHS_C", "FHS_L", "FHS_L_last", "P_final")


def stage_scores(
    loci: dict[str, LocusResult], consumed: tuple[int, ...], metric: str, llm_entry: int = 0,
    names: Any = None,
) -> dict[str, float]:
    """FHS per stage and ``P_final``; FHS_V runs up to the deepest layer the connector reads,
    FHS_L from ``llm_entry`` (the first layer that can carry the image) to the last. ``names``:
    every locus name, where ``loci`` holds only the selected tests' (a figure not measured whole
    is NaN)."""
    figures = stage_figures(lambda n: loci[n].metric(metric), loci, consumed, llm_entry,
                            fed_locus(loci, consumed, metric), names)
    return {k: figures[k] for k in SCORE_KEYS}


def fed_locus(loci: Any, consumed: tuple[int, ...], metric: str) -> str:
    """The consumed vision layer that scores best: the one the connector rule compares with
    (among those measured, where a run measured only some)."""
    measured = [i for i in consumed if f"vision.{i}" in loci] or list(consumed)
    return f"vision.{max(measured, key=lambda i: loci[f'vision.{i}'].metric(metric) if f'vision.{i}' in loci else 0.0)}"


def judge(
    loci: dict[str, LocusResult],
    scores: dict[str, float],
    consumed: tuple[int, ...],
    thresholds: Any,
    llm_entry: int = 0,
    intervals: dict[str, tuple[float, float]] | None = None,
    invariance: dict[str, Any] | None = None,
    stages: Any = None,
) -> dict[str, Verdict]:
    """One verdict per locus test and per stage rule, in pipeline order.

    ``loci`` may hold only the selected tests' loci: each gets its verdict, and only the stage
    rules in ``stages`` (default: all) are judged; they must find every locus they read
    (:func:`pytest_mllmprobe.selection.stage_reads`).

    ``intervals`` holds the bootstrap intervals of the stage figures (:func:`stage_figures`'
    keys); each check carries the interval of its figure where there is one. The logit lens
    loci (``lens.<i>``) get no test of their own: they are figures, judged only by the answer
    stage's ``min_lens_keep`` rule; ``invariance`` (the answer under other option orders and
    wordings) is judged by its ``min_consistency``.
    """
    metric = thresholds.metric
    verdicts: dict[str, Verdict] = {}
    for name, locus in loci.items():
        if name.startswith(LENS_PREFIX):
            continue
        verdicts[name] = Verdict(name, locus.stage, name, tuple(_locus_checks(locus, thresholds)))
    wanted = ("vision", "connector", "llm", "answer") if stages is None else tuple(stages)
    stage_checks = _stage_checks(loci, scores, consumed, thresholds, metric, llm_entry, intervals or {}, wanted)
    if "answer" in stage_checks:
        stage_checks["answer"] += lens_check(loci, metric, thresholds, intervals or {})
        stage_checks["answer"] += consistency_checks(invariance or {}, thresholds)
    for stage, checks in stage_checks.items():
        test = f"stage.{stage}"
        verdicts[test] = Verdict(test, stage, _stage_locus(stage, loci, consumed), tuple(checks))
    return verdicts


def _locus_checks(locus: LocusResult, thresholds: Any) -> list[Check]:
    metric = thresholds.metric
    rule = thresholds.for_locus(locus.name)
    value = locus.metric(metric)
    chance = locus.chance[metric]
    interval = locus.interval(metric)
    checks: list[Check] = []
    if not locus.finite:
        checks.append(Check(
            rule="finite", metric=metric, value=value, threshold=float("nan"), passed=False,
            explanation=NON_FINITE_ANSWER if locus.name == "answer" else NON_FINITE,
            source="always on", locus=locus.name,
        ))
    if rule.min_above_chance is not None:
        needed = chance + rule.min_above_chance * (1 - chance)
        checks.append(Check(
            rule="min_above_chance", metric=metric, value=value, threshold=needed,
            passed=value >= needed, locus=locus.name, interval=interval,
            explanation=(
                f"{metric} >= chance + {rule.min_above_chance:g} x (1 - chance) "
                f"= {chance:.3f} + {rule.min_above_chance:g} x {1 - chance:.3f}"
            ),
            source=rule.source,
        ))
    if rule.floor is not None:
        checks.append(Check(
            rule="floor", metric=metric, value=value, threshold=rule.floor, interval=interval,
            passed=value >= rule.floor, explanation=f"{metric} >= {rule.floor:g}", source=rule.source,
            locus=locus.name,
        ))
    checks += selectivity_check(locus, metric, rule.min_selectivity, rule.source)
    return checks


def selectivity_check(locus: LocusResult, metric: str, minimum: float | None, source: str) -> list[Check]:
    """``selectivity = metric - control >= minimum``, where the control is the same probe fitted
    on permuted training labels; no check where the run fitted no control (the answer, or
    ``--mllm-permutations 0``)."""
    control = (locus.control or {}).get(metric)
    if minimum is None or control is None:
        return []
    selectivity = control["selectivity"]
    passed = bool(np.isfinite(selectivity) and selectivity >= minimum)
    return [Check(
        rule="min_selectivity", metric=f"{metric} selectivity", value=selectivity, threshold=minimum,
        passed=passed, locus=locus.name,
        explanation=(
            f"selectivity = {metric} - control = {locus.metric(metric):.3f} - {control['control']:.3f} "
            f"(control: the same probe on {locus.control['permutations']} permutations of the training "
            f"labels; permutation p = {control['p_value']:.3g}) >= {minimum:g}"
            + ("" if passed else (
                ": the probe reads no more here than it learns from shuffled labels" if selectivity <= 0.02
                else f": the probe reads only {selectivity:.3f} more than it learns from shuffled labels"))
        ),
        source=source,
    )]


def _stage_locus(stage: str, loci: dict[str, LocusResult], consumed: tuple[int, ...]) -> str:
    if stage == "vision":
        return f"vision.{max(consumed)}"
    if stage == "llm":
        return f"llm.{llm_layers(loci) - 1}.{llm_readout(loci)}"
    return stage


def _ratio_check(rule: str, metric: str, value: float, ratio: float | None, reference: float,
                 what: str, ref_what: str, source: str, locus: str,
                 ratio_interval: tuple[float, float] | None = None,
                 interval: tuple[float, float] | None = None) -> list[Check]:
    if ratio is None:
        return []
    needed = ratio * reference
    measured = ""
    if reference > 0 and np.isfinite(value):
        measured = f"; measured ratio {value / reference:.3f}"
        if ratio_interval is not None and all(np.isfinite(ratio_interval)):
            measured += f" [{ratio_interval[0]:.3f}, {ratio_interval[1]:.3f}]"
    return [Check(
        rule=rule, metric=metric, value=value, threshold=needed, passed=value >= needed,
        explanation=f"{what} >= {ratio:g} x {ref_what} = {ratio:g} x {reference:.3f}{measured}", source=source,
        locus=locus, interval=interval,
    )]


def _dip_check(stage: str, names: list[str], loci: dict[str, LocusResult], metric: str, ratio: float | None,
               source: str, interval: tuple[float, float] | None) -> list[Check]:
    """The lowest point of a stage's curve against its first point (a transient collapse)."""
    if ratio is None or not names:
        return []
    values = [loci[n].metric(metric) for n in names]
    low = int(np.nanargmin(values)) if np.isfinite(values).any() else 0
    first, lowest = values[0], values[low]
    needed = ratio * first
    passed = bool(lowest >= needed)
    where = f"{names[low]} (the lowest point of the {stage} curve)"
    tail = ""
    if not passed and low + 1 < len(values) and max(values[low + 1:]) >= needed:
        tail = (f": {names[low]} collapses and a later layer recovers "
                f"({max(values[low + 1:]):.3f} at {names[low + 1 + int(np.argmax(values[low + 1:]))]}); "
                "a dip that a later layer repairs raises the FHS instead of lowering it")
    span = ""
    if interval is not None and all(np.isfinite(interval)) and first > 0:
        span = f"; measured ratio {lowest / first:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"
    return [Check(
        rule="min_dip_ratio", metric=metric, value=lowest, threshold=needed, passed=passed,
        explanation=f"P({where}) >= {ratio:g} x P({names[0]}) = {ratio:g} x {first:.3f}{span}{tail}",
        source=source, locus=names[low], interval=loci[names[low]].interval(metric),
    )]


def _stage_checks(loci: dict[str, LocusResult], scores: dict[str, float], consumed: tuple[int, ...],
                  thresholds: Any, metric: str, llm_entry: int, intervals: dict[str, tuple[float, float]],
                  wanted: tuple[str, ...] = ("vision", "connector", "llm", "answer"),
                  ) -> dict[str, list[Check]]:
    src = thresholds.stage_source
    checks: dict[str, list[Check]] = {s: [] for s in ("vision", "connector", "llm", "answer") if s in wanted}
    if "vision" in checks or "connector" in checks:
        fed = fed_locus(loci, consumed, metric)
        fed_value = loci[fed].metric(metric)
    if "connector" in checks or "llm" in checks:
        p_c = loci["connector"].metric(metric)
    n_llm = llm_layers(loci)
    curves = stage_curves(loci, consumed, llm_entry)

    if "vision" in checks:
        min_fhs = thresholds.stage("vision", "min_fhs")
        if min_fhs is not None:
            checks["vision"].append(Check(
                rule="min_fhs", metric="FHS_V", value=scores["FHS_V"], threshold=min_fhs,
                passed=scores["FHS_V"] >= min_fhs, explanation=f"FHS_V >= {min_fhs:g}",
                source=src("vision", "min_fhs"), locus=f"vision.{max(consumed)}", interval=intervals.get("FHS_V"),
            ))
        end_min = thresholds.stage("vision", "min_end_above_chance")
        if end_min is not None:
            chance = loci[fed].chance[metric]
            needed = chance + end_min * (1 - chance)
            checks["vision"].append(Check(
                rule="min_end_above_chance", metric=metric, value=fed_value, threshold=needed,
                passed=fed_value >= needed, interval=loci[fed].interval(metric),
                explanation=(
                    f"P({fed}, the layer the connector reads) >= chance + {end_min:g} x "
                    f"(1 - chance) = {chance:.3f} + {end_min:g} x {1 - chance:.3f}"
                ),
                source=src("vision", "min_end_above_chance"), locus=fed,
            ))
        checks["vision"] += _dip_check("vision", curves["vision"], loci, metric,
                                       thresholds.stage("vision", "min_dip_ratio"),
                                       src("vision", "min_dip_ratio"), intervals.get("dip/vision"))
        checks["vision"] += selectivity_check(loci[fed], metric, thresholds.stage("vision", "min_selectivity"),
                                              src("vision", "min_selectivity"))
    if "connector" in checks:
        checks["connector"] += _ratio_check(
            "min_keep", metric, p_c, thresholds.stage("connector", "min_keep"), fed_value,
            "P(connector)", f"P({fed})", src("connector", "min_keep"), "connector",
            intervals.get("connector/vision"), loci["connector"].interval(metric),
        )
        checks["connector"] += selectivity_check(loci["connector"], metric,
                                                 thresholds.stage("connector", "min_selectivity"),
                                                 src("connector", "min_selectivity"))
    if "llm" in checks:
        readout = llm_readout(loci)
        entry = f"llm.{llm_entry}.{readout}"
        checks["llm"] += _ratio_check(
            "min_keep", metric, loci[entry].metric(metric), thresholds.stage("llm", "min_keep"),
            p_c, f"P({entry})", "P(connector)", src("llm", "min_keep"), entry,
            intervals.get("llm/connector"), loci[entry].interval(metric),
        )
        fhs_ratio = thresholds.stage("llm", "min_fhs_ratio")
        if fhs_ratio is not None:
            checks["llm"] += _ratio_check(
                "min_fhs_ratio", "FHS_L", scores["FHS_L"], fhs_ratio, p_c,
                f"FHS_L ({readout} readout" + (f", llm.{llm_entry} on)" if llm_entry else ")"), "P(connector)",
                src("llm", "min_fhs_ratio"), f"llm.{n_llm - 1}.{readout}",
                intervals.get("FHS_L/connector"), intervals.get("FHS_L"),
            )
        checks["llm"] += _dip_check("llm", curves["llm"], loci, metric, thresholds.stage("llm", "min_dip_ratio"),
                                    src("llm", "min_dip_ratio"), intervals.get("dip/llm"))
        last_main = f"llm.{n_llm - 1}.{readout}"
        checks["llm"] += selectivity_check(loci[last_main], metric, thresholds.stage("llm", "min_selectivity"),
                                           src("llm", "min_selectivity"))
    if "answer" in checks:
        last = loci[f"llm.{n_llm - 1}.last"].metric(metric)
        checks["answer"] += _ratio_check(
            "min_keep", metric, scores["P_final"], thresholds.stage("answer", "min_keep"), last,
            "P_final", f"P(llm.{n_llm - 1}.last)", src("answer", "min_keep"), "answer",
            intervals.get("answer/llm"), intervals.get("P_final"),
        )
    return checks


def lens_check(loci: dict[str, LocusResult], metric: str, thresholds: Any,
               intervals: dict[str, tuple[float, float]]) -> list[Check]:
    """``P(lens.<last>) >= min_lens_keep x P(llm.<last>.last)``: the model's own words at its last
    layer keep what its probe reads there. The explanation names where probe and lens part."""
    ratio = thresholds.stage("answer", "min_lens_keep")
    n = llm_layers(loci)
    lens_last, probe_last = f"{LENS_PREFIX}{n - 1}", f"llm.{n - 1}.last"
    if ratio is None or lens_last not in loci:
        return []
    checks = _ratio_check(
        "min_lens_keep", metric, loci[lens_last].metric(metric), ratio, loci[probe_last].metric(metric),
        f"P({lens_last}, the logit lens)", f"P({probe_last})", thresholds.stage_source("answer", "min_lens_keep"),
        lens_last, intervals.get("lens/llm"), loci[lens_last].interval(metric),
    )
    check = checks[0]
    return [Check(**{**check.__dict__, "explanation": f"{check.explanation}; {lens_story(loci, metric, ratio, thresholds)}"})]


def lens_story(loci: dict[str, LocusResult], metric: str, ratio: float, thresholds: Any) -> str:
    """Where the class becomes readable (the last-token probe stays above its pass line from that
    layer on) and where the model's own words say it (the lens keeps ``ratio`` of the probe)."""
    n = llm_layers(loci)

    def readable(i: int) -> bool:
        locus = loci[f"llm.{i}.last"]
        chance = locus.chance[metric]
        floor = thresholds.for_locus(locus.name).min_above_chance or 0.0
        return locus.metric(metric) >= chance + floor * (1 - chance) and locus.metric(metric) > chance

    def said(i: int) -> bool:
        return readable(i) and loci[f"{LENS_PREFIX}{i}"].metric(metric) >= ratio * loci[f"llm.{i}.last"].metric(metric)

    probe_on = [i for i in range(n) if all(readable(j) for j in range(i, n))]
    if not probe_on:
        return "the class is not readable at the last layer's last token"
    text = f"the class is readable from llm.{probe_on[0]} on"
    good = [i for i in range(n) if said(i)]
    if not good:
        best = max(range(n), key=lambda i: loci[f"{LENS_PREFIX}{i}"].metric(metric))
        return (f"{text}, but the model's own words never say it (the lens reaches at most "
                f"{loci[f'{LENS_PREFIX}{best}'].metric(metric):.3f}, at llm.{best})")
    text += f", and in the model's own words from llm.{good[0]}" if good[0] == probe_on[0] else \
        f", but in the model's own words only from llm.{good[0]}"
    if not said(n - 1):
        text += f" and wrongly after llm.{good[-1]}"
    return text


def consistency_checks(invariance: dict[str, Any], thresholds: Any) -> list[Check]:
    """``consistency >= min_consistency`` for the option orders and for the wordings scored."""
    minimum = thresholds.stage("answer", "min_consistency")
    if minimum is None:
        return []
    checks = []
    for group, what in (("orders", "cyclic rotations of the option order"), ("prompts", "wordings of the question")):
        found = invariance.get(group)
        if not found:
            continue
        value, r = found["consistency"], found["n_prompts"]
        passed = bool(np.isfinite(value) and value >= minimum)
        checks.append(Check(
            rule="min_consistency", metric=f"consistency ({group})", value=value, threshold=minimum, passed=passed,
            explanation=(
                f"consistency >= {minimum:g}: per image, the share of its answers under {r} {what} that agree "
                f"with its most common answer (1: always the same; {1 / r:.3f} = 1/{r}: a new answer each time); "
                f"answered the same every time: {found['all_same']:.3f}, right every time (CircularEval): "
                f"{found['circular_accuracy']:.3f}"
                + ("" if passed else (
                    ": the answer follows the position of the options, not the image" if group == "orders"
                    and value <= 1 / r + 0.1 else f": the answer depends on the {group[:-1]}, not only on the image"))
            ),
            source=thresholds.stage_source("answer", "min_consistency"), locus="answer",
        ))
    return checks


__all__ = ["judge", "stage_scores", "stage_of"]
