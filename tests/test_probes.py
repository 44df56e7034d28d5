"""Probes follow scikit-learn conventions and find planted signal (and only planted signal)."""

from __future__ import annotations

import numpy as np
import pytest

from pytest_mllmprobe.probes import LinearProbe, MLPProbe, fit_probes, majority_score
from pytest_mllmprobe.scoring import balanced_accuracy
from pytest_mllmprobe.stats import above_chance, chance_level, wilson_interval


def planted(n: int = 240, d: int = 20, k: int = 3, signal: float = 3.0, seed: int = 0):
    """Gaussian features whose class moves dimension 0..k-1; the rest is noise."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    X = rng.normal(size=(n, d)).astype(np.float32)
    X[np.arange(n), y] += signal
    return X, y


@pytest.mark.parametrize("probe", [LinearProbe(), MLPProbe(epochs=20, seed=0)])
def test_a_probe_reads_planted_signal(probe) -> None:
    X, y = planted()
    fitted = probe.fit(X[:160], y[:160])
    assert fitted is probe
    assert fitted.n_features_in_ == 20
    assert np.mean(fitted.predict(X[160:]) == y[160:]) > 0.85


@pytest.mark.parametrize("probe", [LinearProbe(), MLPProbe(epochs=20, seed=0)])
def test_a_probe_finds_nothing_in_noise(probe) -> None:
    X, _ = planted(signal=0.0)
    y = np.random.default_rng(1).integers(0, 3, size=len(X))
    probe.fit(X[:160], y[:160])
    assert np.mean(probe.predict(X[160:]) == y[160:]) < 0.55


def test_init_stores_hyper_parameters_only() -> None:
    probe = MLPProbe(hidden=8, lr=1e-3)
    assert vars(probe) == {
        "hidden": 8, "dropout": 0.1, "lr": 1e-3, "weight_decay": 0.01, "epochs": 20,
        "batch_size": 4, "warmup": 0.05, "seed": 0,
    }
    assert not [name for name in vars(probe) if name.endswith("_")]


def test_shape_errors_are_clear() -> None:
    X, y = planted()
    probe = LinearProbe().fit(X, y)
    with pytest.raises(ValueError, match="X has 5 features, but the LinearProbe expects 20"):
        probe.predict(X[:, :5])
    with pytest.raises(ValueError, match="2-D feature array"):
        LinearProbe().fit(X[0], y)


def test_standardisation_uses_the_training_split_only() -> None:
    X, y = planted()
    probe = LinearProbe().fit(X[:160], y[:160])
    np.testing.assert_allclose(probe.scaler_.mean_, X[:160].mean(axis=0), rtol=1e-5, atol=1e-6)


def test_mlp_probe_is_deterministic_for_a_seed() -> None:
    X, y = planted()
    a = MLPProbe(seed=3).fit(X[:160], y[:160]).predict(X[160:])
    b = MLPProbe(seed=3).fit(X[:160], y[:160]).predict(X[160:])
    np.testing.assert_array_equal(a, b)


def test_batched_mlps_of_all_loci_match_their_signal() -> None:
    X, y = planted()
    noise, _ = planted(signal=0.0, seed=5)
    train, test = np.arange(160), np.arange(160, 240)
    scores = fit_probes({"good": X, "noise": noise, "wide": np.hstack([X, X])}, y, train, test, kind="mlp")
    assert scores["good"].accuracy > 0.85 and scores["wide"].accuracy > 0.85
    assert scores["noise"].accuracy < 0.55
    assert scores["good"].correct.shape == (80,)


def test_mlp_groups_on_the_cpu_train_the_same_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    # CPU fits train the loci in groups (memory); each group must see the batched fit's draws
    from pytest_mllmprobe import probes

    rng = np.random.default_rng(0)
    X = rng.normal(size=(7, 90, 16)).astype(np.float32)
    y = np.arange(90) % 3
    cfg = MLPProbe(epochs=2, hidden=8)
    together = probes._train_mlps(X, y, 3, cfg)
    monkeypatch.setattr(probes, "CPU_GROUP_BYTES", 4 * 16 * 8 * 3)  # groups of 3, 3 and 1 loci
    grouped = probes._train_mlps(X, y, 3, cfg)
    for name, weights in together.items():
        assert weights.shape[0] == 7
        np.testing.assert_array_equal(grouped[name], weights, err_msg=name)


def test_linear_and_mlp_agree_on_planted_signal() -> None:
    X, y = planted()
    train, test = np.arange(160), np.arange(160, 240)
    linear = fit_probes({"x": X}, y, train, test, kind="linear")["x"].accuracy
    mlp = fit_probes({"x": X}, y, train, test, kind="mlp")["x"].accuracy
    assert abs(linear - mlp) < 0.1


def test_a_locus_probe_does_not_depend_on_the_loci_fitted_beside_it() -> None:
    # a `-k` run fits fewer loci than a full run: each locus's held-out probabilities must be
    # the same either way, to the bit (batched with other loci, L-BFGS's shared line search and
    # stopping test would leave it at another point short of its minimiser)
    from pytest_mllmprobe.data.splits import fold_indices
    from pytest_mllmprobe.probes import cross_fit

    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 150)
    features = {}
    for i in range(6):  # one width, planted signal of growing strength
        X = rng.normal(size=(150, 64)).astype(np.float32)
        X[:, :3] += (0.3 + 0.3 * i) * np.eye(3)[y]
        features[f"vision.{i}"] = X
    folds = fold_indices(y, 5, seed=0)
    test = np.sort(np.concatenate([te for _, te in folds]))
    every = cross_fit(features, y, folds, test, permutations=2, seed=0)
    for chosen in (["vision.1"], ["vision.1", "vision.4"]):
        part = cross_fit({n: features[n] for n in chosen}, y, folds, test, permutations=2, seed=0)
        for name in chosen:
            np.testing.assert_array_equal(part[name].probabilities, every[name].probabilities, err_msg=name)
            np.testing.assert_array_equal(part[name].controls, every[name].controls, err_msg=name)


def test_majority_score_is_the_chance_level_of_accuracy() -> None:
    y_train = np.array([0, 0, 0, 1, 2])
    y_test = np.array([0, 0, 1, 2])
    assert majority_score(y_train, y_test, 3).accuracy == 0.5
    assert chance_level("accuracy", y_test, 3) == 0.5
    assert chance_level("balanced_accuracy", y_test, 3) == pytest.approx(1 / 3)


def test_chance_corrected_scores_and_intervals() -> None:
    assert above_chance(0.5, 0.5) == 0.0
    assert above_chance(1.0, 0.25) == 1.0
    assert balanced_accuracy(np.array([0, 0, 0, 1]), np.array([0, 0, 0, 0])) == 0.5
    low, high = wilson_interval(45, 50)
    assert 0.78 < low < 0.9 < high < 0.97
