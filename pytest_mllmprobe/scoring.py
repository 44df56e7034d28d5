"""Scoring: every number a probe test asserts, computed in one place.

Inputs are what the pipeline produced for the run's test images: out-of-fold class
probabilities of each locus's probe (:func:`pytest_mllmprobe.probes.cross_fit`) and the model's
own answer scores (:mod:`pytest_mllmprobe.answer`). Outputs are
:class:`~pytest_mllmprobe.results.LocusResult` objects: accuracy, balanced accuracy, macro F1,
AUROC (all from ``sklearn.metrics``), their chance levels, per-image correctness and per-fold
accuracy.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .results import LocusResult, stage_of
from .settings import METRICS
from .stats import chance_level

__all__ = [
    "METRICS", "ProbeScore", "accuracy", "answer_score", "auroc", "balanced_accuracy", "chance_levels",
    "locus_result", "macro_f1", "one_hot", "score", "softmax_rows",
]


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of exact matches (a prediction of -1, no answer, is wrong)."""
    from sklearn.metrics import accuracy_score

    return float(accuracy_score(y_true, y_pred)) if len(y_true) else float("nan")


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean per-class recall over the classes present in ``y_true``."""
    from sklearn.metrics import balanced_accuracy_score

    if not len(y_true):
        return float("nan")
    with warnings.catch_warnings():  # "y_pred contains classes not in y_true": those have no recall
        warnings.simplefilter("ignore", UserWarning)
        return float(balanced_accuracy_score(y_true, y_pred))


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """Unweighted mean of per-class F1 over the classes present in ``y_true`` or ``y_pred``."""
    from sklearn.metrics import f1_score

    present = sorted(set(np.asarray(y_true).tolist()) | set(np.asarray(y_pred).tolist()))
    labels = [c for c in present if 0 <= c < n_classes]
    if not labels:
        return float("nan")
    return float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0.0))


def auroc(y_true: np.ndarray, probabilities: np.ndarray) -> float:
    """Macro one-vs-rest ROC AUC (binary: the AUC of class 1), ties counted half.

    Classes with no positive or no negative test image are left out of the mean (their AUC is
    undefined); ``nan`` when no class is left.
    """
    from sklearn.metrics import roc_auc_score

    y_true = np.asarray(y_true)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    k = probabilities.shape[1]
    values = []
    for c in [1] if k == 2 else range(k):
        positive = y_true == c
        if positive.all() or not positive.any():
            continue
        values.append(roc_auc_score(positive, probabilities[:, c]))
    return float(np.mean(values)) if values else float("nan")


@dataclass(frozen=True)
class ProbeScore:
    """A probe's (or the answer's) outcome on the test images: metrics, predictions, class scores.

    ``probabilities`` is ``[n_test, K]`` (columns in class-index order), used for AUROC.
    """

    accuracy: float
    balanced_accuracy: float
    macro_f1: float
    auroc: float
    correct: np.ndarray
    predicted: np.ndarray
    probabilities: np.ndarray

    def metric(self, name: str) -> float:
        return float(getattr(self, name))


def score(y_true: np.ndarray, probabilities: np.ndarray, predicted: np.ndarray | None = None) -> ProbeScore:
    """Score class probabilities ``[n, K]``; ``predicted`` defaults to their argmax (-1: no answer)."""
    y_true = np.asarray(y_true)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if predicted is None:
        predicted = probabilities.argmax(axis=1)
    predicted = np.asarray(predicted)
    return ProbeScore(
        accuracy=accuracy(y_true, predicted),
        balanced_accuracy=balanced_accuracy(y_true, predicted),
        macro_f1=macro_f1(y_true, predicted, probabilities.shape[1]),
        auroc=auroc(y_true, probabilities),
        correct=y_true == predicted,
        predicted=predicted,
        probabilities=probabilities,
    )


def one_hot(predicted: np.ndarray, k: int) -> np.ndarray:
    """Probabilities that put all mass on ``predicted`` (a row of -1 gets none)."""
    out = np.zeros((len(predicted), k))
    rows = np.flatnonzero(np.asarray(predicted) >= 0)
    out[rows, np.asarray(predicted)[rows]] = 1.0
    return out


def softmax_rows(values: np.ndarray) -> np.ndarray:
    """Row-wise softmax of ``[n, K]`` scores (numerically shifted)."""
    shifted = values - values.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


def chance_levels(y_test: np.ndarray, n_classes: int) -> dict[str, float]:
    """The best constant guess's score in every metric (:func:`~pytest_mllmprobe.stats.chance_level`)."""
    return {m: chance_level(m, y_test, n_classes) for m in METRICS}


def fold_accuracies(correct: np.ndarray, fold_positions: Sequence[np.ndarray]) -> list[float] | None:
    """Accuracy on each fold's test images (positions into the test order); ``None`` for one split."""
    if len(fold_positions) < 2:
        return None
    return [float(np.mean(correct[where])) for where in fold_positions]


