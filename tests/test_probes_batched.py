"""The batched torch linear probe is scikit-learn's L2 logistic regression, fitted faster.

Known answers: scikit-learn's ``LogisticRegression(C=1)`` on the same standardised features, on
real pooled features of the bundled demo and on planted data of several widths and class counts.
"""

from __future__ import annotations

import numpy as np
import pytest

from pytest_mllmprobe.probes import _Standardiser, LinearProbe, fit_linear, fit_probes


def planted_loci(n: int = 150, k: int = 3, widths=(16, 16, 64, 64, 64), seed: int = 0):
    """Loci of several widths whose class signal grows with the locus index."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    features = {}
    for i, d in enumerate(widths):
        X = rng.normal(size=(n, d)).astype(np.float32)
        X[np.arange(n), y] += 0.4 + 0.6 * i
        features[f"locus.{i}"] = X
    return features, y


@pytest.fixture(scope="module")
def demo_features():
    """Real pooled features of every locus of the bundled demo, and its split."""
    from pytest_mllmprobe.answer import class_continuations
    from pytest_mllmprobe.engine import plan
    from pytest_mllmprobe.extract import extract
    from pytest_mllmprobe.models import detect_stages, load_model
    from pytest_mllmprobe.prompts import DEFAULT_QUESTION, build_prompt
    from pytest_mllmprobe.settings import Settings

    the_plan = plan(Settings(models=("demo",), folds=1))  # one split: sklearn is fitted on it
    dataset = the_plan.dataset
    loaded = load_model(the_plan.models[0].spec, device="cpu", dtype="float32")
    stage_map = detect_stages(loaded.model)
    names = list(dataset.display_names)
    prompt = build_prompt(loaded.processor, names, dataset.prompt or DEFAULT_QUESTION)
    features = extract(
        loaded.model, loaded.processor, stage_map, lambda idx: [dataset.image(i) for i in idx],
        [prompt] * len(dataset), class_continuations(loaded.processor.tokenizer, prompt, names),
        batch_size=8, device=loaded.device, dtype=loaded.dtype,
    )
    return features.loci, dataset.labels, the_plan.train, the_plan.test


def test_demo_accuracy_matches_sklearn_within_one_point(demo_features) -> None:
    loci, labels, train, test = demo_features
    ours = fit_probes(loci, labels, train, test, kind="linear")
    reference = fit_probes(loci, labels, train, test, kind="sklearn")
    assert list(ours) == list(loci)
    gaps = {name: abs(ours[name].accuracy - reference[name].accuracy) for name in loci}
    assert np.mean(list(gaps.values())) <= 0.01, gaps
    one_image = 1 / len(test) + 1e-9
    assert max(gaps.values()) <= one_image, gaps


@pytest.mark.parametrize("k", [2, 3, 5])
def test_coefficients_are_sklearns_optimum(k: int) -> None:
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(k)
    n, d = 120, 40
    y = np.arange(n) % k
    X = rng.normal(size=(n, d)).astype(np.float32)
    X[np.arange(n), y] += 1.0
    Xs = _Standardiser().fit(X).transform(X).astype(np.float32)
    coef, intercept = fit_linear(Xs[None], y, k)
    reference = LogisticRegression(C=1.0, tol=1e-10, max_iter=10_000).fit(Xs, y)
    assert coef.shape == (1, d, 1 if k == 2 else k)  # binomial: one vector, like sklearn
    np.testing.assert_allclose(coef[0], reference.coef_.T, atol=2e-3 * np.abs(reference.coef_).max())
    np.testing.assert_allclose(intercept[0], reference.intercept_, atol=2e-3 + 2e-3 * np.abs(reference.intercept_).max())


def test_batched_loci_equal_one_at_a_time() -> None:
    features, y = planted_loci()
    train, test = np.arange(100), np.arange(100, 150)
    together = fit_probes(features, y, train, test)
    for name, X in features.items():
        alone = fit_probes({name: X}, y, train, test)[name]
        np.testing.assert_allclose(together[name].probabilities, alone.probabilities, atol=2e-3)


def test_planted_loci_match_sklearn_and_keep_the_contract() -> None:
    features, y = planted_loci(widths=(8, 32, 32, 128))
    train, test = np.arange(105), np.arange(105, 150)
    ours = fit_probes(features, y, train, test, kind="linear", seed=0, device="cpu")
    reference = fit_probes(features, y, train, test, kind="sklearn")
    for name in features:
        assert abs(ours[name].accuracy - reference[name].accuracy) <= 1 / len(test) + 1e-9
        assert ours[name].probabilities.shape == (45, 3)
        np.testing.assert_allclose(ours[name].probabilities.sum(axis=1), 1.0, rtol=1e-6)
        assert ours[name].correct.shape == (45,) and ours[name].predicted.shape == (45,)
    assert ours["locus.3"].accuracy > 0.5  # well above chance (1/3)


def test_classes_missing_from_train_get_zero_probability_columns() -> None:
    features, y = planted_loci(k=4)
    train = np.flatnonzero(y < 3)[:80]  # class 3 never seen in training
    test = np.arange(100, 150)
    scores = fit_probes(features, y, train, test)
    for value in scores.values():
        assert value.probabilities.shape == (50, 4)
        assert (value.probabilities[:, 3] == 0).all()


def test_linear_probe_estimator_conventions() -> None:
    probe = LinearProbe(C=0.5)
    assert vars(probe) == {"C": 0.5, "max_iter": 500, "device": "cpu"}
    features, y = planted_loci(widths=(16,))
    X = features["locus.0"]
    fitted = probe.fit(X[:100], y[:100])
    assert fitted is probe and probe.coef_.shape == (16, 3) and probe.intercept_.shape == (3,)
    assert probe.predict_proba(X[100:]).shape == (50, 3)
    assert set(probe.predict(X[100:])) <= {0, 1, 2}


def test_unknown_probe_kind_is_named() -> None:
    features, y = planted_loci(widths=(4,))
    with pytest.raises(ValueError, match="unknown probe 'svm'; choose one of linear, mlp, sklearn"):
        fit_probes(features, y, np.arange(100), np.arange(100, 150), kind="svm")


@pytest.mark.skipif("not __import__('torch').cuda.is_available()")
def test_a_cuda_fit_matches_the_cpu_fit() -> None:
    features, y = planted_loci()
    train, test = np.arange(100), np.arange(100, 150)
    cpu = fit_probes(features, y, train, test, device="cpu")
    gpu = fit_probes(features, y, train, test, device="cuda")
    for name in features:
        np.testing.assert_allclose(cpu[name].probabilities, gpu[name].probabilities, atol=5e-3)


@pytest.mark.skipif("not __import__('torch').cuda.is_available()")
def test_mlp_probes_train_on_cuda() -> None:
    # dropout masks come from the GPU's generator, so the fits differ; the planted signal does not
    features, y = planted_loci()
    train, test = np.arange(100), np.arange(100, 150)
    cpu = fit_probes(features, y, train, test, kind="mlp", device="cpu")
    gpu = fit_probes(features, y, train, test, kind="mlp", device="cuda")
    for name in features:
        assert abs(cpu[name].accuracy - gpu[name].accuracy) <= 0.1, name
