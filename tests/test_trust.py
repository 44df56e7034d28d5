"""Verdicts with their uncertainty and controls (issue 15): intervals, the control task, the
dip rule, patient-aware comparisons and power. Known answers come from planted signal and
planted faults; every statistic is checked against scipy / sklearn or a hand computation."""

from __future__ import annotations

import math
import sys
import textwrap
import warnings

import numpy as np
import pytest

from pytest_mllmprobe.demo import DEMO_DATA
from pytest_mllmprobe.health import feature_health_score, feature_health_scores
from pytest_mllmprobe.probes import cross_fit
from pytest_mllmprobe.scoring import chance_levels, locus_result, score
from pytest_mllmprobe.stats import (
    clustered_regression, mcnemar_regression, min_detectable_drop, units_needed, wilson_interval,
)
from pytest_mllmprobe.uncertainty import ScoreSet, bootstrap_intervals, control_summary, weighted_metrics
from pytest_mllmprobe.verdicts import selectivity_check

# -- the statistics, against the libraries and hand computations ------------------------------


@pytest.mark.parametrize("k", [2, 3, 4])
def test_weighted_metrics_equal_sklearn_with_sample_weight(k: int) -> None:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

    rng = np.random.default_rng(k)
    for _ in range(10):
        n = 40
        y = rng.integers(0, k, n)
        proba = np.round(rng.dirichlet(np.ones(k), n), 1)  # rounded: ties in the AUROC
        predicted = proba.argmax(axis=1)
        predicted[rng.random(n) < 0.1] = -1  # no answer
        weights = rng.integers(0, 3, (4, n)).astype(float)
        table = weighted_metrics(y, [ScoreSet(proba, predicted)], weights, k)
        for b, w in enumerate(weights):
            present = sorted((set(y[w > 0]) | set(predicted[w > 0])) - {-1})
            aucs = [roc_auc_score(y == c, proba[:, c], sample_weight=w) for c in ([1] if k == 2 else range(k))
                    if (w[y == c] > 0).any() and (w[y != c] > 0).any()]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                expected = {
                    "accuracy": accuracy_score(y, predicted, sample_weight=w),
                    "balanced_accuracy": balanced_accuracy_score(y, predicted, sample_weight=w),
                    "macro_f1": f1_score(y, predicted, labels=present, average="macro", sample_weight=w,
                                         zero_division=0),
                    "auroc": np.mean(aucs),
                }
            for metric, value in expected.items():
                assert table[metric][b, 0] == pytest.approx(value, abs=1e-12), (metric, b)


def test_batched_fhs_equals_the_papers_formula() -> None:
    rng = np.random.default_rng(0)
    curves = rng.random((30, 6))
    curves[0] = 0.7  # flat
    curves[1, -1] = 0.0  # ends at zero
    expected = [feature_health_score(list(c)) for c in curves]
    np.testing.assert_allclose(feature_health_scores(curves), expected, rtol=1e-12)


def test_wilson_interval_is_the_hand_computed_one() -> None:
    successes, n, z = 8, 10, 1.959963984540054
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert wilson_interval(successes, n) == pytest.approx((centre - half, centre + half), abs=1e-9)


def test_min_detectable_drop_is_the_documented_formula_and_its_inverse() -> None:
    # (z_0.95 + z_0.8) * sqrt(2 * 0.8 * 0.2 / 45), by hand
    assert min_detectable_drop(0.8, 45, 0.05) == pytest.approx((1.6448536 + 0.8416212) * math.sqrt(0.32 / 45), abs=1e-6)
    needed = units_needed(0.8, 0.05, 0.05)
    assert min_detectable_drop(0.8, needed, 0.05) <= 0.05 < min_detectable_drop(0.8, needed - 1, 0.05)


# -- intervals ----------------------------------------------------------------------------------


