"""Statistics the libraries lack, and thin wrappers of those they have.

Hand-written here because neither scipy nor scikit-learn has them: chance levels of a metric,
chance-corrected scores, the Wald interval of a paired difference and Holm's step-down
adjustment. Wilson intervals and the exact McNemar test are scipy's (``binomtest``). The
metrics themselves are scikit-learn's, in :mod:`pytest_mllmprobe.scoring`.
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
