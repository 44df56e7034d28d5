"""Baselines: a model's measured loci saved as JSON, checked for compatibility, merged, compared.

A baseline entry holds, per model: every locus's metrics and per-image correctness on the test
split (for paired tests), the stage scores, the test-split ids and a data fingerprint, the
extraction and probe settings, and package versions. Files are JSON, written atomically.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError
from .atomic import atomic_write_bytes, remove_stale
from .results import Check, ModelResult, Verdict
from .settings import METRICS
from .stats import (
    POWER, clustered_regression, holm, mcnemar_regression, min_detectable_drop, paired_difference_interval,
)

FORMAT = "pytest-mllmprobe-baseline"
#: 2: settings hold the answer mode and the folds; every entry is schema-checked on load
VERSION = 2
SAVE_HINT = "create it with --mllm-save-baseline PATH (or --mllm-update-baseline)"
#: The run settings a baseline entry records (what decided its numbers).
SETTINGS_KEPT = ("probe", "answer", "folds", "test_size", "seed", "max_samples", "dtype", "batch_size")
#: Settings whose change makes a comparison meaningless: it refuses instead of reporting regressions.
SETTINGS_COMPARED = ("probe", "answer")
#: Stage test -> (stage score, the locus whose paired outcomes test it).
STAGE_FIGURES = {"vision": "FHS_V", "connector": "FHS_C", "llm": "FHS_L", "answer": "P_final"}


def versions() -> dict[str, str]:
    from importlib import metadata

    found = {}
    for name in ("pytest-mllmprobe", "torch", "transformers", "scikit-learn", "numpy"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def entry_from_result(result: ModelResult, data: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """The baseline entry of one model (also the reference of a same-job comparison).

    The logit lens loci are left out: they have no test to compare (the answer stage's rule
    compares ``P_final``)."""
    loci = {name: locus for name, locus in result.loci.items() if not name.startswith("lens.")}
    return {
        "source": result.source,
        "family": result.stage_map["family"],
        "loci_names": list(loci),
        "metric": result.metric,
        "class_names": list(result.class_names),
        "data": {"fingerprint": data["fingerprint"], "test_ids": list(data["test_ids"]),
                 "fold_of": list(data.get("fold_of") or [])},
        "settings": {k: settings[k] for k in SETTINGS_KEPT if k in settings},
        "loci": {
            name: {
                **{m: _finite_or_none(locus.metric(m)) for m in METRICS},
                "correct": [int(c) for c in locus.correct],
            }
            for name, locus in loci.items()
        },
        "scores": {k: (None if v is None or not np.isfinite(v) else float(v)) for k, v in result.scores.items()},
    }


def _finite_or_none(value: float) -> float | None:
    return float(value) if value is not None and np.isfinite(value) else None


def load_baseline(path: str | os.PathLike[str], flag: str = "--mllm-baseline") -> dict[str, Any]:
    """Read and schema-check a baseline file; ConfigError naming the file, key and fix otherwise."""
    from .schema import BASELINE_ENTRY, MapOf, check, failer

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{flag} {str(path)!r} does not exist; {SAVE_HINT}")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(
            f"{flag} {str(path)!r} is not a readable JSON baseline ({exc}); delete it or choose "
            "another path, then save the baseline again"
        ) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ConfigError(
            f"{flag} {str(path)!r} is not a pytest-mllmprobe baseline (no \"format\": {FORMAT!r}); "
            "delete it or choose another path, then save the baseline again"
        )
    if doc.get("version") != VERSION:
        raise ConfigError(
            f"{flag} {str(path)!r}: key version is {doc.get('version')!r}, this release reads baseline "
            f"version {VERSION}; re-create it with --mllm-update-baseline (same data and settings)"
        )
    fix = "re-create it with --mllm-update-baseline, or restore the file"
    check(doc, {"models": MapOf(BASELINE_ENTRY)}, "", failer(f"{flag} {str(path)!r}", fix))
    for label, entry in doc["models"].items():
        where = f"{flag} {str(path)!r}: models.{label}"
        if sorted(entry["loci"]) != sorted(entry["loci_names"]):
            raise ConfigError(f"{where}.loci does not hold the loci that loci_names lists; {fix}")
        n = len(entry["data"]["test_ids"])
        for name, locus in entry["loci"].items():
            if len(locus["correct"]) != n or any(c not in (0, 1) for c in locus["correct"]):
                raise ConfigError(
                    f"{where}.loci.{name}.correct must hold one 0/1 per test image ({n}), got "
                    f"{len(locus['correct'])} values; {fix}"
                )
    return doc


def check_compatible(entry: dict[str, Any] | None, label: str, path: str, *, fingerprint: str,
                     test_ids: list[str], loci: tuple[str, ...], class_names: list[str],
                     settings: dict[str, Any] | None = None, metric: str | None = None,
                     fold_of: list[int] | None = None) -> None:
    """Raise ConfigError when a baseline entry was measured on other data, split, architecture,
    probe, answer mode or metric: comparing them would report differences that are not regressions."""
    fix = "re-create it with --mllm-update-baseline if this change is intended"
    if entry is None:
        raise ConfigError(f"--mllm-baseline {path!r} has no entry for model {label!r}; add it with --mllm-update-baseline")
    if entry["class_names"] != class_names or entry["data"]["fingerprint"] != fingerprint:
        raise ConfigError(
            f"--mllm-baseline {path!r}: model {label!r} was measured on another dataset (data "
            f"fingerprint {entry['data']['fingerprint']} with classes {entry['class_names']}, now "
            f"{fingerprint} with {class_names}); {fix}"
        )
    folds_then = entry["data"].get("fold_of") or []
    if entry["data"]["test_ids"] != test_ids or (fold_of is not None and folds_then and folds_then != fold_of):
        raise ConfigError(
            f"--mllm-baseline {path!r}: model {label!r} was measured on another train/test split "
            f"(check --mllm-seed, --mllm-folds, --mllm-test-size and --mllm-max-samples against the "
            f"baseline's {entry['settings']}); {fix}"
        )
    if list(entry["loci_names"]) != list(loci):
        raise ConfigError(
            f"--mllm-baseline {path!r}: model {label!r} has another architecture "
            f"({len(entry['loci_names'])} loci in the baseline, {len(loci)} now); {fix}"
        )
    for key in SETTINGS_COMPARED:
        then, now = entry["settings"].get(key), (settings or {}).get(key)
        if settings is not None and then != now:
            raise ConfigError(
                f"--mllm-baseline {path!r}: model {label!r} was measured with --mllm-{key} {then}, this "
                f"run uses --mllm-{key} {now}: the numbers are not comparable; run with --mllm-{key} "
                f"{then}, or {fix}"
            )
    if metric is not None and entry["metric"] != metric:
        raise ConfigError(
            f"--mllm-baseline {path!r}: model {label!r} was gated on metric {entry['metric']}, this run "
            f"on {metric} (--mllm-metric or the threshold files); use the same metric, or {fix}"
        )


def merge(existing: dict[str, Any] | None, entries: dict[str, tuple[dict[str, Any], set[str]]]) -> dict[str, Any]:
    """Update a baseline with the tests that ran; every other model and locus is kept.

    ``entries`` maps a model label to (its new entry, the names of the tests that ran). A model
    whose data, split, architecture, metric or extraction/probe settings changed is replaced
    whole, so that one entry never mixes numbers measured two ways.
    """
    models = dict((existing or {}).get("models", {}))
    for label, (entry, ran) in entries.items():
        old = models.get(label)
        same = old is not None and all(
            old.get(key) == entry[key] for key in ("data", "loci_names", "settings", "metric", "class_names")
        )
        if not same or not ran:
            models[label] = entry
            continue
        merged = json.loads(json.dumps(old))
        for name in entry["loci"]:
            if name in ran:
                merged["loci"][name] = entry["loci"][name]
        for stage, figure in STAGE_FIGURES.items():
            if f"stage.{stage}" in ran:
                merged["scores"][figure] = entry["scores"][figure]
                if stage == "llm":
                    merged["scores"]["FHS_L_last"] = entry["scores"].get("FHS_L_last")
        models[label] = merged
    return {
        "format": FORMAT,
        "version": VERSION,
        "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "models": models,
    }


def write_json_atomic(path: str | os.PathLike[str], doc: dict[str, Any]) -> Path:
    """Write JSON to a temporary file beside ``path`` and rename it over ``path`` (leftovers of
    killed runs beside it are removed first)."""
    text = json.dumps(doc, indent=1, sort_keys=True) + "\n"
    remove_stale(Path(path).parent)
    return atomic_write_bytes(path, text.encode("utf-8"))


@dataclass(frozen=True)
class Comparison:
    test: str
    figure: str
    value: float
    reference: float
    p_value: float
    ci: tuple[float, float]

    @property
    def drop(self) -> float:
        return self.reference - self.value


def compare(result: ModelResult, reference: dict[str, Any], thresholds: Any, what: str,
            groups: np.ndarray | None = None) -> dict[str, Verdict]:
    """Verdicts of ``result`` with a ``no_regression`` check added against ``reference``.

    A test regresses when its figure drops by more than ``regression.max_drop`` AND the paired
    test on the test images is significant (``regression.alpha``, Holm-corrected over all tests
    of the model): the exact McNemar test, or, when the data has patients (``groups``, one per
    test image), a sign-flip test of per-patient differences (several images of one patient are
    not independent evidence). Stage tests compare the stage score (FHS or ``P_final``), tested
    on the paired outcomes of the stage's last locus.
    """
    metric = result.metric
    comparisons: dict[str, Comparison] = {}
    for name, verdict in result.verdicts.items():
        if name.startswith("stage."):
            stage = name.split(".", 1)[1]
            figure = STAGE_FIGURES[stage]
            value, ref = result.scores[figure], reference["scores"].get(figure)
        else:
            figure = metric
            value, ref = result.loci[name].metric(metric), reference["loci"][name].get(metric)
        locus = verdict.locus
        ours = result.loci[locus].correct
        theirs = np.asarray(reference["loci"][locus]["correct"], dtype=bool)
        if ref is None or value is None or not np.isfinite(value):
            ref = ref if ref is not None else float("nan")
        if groups is None:
            p_value, ci = mcnemar_regression(theirs, ours), paired_difference_interval(theirs, ours)
        else:
            p_value, ci = clustered_regression(theirs, ours, groups)
        comparisons[name] = Comparison(
            test=name, figure=figure, value=float(value), reference=float(ref), p_value=p_value, ci=ci,
        )
    adjusted = holm({k: c.p_value for k, c in comparisons.items()})
    max_drop = thresholds.regression.get("max_drop")
    alpha = thresholds.regression.get("alpha")
    sources = thresholds.regression_sources
    verdicts: dict[str, Verdict] = {}
    for name, verdict in result.verdicts.items():
        c = comparisons[name]
        p = adjusted[name]
        big = c.drop > (max_drop or 0.0) if np.isfinite(c.drop) else not np.isfinite(c.value)
        significant = alpha is None or p < alpha
        check = Check(
            rule="no_regression", metric=c.figure, value=c.value,
            threshold=c.reference - (max_drop or 0.0), passed=not (big and significant),
            explanation=(
                f"vs {what}: {c.figure} {c.value:.3f} vs {c.reference:.3f} (delta {-c.drop:+.3f}, "
                f"95% CI of the paired accuracy difference [{c.ci[0]:+.3f}, {c.ci[1]:+.3f}], "
                f"{'McNemar' if groups is None else 'patient-level sign-flip'} p = {c.p_value:.3g}, "
                f"Holm p = {p:.3g}); regresses when the drop > "
                f"{max_drop if max_drop is not None else 0:g} and Holm p < {alpha if alpha is not None else 'any'}"
            ),
            source=f"{sources.get('max_drop', '')}; {sources.get('alpha', '')}",
            reference=c.reference, p_value=p, ci=c.ci, locus=verdict.locus,
        )
        verdicts[name] = Verdict(verdict.test, verdict.stage, verdict.locus, verdict.checks + (check,))
    return verdicts


def power(result: ModelResult, reference: dict[str, Any], thresholds: Any,
          groups: np.ndarray | None = None) -> dict[str, Any]:
    """What the comparison can see: per test, the minimum detectable drop (one-sided, power 0.8;
    :func:`~pytest_mllmprobe.stats.min_detectable_drop`) at the reference's accuracy on the test's
    locus, with patients as the units when the data has them. The alpha is ``regression.alpha /
    m`` over the model's ``m`` tests: Holm's first, strictest step, which a single regression must
    pass. ``blind`` lists the tests whose detectable drop exceeds ``regression.max_drop``; with no
    significance test (``alpha: null``) there is nothing to power and ``blind`` is empty."""
    alpha = thresholds.regression.get("alpha")
    max_drop = thresholds.regression.get("max_drop") or 0.0
    n_units = len(set(np.asarray(groups).tolist())) if groups is not None else result.n_test
    m = max(len(result.verdicts), 1)
    strict = (alpha if alpha is not None else 0.05) / m
    drops = {}
    for name, verdict in result.verdicts.items():
        theirs = np.asarray(reference["loci"][verdict.locus]["correct"], dtype=float)
        drops[name] = min_detectable_drop(float(theirs.mean()) if len(theirs) else 0.5, n_units, strict)
    blind = sorted(k for k, v in drops.items() if v > max_drop) if alpha is not None else []
    return {
        "unit": "patient" if groups is not None else "image", "n_units": int(n_units), "alpha": alpha,
        "tests": m, "alpha_per_test": strict, "power": POWER, "max_drop": max_drop,
        "min_detectable_drop": {k: round(v, 4) for k, v in drops.items()},
        "smallest_detectable_drop": round(min(drops.values(), default=float("inf")), 4),
        "blind": blind, "underpowered": bool(blind),
    }


def power_warning(label: str, info: dict[str, Any]) -> str | None:
    """The summary line of a gate that cannot see its own ``max_drop``, or ``None``."""
    if not info.get("underpowered"):
        return None
    units = f"{info['n_units']} test {'patients' if info['unit'] == 'patient' else 'images'}"
    blind, tests = len(info["blind"]), info["tests"]
    which = "no test" if blind == tests else f"{tests - blind} of {tests} tests"
    return (
        f"{label}: with {units} {which} can detect a drop of regression.max_drop {info['max_drop']:g} "
        f"(the smallest detectable drop is {info['smallest_detectable_drop']:.2f} at alpha {info['alpha']:g} "
        f"Holm-corrected over {tests} tests, power {info['power']:g}); a smaller drop passes unseen: add "
        "test images or patients (--mllm-power DROP says how many)"
    )


def regressed_stages(verdicts: dict[str, Verdict]) -> list[str]:
    """Stages with a failing ``no_regression`` check, in pipeline order."""
    from .health import STAGE_ORDER

    hit = {v.stage for v in verdicts.values() for c in v.checks if c.rule == "no_regression" and not c.passed}
    return [s for s in STAGE_ORDER if s in hit]
