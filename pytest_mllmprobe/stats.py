"""Small statistics helpers: chance levels, chance-corrected scores, Wilson intervals."""

from __future__ import annotations

import math

import numpy as np


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of exact matches."""
    return float(np.mean(np.asarray(y_true) == np.asarray(y_pred))) if len(y_true) else float("nan")


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean per-class recall over the classes present in ``y_true``."""
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    recalls = [float(np.mean(y_pred[y_true == c] == c)) for c in np.unique(y_true)]
    return float(np.mean(recalls)) if recalls else float("nan")


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """Unweighted mean of per-class F1 over the classes present in ``y_true`` or ``y_pred``."""
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    scores = []
    for c in range(n_classes):
        tp = float(np.sum((y_pred == c) & (y_true == c)))
        fp = float(np.sum((y_pred == c) & (y_true != c)))
        fn = float(np.sum((y_pred != c) & (y_true == c)))
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else float("nan")


def auroc(y_true: np.ndarray, probabilities: np.ndarray) -> float:
    """Macro one-vs-rest ROC AUC (binary: the AUC of class 1), ties counted half."""
    y_true = np.asarray(y_true)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    k = probabilities.shape[1]
    classes = [1] if k == 2 else range(k)
    values = []
    for c in classes:
        positive = probabilities[y_true == c, c]
        negative = probabilities[y_true != c, c]
        if len(positive) == 0 or len(negative) == 0:
            continue
        greater = (positive[:, None] > negative[None, :]).sum()
        ties = (positive[:, None] == negative[None, :]).sum()
        values.append((greater + 0.5 * ties) / (len(positive) * len(negative)))
    return float(np.mean(values)) if values else float("nan")


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


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc")


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
    n = b + c
    if n == 0:
        return 1.0
    return float(sum(math.comb(n, i) for i in range(b, n + 1)) / 2.0**n)


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