def _planted(n: int, k: int = 3, signal: float = 1.5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    X = rng.normal(size=(n, 8)).astype(np.float32)
    X[np.arange(n), y] += signal
    return X, y


def test_interval_holds_the_point_estimate_and_narrows_with_more_images() -> None:
    widths = []
    for n in (60, 600):
        X, y = _planted(n)
        proba = np.eye(3)[np.where(np.random.default_rng(1).random(n) < 0.8, y, (y + 1) % 3)]
        found = bootstrap_intervals(y, {"locus": ScoreSet(proba, proba.argmax(axis=1))}, 3, n_resamples=400)
        low, high = found["locus/accuracy"]
        point = score(y, proba).accuracy
        assert low <= point <= high
        widths.append(high - low)
    assert widths[1] < widths[0] / 2  # ~ 1 / sqrt(n): 10x the images, about a third of the width


def test_patients_not_images_are_resampled() -> None:
    """Four copies of each image under one patient id: the patient bootstrap gives the interval
    of the images without copies; an image bootstrap would claim a twice-narrower one."""
    rng = np.random.default_rng(3)
    n = 50
    y = np.arange(n) % 2
    proba = np.eye(2)[np.where(rng.random(n) < 0.75, y, 1 - y)]
    single = bootstrap_intervals(y, {"l": ScoreSet(proba, proba.argmax(1))}, 2, units=np.arange(n), n_resamples=500)
    copies = np.repeat(np.arange(n), 4)
    rep = ScoreSet(proba[copies], proba[copies].argmax(1))
    by_patient = bootstrap_intervals(y[copies], {"l": rep}, 2, units=copies, n_resamples=500)
    by_image = bootstrap_intervals(y[copies], {"l": rep}, 2, units=None, n_resamples=500)
    assert by_patient["l/accuracy"] == pytest.approx(single["l/accuracy"])
    width = by_patient["l/accuracy"][1] - by_patient["l/accuracy"][0]
    assert by_image["l/accuracy"][1] - by_image["l/accuracy"][0] < 0.7 * width


# -- the control task ----------------------------------------------------------------------------


def _probed(features: dict[str, np.ndarray], y: np.ndarray, permutations: int, seed: int = 0) -> dict:
    from pytest_mllmprobe.data import fold_indices

    folds = fold_indices(y, 3, seed)
    test = np.sort(np.concatenate([t for _, t in folds]))
    return cross_fit(features, y, folds, test, permutations=permutations, seed=seed), y[test]


def _locus(name: str, out, y_test: np.ndarray):
    probe_score = score(y_test, out.probabilities)
    locus = locus_result(name, 8, probe_score, chance_levels(y_test, 3))
    locus.control = control_summary(y_test, {m: locus.metric(m) for m in locus.chance},
                                    [ScoreSet(p, p.argmax(1)) for p in out.controls], 3)
    return locus


def test_noise_locus_has_no_selectivity_and_fails_while_planted_signal_passes() -> None:
    X, y = _planted(90)
    noise = np.random.default_rng(9).normal(size=X.shape).astype(np.float32)
    probed, y_test = _probed({"signal": X, "noise": noise}, y, permutations=19)
    signal, pure_noise = (_locus(n, probed[n], y_test) for n in ("signal", "noise"))
    assert -0.15 < pure_noise.control["accuracy"]["selectivity"] < 0.05  # near 0, below the default rule
    assert signal.control["accuracy"]["selectivity"] > 0.3
    assert signal.control["accuracy"]["p_value"] == pytest.approx(1 / 20)  # above every permutation
    [failing] = selectivity_check(pure_noise, "accuracy", 0.05, "t")  # the default rule
    assert not failing.passed and "shuffled labels" in failing.explanation and "permutations" in failing.explanation
    [passing] = selectivity_check(signal, "accuracy", 0.05, "t")
    assert passing.passed


def test_permutation_p_value_is_uniform_under_the_null() -> None:
    """Noise features, 60 seeds, 19 permutations each: P(p <= j/20) = j/20 for every j."""
    from scipy.stats import chisquare

    p_values = []
    for seed in range(60):
        rng = np.random.default_rng(seed + 100)
        y = np.arange(45) % 3
        X = rng.normal(size=(45, 4)).astype(np.float32)
        probed, y_test = _probed({"noise": X}, y, permutations=19, seed=seed)
        p_values.append(_locus("noise", probed["noise"], y_test).control["accuracy"]["p_value"])
    p_values = np.array(p_values)
    assert set(np.round(p_values * 20).astype(int)) <= set(range(1, 21))
    counts = np.histogram(p_values, bins=[0, 0.25 + 1e-9, 0.5 + 1e-9, 0.75 + 1e-9, 1.0 + 1e-9])[0]
    assert chisquare(counts).pvalue > 0.001, counts
    assert 0.35 < p_values.mean() < 0.7  # E[p] = 10.5 / 20 under the null, larger with ties


# -- comparisons with several images per patient ------------------------------------------------


def test_duplicated_patients_do_not_make_a_drop_significant() -> None:
    rng = np.random.default_rng(5)
    reference = rng.random(40) < 0.8
    current = reference.copy()
    current[:4] = False  # four images lost
    current[30] = True
    groups = np.arange(40)
    p_single, _ = clustered_regression(reference, current, groups)
    # one image per patient: the sign-flip test is the exact McNemar (sign) test, by hand
    assert p_single == pytest.approx(mcnemar_regression(reference, current))
    assert p_single > 0.05
    copies = np.repeat(groups, 4)
    p_copies, ci = clustered_regression(reference[copies], current[copies], copies)
    assert p_copies == pytest.approx(p_single)
    assert p_copies > 0.05  # the patient-level test is not fooled by the copies ...
    assert mcnemar_regression(reference[copies], current[copies]) < 0.01  # ... image-level McNemar is
    assert ci[0] < 0 < ci[1] or ci[1] <= 0


# -- the dip rule, end to end on a planted transient collapse ----------------------------------

COLLAPSE = '''
import torch
from pytest_mllmprobe import ModelAdapter
from pytest_mllmprobe.demo import DEMO_MODEL


class Collapsing(ModelAdapter):
    """Decoder layer {layer} drowns the hidden state in per-image noise; layer {layer} + 1 removes
    it again before it runs: the residual stream "repairs" a collapsed layer."""

    def load(self, device="auto", dtype="auto", device_map=None):
        model, processor = super().load(device, dtype, device_map)
        layers = model.model.language_model.layers
        held = {{}}
        generator = torch.Generator().manual_seed(0)  # a fresh draw for every image, every run alike

        def drown(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            noise = torch.randn(hidden.shape[0], 1, hidden.shape[2], generator=generator) * 200.0
            noise = noise.to(device=hidden.device, dtype=hidden.dtype)
            held["noise"] = noise
            out = hidden + noise
            return (out,) + tuple(output[1:]) if isinstance(output, tuple) else out

        def repair(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            fixed = hidden - held.pop("noise")
            if args:
                return (fixed,) + tuple(args[1:]), kwargs
            return args, dict(kwargs, hidden_states=fixed)

        layers[{layer}].register_forward_hook(drown)
        layers[{layer} + 1].register_forward_pre_hook(repair, with_kwargs=True)
        return model, processor


def collapsing():
    return Collapsing(str(DEMO_MODEL))
'''


def test_a_transient_collapse_fails_the_dip_rule_while_fhs_alone_passes(tmp_path, monkeypatch) -> None:
    import pytest_mllmprobe as pm

    (tmp_path / "collapse_at_one.py").write_text(textwrap.dedent(COLLAPSE.format(layer=1)))
    monkeypatch.syspath_prepend(str(tmp_path))
    result = pm.run("collapse_at_one:collapsing", data=str(DEMO_DATA), bootstrap=200, permutations=0)
    model = next(iter(result.models.values()))
    curve = [model.loci[f"llm.{i}.image"].accuracy for i in range(4)]
    assert curve[1] < 0.6 < min(curve[0], curve[2], curve[3])  # collapsed at llm.1, repaired at llm.2
    stage = model.verdicts["stage.llm"]
    checks = {c.rule: c for c in stage.checks}
    assert checks["min_fhs_ratio"].passed  # the FHS alone lets it through (it even rises)
    assert not checks["min_dip_ratio"].passed
    assert checks["min_dip_ratio"].locus == "llm.1.image"
    assert "llm.1.image collapses and a later layer recovers" in checks["min_dip_ratio"].explanation
    assert model.first_failing_stage == "llm"
    assert all(v.passed for name, v in model.verdicts.items() if name in ("stage.vision", "stage.connector"))
    sys.modules.pop("collapse_at_one", None)


# -- the demo, end to end ---------------------------------------------------------------------


def test_demo_prints_every_stage_score_with_its_interval(pytester: pytest.Pytester) -> None:
    report = pytester.path / "report"
    result = pytester.runpytest_subprocess("--mllm-model=demo", f"--mllm-report={report}", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=18)
    result.stdout.re_match_lines([
        r".*profile: FHS_V \d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\] -> FHS_C \d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\] -> "
        r"FHS_L \d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\] -> P_final \d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]",
        r".*\[95% intervals: bootstrap over 150 test images, 1000 resamples.*\[controls: 9 permuted-label probes.*",
    ])
    import json

    doc = json.loads((report / "results.json").read_text())
    assert doc["schema_version"] == 2
    demo = doc["models"]["demo"]
    for key in ("FHS_V", "FHS_C", "FHS_L", "P_final", "connector/vision", "dip/llm"):
        low, high = demo["intervals"][key]
        assert low <= high
    for key in ("FHS_V", "FHS_C", "FHS_L", "P_final"):
        assert demo["intervals"][key][0] <= demo["scores"][key] <= demo["intervals"][key][1]
    connector = demo["loci"]["connector"]
    assert connector["intervals"]["accuracy"][0] <= connector["accuracy"] <= connector["intervals"]["accuracy"][1]
    assert connector["control"]["accuracy"]["selectivity"] > 0.3
    assert connector["control"]["permutations"] == 9


def test_a_selectivity_rule_the_probe_cannot_meet_fails_naming_the_control(pytester: pytest.Pytester) -> None:
    pytester.makefile(".yaml", strict="version: 1\nlocus: {min_selectivity: 0.99}\n")
    result = pytester.runpytest_subprocess("--mllm-model=demo", "--mllm-thresholds=strict.yaml", "-p", "no:cacheprovider",
                                           "-k", "connector and not stage")
    result.assert_outcomes(failed=1, deselected=17)
    result.stdout.fnmatch_lines([
        "*FAIL selectivity = accuracy - control = * (control: the same probe on 9 permutations of the training "
        "labels; permutation p = *) >= 0.99: the probe reads only * more than it learns from shuffled labels",
        "*min_selectivity from strict.yaml: locus*",
    ])


def test_random_init_twin_runs_on_the_demo_and_is_drawn(pytester: pytest.Pytester) -> None:
    pytest.importorskip("matplotlib")
    report = pytester.path / "report"
    result = pytester.runpytest_subprocess("--mllm-model=demo", "--mllm-controls=random-init", f"--mllm-report={report}",
                                           "--mllm-permutations=0", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=18)
    result.stdout.fnmatch_lines(["*random-init twin: FHS_V * -> FHS_C * -> FHS_L * (same architecture, re-initialised weights; cost * s)*"])
    import json

    demo = json.loads((report / "results.json").read_text())["models"]["demo"]
    twin = demo["random_init"]
    assert twin["seed"] == 0 and set(twin["scores"]) >= {"FHS_V", "FHS_C", "FHS_L"}
    # the trained demo stands above its random twin at the connector and in the LLM
    for name in ("connector", "llm.3.image"):
        assert demo["loci"][name]["random_init"]["above"]["accuracy"] > 0.1
    from pytest_mllmprobe.report.layout import curve_of

    assert any(p.random_init is not None for p in curve_of(demo).points)
    assert (report / "demo.png").stat().st_size > 10_000


def test_an_underpowered_gate_says_so(pytester: pytest.Pytester) -> None:
    baseline = pytester.path / "base.json"
    pytester.runpytest_subprocess("--mllm-model=demo", f"--mllm-save-baseline={baseline}", "-p", "no:cacheprovider",
                                  "--mllm-permutations=0").assert_outcomes(passed=18)
    result = pytester.runpytest_subprocess("--mllm-model=demo", f"--mllm-baseline={baseline}", "-p", "no:cacheprovider",
                                           "--mllm-permutations=0")
    result.assert_outcomes(passed=18)
    result.stdout.fnmatch_lines([
        "*demo: with 150 test images no test can detect a drop of regression.max_drop 0.02 (the smallest "
        "detectable drop is 0.* at alpha 0.05 Holm-corrected over 18 tests, power 0.8); a smaller drop passes unseen*",
    ])


def test_power_option_prints_the_sizes_without_loading_a_model(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--mllm-power=0.05", "-p", "no:cacheprovider")
    assert result.ret == 0
    result.stdout.fnmatch_lines([
        "mllmprobe power: *150 test images, 150 independent test images (5 folds)*",
        f"*reference accuracy 0.80: a drop of 0.05 needs {units_needed(0.8, 0.05, 0.05)} test images*",
    ])
    assert "Loading weights" not in result.stdout.str() + result.stderr.str()


def test_a_comparison_on_data_with_patients_tests_patients(tmp_path) -> None:
    """Each of 30 patients has 4 copies of one image: the intervals resample patients, the
    comparison with the reference uses the patient-level test, and power counts 30 units."""
    import shutil

    import pytest_mllmprobe as pm

    from .faults import build_faulty

    rows = ["path,label,group"]
    for name in ("benign", "malignant", "normal"):
        for index, source in enumerate(sorted((DEMO_DATA / name).glob("*.png"))[:10]):
            for copy in range(4):
                target = tmp_path / "images" / f"{name}_{index}_{copy}.png"
                target.parent.mkdir(exist_ok=True)
                shutil.copyfile(source, target)
                rows.append(f"images/{target.name},{name},{name}-patient-{index}")
    manifest = tmp_path / "patients.csv"
    manifest.write_text("\n".join(rows) + "\n")
    tuned = build_faulty("rank1-connector", tmp_path / "models")
    results = pm.run(["demo", str(tuned)], data=str(manifest), compare_to="demo", permutations=0)
    faulty = results[tuned.name]
    assert faulty.uncertainty["unit"] == "patient" and faulty.uncertainty["n_units"] == 30
    power = faulty.comparison["power"]
    assert power["unit"] == "patient" and power["n_units"] == 30
    [check] = [c for c in faulty.verdicts["stage.connector"].checks if c.rule == "no_regression"]
    assert "patient-level sign-flip p" in check.explanation
    # 30 patients, not 120 images: the evidence is weaker than 120 independent images would claim
    reference = results["demo"].loci["connector"].correct
    assert len(reference) == 120
    assert check.p_value >= mcnemar_regression(reference, faulty.loci["connector"].correct)
