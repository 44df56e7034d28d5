"""Uncertainty of every number a run reports: bootstrap intervals and the probes' control task.

- :func:`weighted_metrics`: the four metrics of many score sets at once under many weightings of
  the test images. Hand-written because ``sklearn.metrics`` scores one set under one weighting
  per call, and a bootstrap needs ``resamples x loci`` of them; each equals the
  ``sklearn.metrics`` function with ``sample_weight`` (tested).
- :func:`bootstrap_intervals`: 95% percentile intervals from ``scipy.stats.bootstrap``,
  resampling *units*: patients when the data has groups, else images. No probe is refitted:
  the probes' out-of-fold outputs are resampled, so the interval is the uncertainty of the
  evaluation on this many test images (patients).
- :func:`permutation_p_value` and :func:`control_summary`: the control task (Hewitt & Liang
  2019): the same probe fitted on permuted training labels; selectivity is the metric minus the
  control's mean.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .settings import METRICS

CONFIDENCE = 0.95

Interval = tuple[float, float]


@dataclass(frozen=True)
class ScoreSet:
    """What one locus (or the answer) said about the test images: ``probabilities [n, K]`` and
    ``predicted [n]`` (-1: no answer)."""

    probabilities: np.ndarray
    predicted: np.ndarray


def weighted_metrics(y: np.ndarray, sets: list[ScoreSet], weights: np.ndarray, n_classes: int,
                     metrics: tuple[str, ...] = METRICS) -> dict[str, np.ndarray]:
    """Every metric of every score set under every row of ``weights [B, n]``: ``{metric: [B, S]}``.

    A weighting is a bootstrap resample (how often each test image was drawn). Classes follow the
    rules of :mod:`pytest_mllmprobe.scoring`: balanced accuracy averages the recall of the classes
    present (weight > 0), macro F1 the classes present in the truth or the predictions, AUROC is
    one-vs-rest over classes with positives and negatives (binary: class 1), ties counted half.
    """
    y = np.asarray(y)
    weights = np.asarray(weights, dtype=np.float64)
    truth = np.eye(n_classes, dtype=np.float64)[y]                      # [n, K]
    class_weight = weights @ truth                                       # [B, K]
    total = weights.sum(axis=1)                                          # [B]
    out = {m: np.full((len(weights), len(sets)), np.nan) for m in metrics}
    for s, score_set in enumerate(sets):
        predicted = np.asarray(score_set.predicted)
        said = np.zeros((len(y), n_classes))
        answered = np.flatnonzero(predicted >= 0)
        said[answered, predicted[answered]] = 1.0
        hit = truth * said                                               # [n, K] true positives
        tp = weights @ hit                                               # [B, K]
        if "accuracy" in out:
            out["accuracy"][:, s] = tp.sum(axis=1) / total
        if "balanced_accuracy" in out:
            present = class_weight > 0
            recall = np.divide(tp, class_weight, out=np.zeros_like(tp), where=present)
            out["balanced_accuracy"][:, s] = recall.sum(axis=1) / np.maximum(present.sum(axis=1), 1)
        if "macro_f1" in out:
            predicted_weight = weights @ said
            present = (class_weight > 0) | (predicted_weight > 0)
            denominator = class_weight + predicted_weight
            f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
            out["macro_f1"][:, s] = np.where(present.any(axis=1), (f1 * present).sum(axis=1)
                                             / np.maximum(present.sum(axis=1), 1), np.nan)
        if "auroc" in out:
            out["auroc"][:, s] = _weighted_auroc(y, np.asarray(score_set.probabilities, np.float64), weights)
    return out


def _weighted_auroc(y: np.ndarray, probabilities: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Macro one-vs-rest AUROC ``[B]`` under each weighting (``roc_auc_score`` with sample_weight).

    The Mann-Whitney form: for each positive, the weight of negatives scored below it plus half
    of those tied with it. The order of the scores is the same for every weighting, so each class
    costs one sort and a few cumulative sums over ``[B, n]``.
    """
    k = probabilities.shape[1]
    values = []
    for c in [1] if k == 2 else range(k):
        positive = (y == c).astype(np.float64)
        order = np.argsort(probabilities[:, c], kind="stable")
        scores = probabilities[order, c]
        starts = np.flatnonzero(np.r_[True, scores[1:] != scores[:-1]])  # tie groups
        w = weights[:, order]
        w_pos, w_neg = w * positive[order], w * (1 - positive[order])
        neg_group = np.add.reduceat(w_neg, starts, axis=1)                # [B, groups]
        pos_group = np.add.reduceat(w_pos, starts, axis=1)
        below = np.cumsum(neg_group, axis=1) - neg_group
        pairs = (pos_group * (below + 0.5 * neg_group)).sum(axis=1)
        n_pos, n_neg = w_pos.sum(axis=1), w_neg.sum(axis=1)
        defined = (n_pos > 0) & (n_neg > 0)
        values.append(np.where(defined, pairs / np.where(defined, n_pos * n_neg, 1.0), np.nan))
    stacked = np.stack(values)
    with np.errstate(invalid="ignore"):
        count = np.isfinite(stacked).sum(axis=0)
        return np.where(count > 0, np.nansum(stacked, axis=0) / np.maximum(count, 1), np.nan)