def locus_result(name: str, dim: int, probe_score: ProbeScore, chance: dict[str, float], finite: bool = True,
                 fold_accuracy: list[float] | None = None) -> LocusResult:
    """The :class:`LocusResult` of one locus (``vision.3``, ``llm.5.last``, ``answer``...)."""
    parts = name.split(".")
    layer = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
    readout = parts[2] if len(parts) > 2 else None
    return LocusResult(
        name=name, stage=stage_of(name), layer=layer, readout=readout, dim=int(dim),
        accuracy=probe_score.accuracy, balanced_accuracy=probe_score.balanced_accuracy,
        macro_f1=probe_score.macro_f1, auroc=probe_score.auroc,
        chance=dict(chance), correct=probe_score.correct, finite=finite, fold_accuracy=fold_accuracy,
    )


def metric_summary(answer: ProbeScore) -> dict[str, float | None]:
    """Every metric of a score, ``None`` where undefined (JSON-able)."""
    return {m: (float(answer.metric(m)) if np.isfinite(answer.metric(m)) else None) for m in METRICS}


@dataclass(frozen=True)
class AnswerScore:
    """``P_final``: the score the answer tests use, whether every answer was finite, and the
    ``answers`` record of results.json (mode, likelihood metrics, generation metrics)."""

    chosen: ProbeScore
    finite: bool
    answers: dict[str, Any]


def answer_score(y_test: np.ndarray, answer_scores: np.ndarray, mode: str, *,
                 generated: Sequence[str] | None = None, spoken: Sequence[str] = (),
                 test_ids: Sequence[str] = ()) -> AnswerScore:
    """Score the model's own answers on the test images.

    ``answer_scores [n_test, K]`` are the closed-set likelihood scores; a NaN/inf row is no
    answer and counts as wrong. With ``generated`` texts (``--mllm-answer generate``), the
    first class name (``spoken``) in each text is the answer; that reading is ``chosen``.
    """
    from .answer import parse_answer

    k = answer_scores.shape[1]
    ok = np.isfinite(answer_scores).all(axis=1)
    said = np.where(ok, np.nan_to_num(answer_scores).argmax(axis=1), -1)
    proba = np.where(ok[:, None], softmax_rows(np.nan_to_num(answer_scores)), 0.0)
    likelihood = score(y_test, proba, said)
    answers: dict[str, Any] = {"mode": mode, "likelihood": metric_summary(likelihood)}
    chosen = likelihood
    if generated is not None:
        parsed = np.array([parse_answer(text, list(spoken)) for text in generated])
        chosen = score(y_test, one_hot(parsed, k), parsed)
        answers["generate"] = {
            **metric_summary(chosen),
            "parse_failure_rate": float(np.mean(parsed < 0)),
            "examples": [
                {"id": image_id, "text": text, "parsed": spoken[p] if p >= 0 else None}
                for image_id, text, p in list(zip(test_ids, generated, parsed))[:5]
            ],
        }
    return AnswerScore(chosen, bool(ok.all()), answers)


def invariance(y_test: np.ndarray, score_sets: Sequence[np.ndarray]) -> dict[str, Any]:
    """How the answer holds up when the prompt changes: ``score_sets`` are ``[n_test, K]`` answer
    scores (columns in class order) under R prompts, the first the run's own.

    * ``accuracy``: per prompt;
    * ``consistency``: per image, the share of the R answers that agree with its most common
      answer, averaged (1: the same answer every time; 1/R when every prompt gets another answer,
      as a model that always says the first listed option does under R rotations);
    * ``all_same``: the fraction of images answered the same under every prompt;
    * ``circular_accuracy``: the fraction answered right under every prompt (VLMEvalKit's CircularEval).
    """
    said = []
    for scores in score_sets:
        ok = np.isfinite(scores).all(axis=1)
        said.append(np.where(ok, np.nan_to_num(scores).argmax(axis=1), -1))
    answers = np.stack(said, axis=1)  # [n_test, R]
    y = np.asarray(y_test)[:, None]
    agree = np.array([np.unique(row, return_counts=True)[1].max() for row in answers]) / answers.shape[1]
    return {
        "n_prompts": int(answers.shape[1]),
        "accuracy": [accuracy(y_test, answers[:, r]) for r in range(answers.shape[1])],
        "consistency": float(agree.mean()) if len(agree) else float("nan"),
        "all_same": float(np.mean((answers == answers[:, :1]).all(axis=1))) if len(agree) else float("nan"),
        "circular_accuracy": float(np.mean((answers == y).all(axis=1))) if len(agree) else float("nan"),
    }


def invariance_groups(y_test: np.ndarray, own: np.ndarray, variants: dict[str, np.ndarray],
                      described: Sequence[tuple[str, str, list[str]]],
                      own_prompt: tuple[str, list[str]] = ("", [])) -> dict[str, Any]:
    """:func:`invariance` over the option orders (``order.<r>``) and over the wordings
    (``prompt.<j>``), each beside the run's own prompt; ``described`` is ``(name, template,
    option order)`` of each variant, ``own_prompt`` the run's own ``(template, option order)``.
    Empty when the run scored no variant."""
    out: dict[str, Any] = {}
    for group, prefix in (("orders", "order."), ("prompts", "prompt.")):
        names = [name for name, _, _ in described if name.startswith(prefix) and name in variants]
        if not names:
            continue
        out[group] = {
            **invariance(y_test, [own, *(variants[n] for n in names)]),
            "variants": ["own", *names],
            "what": [own_prompt[1] if group == "orders" else own_prompt[0], *(order if group == "orders" else template
                             for name, template, order in described if name in names)],
        }
    return out
