"""Statistics the libraries lack, and thin wrappers of those they have.

Hand-written here because neither scipy nor scikit-learn has them: chance levels of a metric,
chance-corrected scores, the Wald interval of a paired difference, Holm's step-down adjustment
and the minimum detectable drop (a two-line normal approximation). Wilson intervals and the
exact McNemar test are scipy's (``binomtest``); the patient-level paired test is scipy's
``permutation_test`` (sign flips of per-patient differences) and its interval scipy's
``bootstrap``; normal quantiles are ``scipy.stats.norm``. The metrics themselves are
scikit-learn's, in :mod:`pytest_mllmprobe.scoring`.
"""

from __future__ import annotations

import math

import numpy as np


def chance_level(metric: str, y_test: np.ndarray, n_classes: int) -> float:
    """The score of the best constant guess.

    ``accuracy``: the majority-class rate of the test split; ``balanced_accuracy``: ``1 / K``;
    ``macro_f1``: always answering the majority class; ``auroc``: 0.5.
    """
    if metric == "balanced_accuracy":  # averaged over the classes present in the test split
        present = int((np.bincount(np.asarray(y_test), minlength=n_classes) > 0).sum())
        return 1.0 / max(present, 1)
    if metric == "auroc":
        return 0.5
    counts = np.bincount(np.asarray(y_test), minlength=n_classes)
    if metric == "macro_f1":
        p = counts.max() / counts.sum()
        return float((2 * p / (1 + p)) / int((counts > 0).sum()))
    return float(counts.max() / counts.sum())


def above_chance(value: float, chance: float) -> float:
    """Chance-corrected score ``(value - chance) / (1 - chance)``: 0 at chance, 1 when perfect."""
    if chance >= 1.0:
        return 0.0
    return (value - chance) / (1.0 - chance)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (scipy's ``binomtest``; 95% by default)."""
    from scipy.stats import binomtest

    if n == 0:
        return (0.0, 1.0)
    ci = binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return (float(ci.low), float(ci.high))


def mcnemar_regression(reference: np.ndarray, current: np.ndarray) -> float:
    """One-sided exact McNemar p-value that ``current`` is worse than ``reference``.

    Pairs are the same test images; ``b`` counts images the reference got right and the current
    model wrong, ``c`` the reverse. Under no difference ``b ~ Binomial(b + c, 1/2)``; the p-value
    is ``P(X >= b)``.
    """
    reference = np.asarray(reference, dtype=bool)
    current = np.asarray(current, dtype=bool)
    if reference.shape != current.shape:
        raise ValueError(f"paired arrays differ in length: {reference.shape} vs {current.shape}")
    b = int(np.sum(reference & ~current))
    c = int(np.sum(~reference & current))
    if b + c == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(b, b + c, 0.5, alternative="greater").pvalue)


def paired_difference_interval(reference: np.ndarray, current: np.ndarray, z: float = 1.96) -> tuple[float, float]:
    """Wald 95% interval of ``mean(current) - mean(reference)`` over paired 0/1 outcomes."""
    reference = np.asarray(reference, dtype=float)
    current = np.asarray(current, dtype=float)
    n = len(reference)
    if n == 0:
        return (-1.0, 1.0)
    diff = current - reference
    mean = float(diff.mean())
    se = float(diff.std(ddof=0) / math.sqrt(n))
    return (max(-1.0, mean - z * se), min(1.0, mean + z * se))


def holm(p_values: dict[str, float]) -> dict[str, float]:
    """Holm-Bonferroni adjusted p-values (monotone, capped at 1)."""
    order = sorted(p_values, key=lambda k: p_values[k])
    m = len(order)
    adjusted: dict[str, float] = {}
    running = 0.0
    for rank, key in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[key]))
        adjusted[key] = running
    return adjusted


def patient_differences(reference: np.ndarray, current: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per patient: the sum of ``current - reference`` over their images, and their image count."""
    _, unit = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    diff = np.asarray(current, dtype=float) - np.asarray(reference, dtype=float)
    return np.bincount(unit, weights=diff), np.bincount(unit).astype(float)


def clustered_regression(reference: np.ndarray, current: np.ndarray, groups: np.ndarray,
                         n_resamples: int = 9999, seed: int = 0) -> tuple[float, tuple[float, float]]:
    """One-sided p-value that ``current`` is worse than ``reference``, valid with several images
    per patient, and the 95% interval of the accuracy difference.

    The test flips the sign of each patient's summed difference (``scipy.stats.permutation_test``,
    ``permutation_type="samples"``; exact when there are few patients): patients, not images, are
    the independent units, so four copies of one image weigh as one patient. The interval is a
    percentile bootstrap over patients of ``sum(diff) / sum(images)`` (``scipy.stats.bootstrap``).
    """
    from scipy.stats import bootstrap, permutation_test

    reference = np.asarray(reference, dtype=bool)
    current = np.asarray(current, dtype=bool)
    if reference.shape != current.shape:
        raise ValueError(f"paired arrays differ in length: {reference.shape} vs {current.shape}")
    diff, size = patient_differences(reference, current, groups)
    if not np.any(diff):
        return 1.0, (0.0, 0.0)
    # Patients without a difference add nothing to any sign flip: leaving them out keeps the
    # null distribution and makes the test exact for up to log2(n_resamples) changed patients.
    test = permutation_test(
        (diff[diff != 0],), lambda d, axis=-1: np.sum(d, axis=axis), permutation_type="samples",
        alternative="less", n_resamples=n_resamples, vectorized=True, random_state=np.random.default_rng(seed),
    )
    if len(diff) < 2:
        return float(test.pvalue), (-1.0, 1.0)
    interval = bootstrap(
        (diff, size), lambda d, m, axis=-1: np.sum(d, axis=axis) / np.sum(m, axis=axis), paired=True,
        vectorized=True, n_resamples=n_resamples, method="percentile", random_state=np.random.default_rng(seed),
    ).confidence_interval
    low, high = (float(v) if np.isfinite(v) else float("nan") for v in (interval.low, interval.high))
    return float(test.pvalue), (max(-1.0, low), min(1.0, high))


POWER = 0.8


def min_detectable_drop(p: float, n_units: int, alpha: float, power: float = POWER) -> float:
    """The smallest drop of a proportion ``p`` that a one-sided test at ``alpha`` detects with
    ``power``, with both runs measured on ``n_units`` independent units (images, or patients):

        delta = (z_(1-alpha) + z_power) * sqrt(2 p (1 - p) / n)

    the normal approximation for two proportions (conservative for paired data, whose
    discordant pairs make the test sharper; with patients as units, also for correlated images).
    ``p`` is clipped to [0.05, 0.95] so that a perfect reference does not claim infinite power.
    """
    from scipy.stats import norm

    if n_units < 1:
        return float("inf")
    p = min(max(float(p), 0.05), 0.95)
    return float((norm.ppf(1 - alpha) + norm.ppf(power)) * math.sqrt(2 * p * (1 - p) / n_units))


def units_needed(p: float, drop: float, alpha: float, power: float = POWER) -> int:
    """Test units (images, or patients) :func:`min_detectable_drop` needs to see ``drop``."""
    from scipy.stats import norm

    if drop <= 0:
        raise ValueError(f"the drop must be positive, got {drop}")
    p = min(max(float(p), 0.05), 0.95)
    z = norm.ppf(1 - alpha) + norm.ppf(power)
    return int(math.ceil(2 * p * (1 - p) * z * z / (drop * drop)))
