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
"""

from __future__ import annotations

from typing import Any

from .health import feature_health_score
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
    return len({n.split(".")[1] for n in loci if n.startswith("llm.")})


def llm_readout(loci: dict[str, LocusResult]) -> str:
    """The LLM readout the stage rules use: ``image``, or ``last`` where there are no image tokens."""
    return "image" if any(n.startswith("llm.") and n.endswith(".image") for n in loci) else "last"


def stage_scores(
    loci: dict[str, LocusResult], consumed: tuple[int, ...], metric: str, llm_entry: int = 0
) -> dict[str, float]:
    """FHS per stage and ``P_final``; FHS_V runs up to the deepest layer the connector reads,
    FHS_L from ``llm_entry`` (the first layer that can carry the image) to the last."""
    vision = [loci[f"vision.{i}"].metric(metric) for i in range(max(consumed) + 1)]
    layers = range(llm_entry, llm_layers(loci))
    main = [loci[f"llm.{i}.{llm_readout(loci)}"].metric(metric) for i in layers]
    last = [loci[f"llm.{i}.last"].metric(metric) for i in layers]
    connector = loci["connector"].metric(metric)
    return {
        "FHS_V": feature_health_score(vision),
        "FHS_C": feature_health_score([connector]),
        "FHS_L": feature_health_score(main),
        "FHS_L_last": feature_health_score(last),
        "P_final": loci["answer"].metric(metric),
    }


def judge(
    loci: dict[str, LocusResult],
    scores: dict[str, float],
    consumed: tuple[int, ...],
    thresholds: Any,
    llm_entry: int = 0,
) -> dict[str, Verdict]:
    """One verdict per locus test and per stage rule, in pipeline order."""
    metric = thresholds.metric
    verdicts: dict[str, Verdict] = {}
    for name, locus in loci.items():
        verdicts[name] = Verdict(name, locus.stage, name, tuple(_locus_checks(locus, thresholds)))
    for stage, checks in _stage_checks(loci, scores, consumed, thresholds, metric, llm_entry).items():
        test = f"stage.{stage}"
        verdicts[test] = Verdict(test, stage, _stage_locus(stage, loci, consumed), tuple(checks))
    return verdicts


def _locus_checks(locus: LocusResult, thresholds: Any) -> list[Check]:
    metric = thresholds.metric
    rule = thresholds.for_locus(locus.name)
    value = locus.metric(metric)
    chance = locus.chance[metric]
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
            passed=value >= needed, locus=locus.name,
            explanation=(
                f"{metric} >= chance + {rule.min_above_chance:g} x (1 - chance) "
                f"= {chance:.3f} + {rule.min_above_chance:g} x {1 - chance:.3f}"
            ),
            source=rule.source,
        ))
    if rule.floor is not None:
        checks.append(Check(
            rule="floor", metric=metric, value=value, threshold=rule.floor,
            passed=value >= rule.floor, explanation=f"{metric} >= {rule.floor:g}", source=rule.source,
            locus=locus.name,
        ))
    return checks


def _stage_locus(stage: str, loci: dict[str, LocusResult], consumed: tuple[int, ...]) -> str:
    if stage == "vision":
        return f"vision.{max(consumed)}"
    if stage == "llm":
        return f"llm.{llm_layers(loci) - 1}.{llm_readout(loci)}"
    return stage


def _ratio_check(rule: str, metric: str, value: float, ratio: float | None, reference: float,
                 what: str, ref_what: str, source: str, locus: str) -> list[Check]:
    if ratio is None:
        return []
    needed = ratio * reference
    return [Check(
        rule=rule, metric=metric, value=value, threshold=needed, passed=value >= needed,
        explanation=f"{what} >= {ratio:g} x {ref_what} = {ratio:g} x {reference:.3f}", source=source,
        locus=locus,
    )]


def _stage_checks(loci: dict[str, LocusResult], scores: dict[str, float], consumed: tuple[int, ...],
                  thresholds: Any, metric: str, llm_entry: int = 0) -> dict[str, list[Check]]:
    src = thresholds.stage_source
    fed = max(consumed, key=lambda i: loci[f"vision.{i}"].metric(metric))
    fed_value = loci[f"vision.{fed}"].metric(metric)
    p_c = loci["connector"].metric(metric)
    n_llm = llm_layers(loci)
    checks: dict[str, list[Check]] = {s: [] for s in ("vision", "connector", "llm", "answer")}

    min_fhs = thresholds.stage("vision", "min_fhs")
    if min_fhs is not None:
        checks["vision"].append(Check(
            rule="min_fhs", metric="FHS_V", value=scores["FHS_V"], threshold=min_fhs,
            passed=scores["FHS_V"] >= min_fhs, explanation=f"FHS_V >= {min_fhs:g}",
            source=src("vision", "min_fhs"), locus=f"vision.{max(consumed)}",
        ))
    end_min = thresholds.stage("vision", "min_end_above_chance")
    if end_min is not None:
        chance = loci[f"vision.{fed}"].chance[metric]
        needed = chance + end_min * (1 - chance)
        checks["vision"].append(Check(
            rule="min_end_above_chance", metric=metric, value=fed_value, threshold=needed,
            passed=fed_value >= needed,
            explanation=(
                f"P(vision.{fed}, the layer the connector reads) >= chance + {end_min:g} x "
                f"(1 - chance) = {chance:.3f} + {end_min:g} x {1 - chance:.3f}"
            ),
            source=src("vision", "min_end_above_chance"), locus=f"vision.{fed}",
        ))
    checks["connector"] += _ratio_check(
        "min_keep", metric, p_c, thresholds.stage("connector", "min_keep"), fed_value,
        "P(connector)", f"P(vision.{fed})", src("connector", "min_keep"), "connector",
    )
    readout = llm_readout(loci)
    entry = f"llm.{llm_entry}.{readout}"
    checks["llm"] += _ratio_check(
        "min_keep", metric, loci[entry].metric(metric), thresholds.stage("llm", "min_keep"),
        p_c, f"P({entry})", "P(connector)", src("llm", "min_keep"), entry,
    )
    fhs_ratio = thresholds.stage("llm", "min_fhs_ratio")
    if fhs_ratio is not None:
        checks["llm"] += _ratio_check(
            "min_fhs_ratio", "FHS_L", scores["FHS_L"], fhs_ratio, p_c,
            f"FHS_L ({readout} readout" + (f", llm.{llm_entry} on)" if llm_entry else ")"), "P(connector)",
            src("llm", "min_fhs_ratio"), f"llm.{n_llm - 1}.{readout}",
        )
    last = loci[f"llm.{n_llm - 1}.last"].metric(metric)
    checks["answer"] += _ratio_check(
        "min_keep", metric, scores["P_final"], thresholds.stage("answer", "min_keep"), last,
        "P_final", f"P(llm.{n_llm - 1}.last)", src("answer", "min_keep"), "answer",
    )
    return checks


__all__ = ["judge", "stage_scores", "stage_of"]
