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


def chance_level(metric: str, y_test: np.ndarray, n_classes: int) -> float:
    """The score of the best constant guess.

    ``accuracy``: the majority-class rate of the test split; ``balanced_accuracy``: ``1 / K``.
    """
    if metric == "balanced_accuracy":
        return 1.0 / n_classes
    counts = np.bincount(np.asarray(y_test), minlength=n_classes)
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


METRIC_FUNCTIONS = {"accuracy": accuracy, "balanced_accuracy": balanced_accuracy}
