"""FHS against hand-computed values (METHOD.md formula, lambda = 0.2)."""

from __future__ import annotations

import math

import pytest

from pytest_mllmprobe.health import FAILURE_MODES, feature_health_score, growth_factor, volatility_penalty


def test_flat_curve_scores_its_end_value() -> None:
    assert feature_health_score([0.8, 0.8, 0.8]) == pytest.approx(0.8)


def test_one_layer_stage_scores_its_value() -> None:
    assert feature_health_score([0.73]) == pytest.approx(0.73)


def test_rising_curve_by_hand() -> None:
    # P = 0.5 -> 0.7 -> 0.9: GF = ln(0.9 / sqrt(0.5 * 0.5)) = ln(1.8) = 0.587787
    # VP = exp(-0.2 * 0.4 / 0.9) = exp(-0.0888889) = 0.914947;  FHS = 0.9 * 1.587787 * 0.914947 = 1.307467
    assert growth_factor([0.5, 0.7, 0.9]) == pytest.approx(math.log(1.8))
    assert volatility_penalty([0.5, 0.7, 0.9]) == pytest.approx(math.exp(-0.2 * 0.4 / 0.9))
    assert feature_health_score([0.5, 0.7, 0.9]) == pytest.approx(1.307467, abs=1e-6)


def test_falling_curve_by_hand() -> None:
    # P = 0.9 -> 0.6 -> 0.3: GF = ln(0.3 / sqrt(0.9 * 0.3)) = ln(0.577350) = -0.549306
    # VP = exp(-0.2 * 0.6 / 0.3) = exp(-0.4) = 0.670320; FHS = 0.3 * 0.450694 * 0.670320
    assert feature_health_score([0.9, 0.6, 0.3]) == pytest.approx(0.0906326, abs=1e-6)


def test_noisy_curve_scores_below_smooth_one_with_same_ends() -> None:
    smooth = feature_health_score([0.6, 0.7, 0.8, 0.9])
    noisy = feature_health_score([0.6, 0.9, 0.6, 0.9])
    assert noisy < smooth


def test_dip_in_the_middle_by_hand() -> None:
    # P = 0.8 -> 0.4 -> 0.8: GF = ln(0.8 / sqrt(0.8 * 0.4)) = ln(1.414214) = 0.346574
    # VP = exp(-0.2 * 0.8 / 0.8) = exp(-0.2) = 0.818731; FHS = 0.8 * 1.346574 * 0.818731 = 0.881985
    assert feature_health_score([0.8, 0.4, 0.8]) == pytest.approx(0.881985, abs=1e-6)


def test_curve_ending_at_zero_scores_zero() -> None:
    assert feature_health_score([0.9, 0.0]) == 0.0


@pytest.mark.parametrize("bad", [[], [0.5, float("nan")], [-0.1]])
def test_bad_curves_are_rejected(bad: list[float]) -> None:
    with pytest.raises(ValueError):
        feature_health_score(bad)


def test_every_stage_names_its_failure_mode() -> None:
    assert FAILURE_MODES == {
        "vision": "quality limitation in visual representation",
        "connector": "fidelity loss in connector projection",
        "llm": "comprehension deficit in LLM reasoning",
        "answer": "misalignment of semantic mapping",
    }
