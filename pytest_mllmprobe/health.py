"""Feature Health Score, stage transitions, and the four failure modes.

Formulas from Zhu et al. 2026 (arXiv:2604.08333), restated in METHOD.md::

    GF  = ln(P_end / sqrt(P_start * P_min))
    VP  = exp(-lambda * sum_i |P(i+1) - P(i)| / P_end)
    FHS = P_end * (1 + GF) * VP
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

LAMBDA = 0.2

STAGE_ORDER = ("vision", "connector", "llm", "answer")

FAILURE_MODES = {
    "vision": "quality limitation in visual representation",
    "connector": "fidelity loss in connector projection",
    "llm": "comprehension deficit in LLM reasoning",
    "answer": "misalignment of semantic mapping",
}


#: Probe values below this are clamped in the growth factor, so that a locus scoring 0 (worse
#: than any guess) gives a large but finite FHS instead of an infinite one.
FLOOR = 1e-3


def growth_factor(curve: Sequence[float]) -> float:
    """``ln(P_end / sqrt(P_start * P_min))``; 0 for a flat curve (values clamped at ``FLOOR``)."""
    _check_curve(curve)
    start, end, low = (max(v, FLOOR) for v in (curve[0], curve[-1], min(curve)))
    return math.log(end / math.sqrt(start * low))


def volatility_penalty(curve: Sequence[float], lam: float = LAMBDA) -> float:
    """``exp(-lambda * total variation / P_end)``; 1 for a flat or one-point curve."""
    _check_curve(curve)
    end = curve[-1]
    variation = sum(abs(b - a) for a, b in zip(curve[:-1], curve[1:]))
    if variation == 0:
        return 1.0
    if end <= 0:
        return 0.0
    return math.exp(-lam * variation / end)


def feature_health_score(curve: Sequence[float], lam: float = LAMBDA) -> float:
    """FHS of one stage's probe curve, in layer order. Equals ``P_end`` for a flat curve.

    A curve that ends at 0 scores 0 (nothing is left to be healthy about).
    """
    _check_curve(curve)
    end = curve[-1]
    if end <= 0:
        return 0.0
    return end * (1.0 + growth_factor(curve)) * volatility_penalty(curve, lam)


def _check_curve(curve: Sequence[float]) -> None:
    if len(curve) == 0:
        raise ValueError("a stage curve needs at least one probe value")
    if any(math.isnan(v) or v < 0 for v in curve):
        raise ValueError(f"probe values must be non-negative numbers, got {list(curve)}")


def feature_health_scores(curves: np.ndarray, lam: float = LAMBDA) -> np.ndarray:
    """:func:`feature_health_score` of many curves at once: ``curves [B, T]`` -> ``[B]``.

    The same formula, vectorised over bootstrap resamples (tested equal to the scalar one); NaN
    where a curve holds NaN.
    """
    curves = np.asarray(curves, dtype=np.float64)
    end = curves[:, -1]
    start, low = curves[:, 0], curves.min(axis=1)
    clamp = np.maximum
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        growth = np.log(clamp(end, FLOOR) / np.sqrt(clamp(start, FLOOR) * clamp(low, FLOOR)))
        variation = np.abs(np.diff(curves, axis=1)).sum(axis=1)
        penalty = np.where(variation == 0, 1.0, np.exp(-lam * variation / np.where(end > 0, end, 1.0)))
        score = end * (1.0 + growth) * penalty
    return np.where(end > 0, score, np.where(np.isnan(end), np.nan, 0.0))