Derived = Callable[[dict[str, dict[str, np.ndarray]]], dict[str, np.ndarray]]


def bootstrap_intervals(
    y: np.ndarray, sets: Mapping[str, ScoreSet], n_classes: int, *, units: np.ndarray | None = None,
    n_resamples: int = 1000, seed: int = 0, derived: Derived | None = None,
) -> dict[str, Interval]:
    """95% percentile intervals of every metric of every score set, and of ``derived`` figures.

    ``units [n]`` names the resampling unit of each test image (a patient id); ``None`` resamples
    images. Keys: ``"<set>/<metric>"`` and the keys ``derived`` returns; ``derived`` receives
    ``{set: {metric: [B]}}`` and returns ``{name: [B]}`` (stage scores, transition ratios).
    Resampling is ``scipy.stats.bootstrap`` over the units (percentile method, fixed seed);
    an interval is ``(nan, nan)`` where the figure is undefined in most resamples.
    """
    from scipy.stats import bootstrap

    y = np.asarray(y)
    names = list(sets)
    if units is None:
        unit_of = np.arange(len(y))
    else:
        _, unit_of = np.unique(np.asarray(units, dtype=str), return_inverse=True)
    n_units = int(unit_of.max()) + 1 if len(unit_of) else 0
    keys: list[str] = []

    def statistic(drawn: np.ndarray, axis: int = -1) -> np.ndarray:
        drawn = np.atleast_2d(np.moveaxis(drawn, axis, -1)).astype(np.int64)
        rows = drawn.shape[0]
        counts = np.bincount((drawn + n_units * np.arange(rows)[:, None]).ravel(),
                             minlength=rows * n_units).reshape(rows, n_units)
        weights = counts[:, unit_of].astype(np.float64)
        table = weighted_metrics(y, [sets[n] for n in names], weights, n_classes)
        per_set = {n: {m: table[m][:, i] for m in METRICS} for i, n in enumerate(names)}
        columns = [per_set[n][m] for n in names for m in METRICS]
        extra = derived(per_set) if derived is not None else {}
        keys[:] = [f"{n}/{m}" for n in names for m in METRICS] + list(extra)
        return np.stack(columns + [np.asarray(v, dtype=np.float64) for v in extra.values()])

    if n_units < 2 or n_resamples < 1:
        return {}
    result = bootstrap(
        (np.arange(n_units),), statistic, n_resamples=n_resamples, vectorized=True,
        confidence_level=CONFIDENCE, method="percentile", random_state=np.random.default_rng(seed),
    )
    low, high = result.confidence_interval.low, result.confidence_interval.high
    distribution = result.bootstrap_distribution
    intervals: dict[str, Interval] = {}
    tail = (1 - CONFIDENCE) / 2 * 100
    for i, key in enumerate(keys):
        lo, hi = float(low[i]), float(high[i])
        if not (np.isfinite(lo) and np.isfinite(hi)):  # some resamples undefined: the defined ones
            values = distribution[i][np.isfinite(distribution[i])]
            if len(values) < 0.5 * distribution.shape[-1]:
                intervals[key] = (float("nan"), float("nan"))
                continue
            lo, hi = (float(v) for v in np.percentile(values, [tail, 100 - tail]))
        intervals[key] = (lo, hi)
    return intervals


def permutation_p_value(observed: float, controls: np.ndarray) -> float:
    """``(1 + #{control >= observed}) / (1 + P)``: the Monte Carlo permutation p-value.

    Hand-written because the permutations are the probes' own batched control fits;
    ``scipy.stats.permutation_test`` would refit one probe per call (the same formula, its
    ``(count + 1) / (n_resamples + 1)``).
    """
    controls = np.asarray(controls, dtype=np.float64)
    controls = controls[np.isfinite(controls)]
    if not np.isfinite(observed) or not len(controls):
        return float("nan")
    return float((1 + np.sum(controls >= observed)) / (1 + len(controls)))


def control_summary(y: np.ndarray, observed: Mapping[str, float], control_sets: list[ScoreSet],
                    n_classes: int) -> dict[str, Any]:
    """One locus's control task: per metric, the control's mean and spread, the selectivity
    (observed minus control mean) and the permutation p-value."""
    ones = np.ones((1, len(y)))
    table = weighted_metrics(y, control_sets, ones, n_classes)
    summary: dict[str, Any] = {"permutations": len(control_sets)}
    for m in METRICS:
        values = table[m][0]
        finite = values[np.isfinite(values)]
        mean = float(finite.mean()) if len(finite) else float("nan")
        summary[m] = {
            "control": mean,
            "control_sd": float(finite.std(ddof=1)) if len(finite) > 1 else float("nan"),
            "selectivity": float(observed[m] - mean) if np.isfinite(observed[m]) else float("nan"),
            "p_value": permutation_p_value(observed[m], values),
        }
    return summary


def format_interval(interval: Interval | None, digits: int = 2) -> str:
    """``[0.62, 0.88]``; empty when there is no interval."""
    if interval is None or not all(np.isfinite(interval)):
        return ""
    return f"[{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"
