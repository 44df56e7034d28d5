"""The metrics (scikit-learn's) on hand-computed cases: ties, classes missing from a side, no answer."""

from __future__ import annotations

import numpy as np
import pytest

from pytest_mllmprobe.scoring import accuracy, answer_score, auroc, balanced_accuracy, macro_f1, score


def test_auroc_counts_ties_half() -> None:
    # positives score 0.5 and 0.9, negatives 0.2 and 0.5: pairs 1 + 0.5 (tie) + 1 + 1 = 3.5 of 4
    y = np.array([0, 0, 1, 1])
    p1 = np.array([0.2, 0.5, 0.5, 0.9])
    assert auroc(y, np.stack([1 - p1, p1], axis=1)) == pytest.approx(0.875)


def test_metrics_with_a_class_missing_from_the_test_images() -> None:
    y = np.array([0, 0, 1, 1])  # class 2 has no test image, but the probe predicts it once
    predicted = np.array([0, 1, 1, 2])
    assert accuracy(y, predicted) == pytest.approx(0.5)
    # recall over the classes present in y only: (1/2 + 1/2) / 2, not (1/2 + 1/2 + 0) / 3
    assert balanced_accuracy(y, predicted) == pytest.approx(0.5)
    # F1 over the classes in y or predicted: class 0 2/3, class 1 1/2, class 2 0
    assert macro_f1(y, predicted, 3) == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    # a class in neither is left out: the same with K = 4
    assert macro_f1(y, predicted, 4) == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    proba = np.array([[0.7, 0.2, 0.1], [0.4, 0.5, 0.1], [0.1, 0.8, 0.1], [0.1, 0.3, 0.6]])
    # one-vs-rest AUC of classes 0 (1.0) and 1 (3 of 4 pairs) only: class 2 has no positive
    assert auroc(y, proba) == pytest.approx((1.0 + 0.75) / 2)
    full = score(y, proba)
    assert full.predicted.tolist() == [0, 1, 1, 2] and full.correct.tolist() == [True, False, True, False]


def test_no_answer_counts_wrong_and_is_no_class() -> None:
    y = np.array([0, 1])
    predicted = np.array([-1, 1])
    assert accuracy(y, predicted) == 0.5
    assert balanced_accuracy(y, predicted) == 0.5
    assert macro_f1(y, predicted, 2) == pytest.approx(0.5)  # class 0: F1 0, class 1: F1 1


def test_undefined_metrics_are_nan() -> None:
    y = np.array([1, 1])
    assert np.isnan(auroc(y, np.array([[0.3, 0.7], [0.6, 0.4]])))
    assert np.isnan(accuracy(np.array([], dtype=int), np.array([], dtype=int)))


def test_a_non_finite_answer_is_no_answer() -> None:
    scores = np.array([[0.0, -1.0], [np.nan, 0.0], [-2.0, -0.5]])
    result = answer_score(np.array([0, 1, 1]), scores, "likelihood")
    assert result.chosen.predicted.tolist() == [0, -1, 1]
    assert not result.finite
    assert result.answers["likelihood"]["accuracy"] == pytest.approx(2 / 3)
