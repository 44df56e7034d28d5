"""CI gating: baselines, same-job comparison, noise-aware verdicts, root cause, JUnit under xdist."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pytest_mllmprobe import run
from pytest_mllmprobe.baseline import FORMAT, SAVE_HINT, VERSION

from .faults import FAULTS, build_faulty

RUN = ("-p", "no:cacheprovider")
DAMAGED = {"rank1-connector": "connector", "corrupted-layer": "llm", "permuted-answer": "answer"}


@pytest.fixture(scope="module")
def lesions300(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 fresh synthetic images (the demo model never saw them): 90 paired test images."""
    from pytest_mllmprobe.demo.synth import make_images, write_image_folder

    return write_image_folder(make_images(100, seed=99), tmp_path_factory.mktemp("lesions300"))


@pytest.fixture(scope="module")
def same_job(tmp_path_factory: pytest.TempPathFactory, lesions300: Path):
    root = tmp_path_factory.mktemp("tuned")
    paths = [str(build_faulty(name, root)) for name in FAULTS]
    return run(["demo", *paths], data=str(lesions300), compare_to="demo")


@pytest.mark.parametrize("fault", sorted(DAMAGED))
def test_comparison_names_exactly_the_damaged_stage_as_root_cause(same_job, fault: str) -> None:
    result = same_job[fault]
    stage = DAMAGED[fault]
    regressed = result.comparison["regressed_stages"]
    assert regressed and regressed[0] == stage, result.diagnosis
    order = ["vision", "connector", "llm", "answer"]
    assert not set(regressed) & set(order[: order.index(stage)])  # nothing upstream
    assert f"root cause of the regression vs model 'demo': {stage}" in result.diagnosis
    failing = result.verdicts[f"stage.{stage}"]
    check = next(c for c in failing.checks if c.rule == "no_regression")
    assert not check.passed and check.p_value < 0.05 and check.reference > check.value
    assert check.ci[1] <= 0.0 or check.metric.startswith("FHS") or check.metric == "P_final"


def test_the_reference_model_is_not_compared_with_itself(same_job) -> None:
    demo = same_job["demo"]
    assert demo.comparison is None
    assert demo.first_failing_stage is None


def test_healthy_reruns_with_other_probe_seeds_do_not_regress(tmp_path: Path, lesions300: Path) -> None:
    from pytest_mllmprobe.baseline import merge, write_json_atomic
    from pytest_mllmprobe.engine import Evaluator, plan
    from pytest_mllmprobe.settings import Settings

    settings = Settings(models=("demo",), data=str(lesions300), probe="mlp", probe_seed=0)
    evaluator = Evaluator(plan(settings))
    baseline = tmp_path / "baseline.json"
    write_json_atomic(baseline, merge(None, {"demo": (evaluator.entry("demo"), set())}))
    values = []
    for seed in (1, 2, 3):
        result = run("demo", data=str(lesions300), probe="mlp", probe_seed=seed, baseline=str(baseline))["demo"]
        assert result.comparison["regressed_stages"] == [], (seed, result.diagnosis)
        values.append(result.loci["connector"].accuracy)
    assert len(set(values)) > 1  # the seeds really changed the probes


def _pytest(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("--mllm-model=demo", *args, *RUN)


def test_baseline_workflow(pytester: pytest.Pytester) -> None:
    baseline = pytester.path / "ci" / "baseline.json"
    missing = _pytest(pytester, f"--mllm-baseline={baseline}")
    assert missing.ret == pytest.ExitCode.USAGE_ERROR
    missing.stderr.fnmatch_lines([f"ERROR: --mllm-baseline * does not exist; {SAVE_HINT}"])

    saved = _pytest(pytester, f"--mllm-save-baseline={baseline}")
    saved.assert_outcomes(passed=18)
    doc = json.loads(baseline.read_text())
    assert doc["format"] == FORMAT and doc["version"] == VERSION and "torch" in doc["versions"]
    entry = doc["models"]["demo"]
    assert len(entry["data"]["test_ids"]) == 150 and entry["data"]["fingerprint"]
    assert len(entry["loci"]["connector"]["correct"]) == 150
    assert sorted(p.name for p in baseline.parent.iterdir()) == ["baseline.json"]  # no temp files

    same = _pytest(pytester, f"--mllm-baseline={baseline}")
    same.assert_outcomes(passed=18)
    same.stdout.fnmatch_lines(["*all stages pass; no regression vs baseline*"])

    # measured another way (here: the MLP probe), the entry is replaced whole, never mixed
    mixed = _pytest(pytester, f"--mllm-baseline={baseline}", "--mllm-update-baseline",
                    "--mllm-probe=mlp", "-k", "connector")
    mixed.assert_outcomes(passed=2, deselected=16)
    after = json.loads(baseline.read_text())["models"]["demo"]
    assert after["settings"]["probe"] == "mlp"
    assert after["loci"]["answer"] == entry["loci"]["answer"]  # the answer needs no probe
    assert after["loci"]["vision.0"] != entry["loci"]["vision.0"]  # re-measured, not kept

    _pytest(pytester, f"--mllm-baseline={baseline}", "--mllm-update-baseline")  # back to linear
    other_split = _pytest(pytester, f"--mllm-baseline={baseline}", "--mllm-seed=5")
    assert other_split.ret == pytest.ExitCode.USAGE_ERROR
    other_split.stderr.fnmatch_lines(["ERROR: *model 'demo' was measured on another train/test split*"])

    subset = _pytest(pytester, f"--mllm-baseline={baseline}", "--mllm-max-samples=60")
    assert subset.ret == pytest.ExitCode.USAGE_ERROR
    subset.stderr.fnmatch_lines(["ERROR: *model 'demo' was measured on another dataset*"])


def test_a_partial_update_rewrites_only_the_tests_that_ran(pytester: pytest.Pytester, tmp_path: Path) -> None:
    import shutil

    from pytest_mllmprobe.demo import DEMO_DATA, DEMO_MODEL

    checkpoint = pytester.path / "checkpoint"
    shutil.copytree(DEMO_MODEL, checkpoint)
    baseline = pytester.path / "baseline.json"
    args = (f"--mllm-model={checkpoint}", f"--mllm-data={DEMO_DATA}", *RUN)
    pytester.runpytest_subprocess(*args, f"--mllm-save-baseline={baseline}").assert_outcomes(passed=18)
    before = json.loads(baseline.read_text())["models"]["checkpoint"]
    # the checkpoint changes (its connector collapses); only the connector tests are re-recorded
    shutil.rmtree(checkpoint)
    shutil.move(str(build_faulty("rank1-connector", tmp_path)), str(checkpoint))
    partial = pytester.runpytest_subprocess(*args, f"--mllm-baseline={baseline}", "--mllm-update-baseline",
                                            "-k", "connector")
    partial.assert_outcomes(passed=1, failed=1, deselected=16)  # the threshold rule still applies
    after = json.loads(baseline.read_text())["models"]["checkpoint"]
    assert after["loci"]["connector"] != before["loci"]["connector"]
    assert after["scores"]["FHS_C"] < before["scores"]["FHS_C"]
    assert after["loci"]["answer"] == before["loci"]["answer"]  # did not run: kept
    assert after["scores"]["P_final"] == before["scores"]["P_final"]


def test_another_architecture_is_a_usage_error(pytester: pytest.Pytester, lesion_data: Path) -> None:
    from pytest_mllmprobe.demo.tiny import save_model, tiny_llava

    model_dir = pytester.path / "checkpoint"
    save_model(*tiny_llava("llava", text_layers=4), model_dir)
    baseline = pytester.path / "baseline.json"
    args = (f"--mllm-model={model_dir}", f"--mllm-data={lesion_data}", *RUN)
    pytester.runpytest_subprocess(*args, f"--mllm-save-baseline={baseline}")
    import shutil

    shutil.rmtree(model_dir)
    save_model(*tiny_llava("llava", text_layers=3), model_dir)
    result = pytester.runpytest_subprocess(*args, f"--mllm-baseline={baseline}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: *model 'checkpoint' has another architecture (13 loci in the baseline, 11 now)*"])


def test_a_regression_is_a_failing_test_with_its_figures(pytester: pytest.Pytester, tmp_path: Path) -> None:
    from pytest_mllmprobe.demo import DEMO_DATA

    tuned = build_faulty("permuted-answer", tmp_path)
    report = pytester.path / "report.xml"
    result = pytester.runpytest_subprocess(
        "--mllm-model=demo", f"--mllm-model={tuned}", f"--mllm-data={DEMO_DATA}",
        "--mllm-compare-to=demo", "--junitxml", str(report), "-o", "junit_family=xunit1", *RUN,
    )
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines([
        "model * stage * locus * metric * value * threshold * baseline * delta * p * rule",
        "*FAIL vs model 'demo': P_final 0.0?? vs 0.9??*McNemar p = *",
    ])
    case = next(c for c in ET.parse(report).getroot().iter("testcase")
                if c.get("name") == "stage.answer" and c.get("classname") == "mllm.permuted-answer")
    props = {p.get("name"): p.get("value") for p in case.find("properties")}
    assert float(props["baseline"]) > 0.9 and float(props["p_value"]) < 0.05
    assert props["regressed"] == "True"
    # one-line CI annotations carry the finding with its figures, not the table header
    message = case.find("failure").get("message")
    assert message.startswith("stage.answer: accuracy 0.0"), message
    assert "< 0.7" in message and "(rule: P_final" in message, message
    result.stdout.fnmatch_lines(["FAILED mllm/permuted-answer::stage.answer - stage.answer: accuracy 0.0?? < 0.*"])  # cut at 80 columns


def test_junit_validates_under_xdist_with_suite_properties(pytester: pytest.Pytester, junit_schema: Path) -> None:
    import xmlschema

    report = pytester.path / "report.xml"
    result = _pytest(pytester, "-n", "2", "--junitxml", str(report))
    result.assert_outcomes(passed=18)
    result.stdout.fnmatch_lines(["*mllmprobe: feature health*", "*profile: FHS_V*"])
    xmlschema.XMLSchema(str(junit_schema)).validate(str(report))
    props = {p.get("name"): p.get("value") for p in ET.parse(report).getroot().iter("property")}
    assert "mllmprobe:demo:profile" in props
    assert len([name for name in props if name.startswith("mllmprobe:mllm/demo::")]) == 18


def test_the_results_fixture_serves_custom_assertions(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        def test_connector_keeps_the_signal(mllm_results):
            demo = mllm_results["demo"]
            assert list(mllm_results) == ["demo"]
            assert demo.loci["connector"].accuracy >= 0.5
            assert demo.verdicts["stage.connector"].passed
        """
    )
    result = _pytest(pytester, "-k", "keeps_the_signal")
    result.assert_outcomes(passed=1, deselected=18)
    alone = pytester.runpytest_subprocess(*RUN)
    alone.assert_outcomes(skipped=1)


def test_a_baseline_that_cannot_be_merged_is_reported_not_raised(pytester: pytest.Pytester) -> None:
    target = pytester.path / "baseline.json"
    target.write_text("not json")
    result = _pytest(pytester, f"--mllm-save-baseline={target}", "-k", "stage.answer")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.assert_outcomes(passed=1, deselected=17)
    result.stdout.fnmatch_lines(["mllmprobe could not write the baseline *--mllm-save-baseline * is not a readable JSON baseline*"])
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    assert target.read_text() == "not json"  # left as it was


def test_compare_to_another_architecture_is_a_usage_error(tiny_llava_dir: Path, lesion_data: Path) -> None:
    from pytest_mllmprobe.engine import Evaluator, plan
    from pytest_mllmprobe.errors import ConfigError
    from pytest_mllmprobe.settings import Settings

    settings = Settings(models=("demo", str(tiny_llava_dir)), data=str(lesion_data), compare_to="demo")
    with pytest.raises(ConfigError, match="model 'tiny-llava' has another architecture .* compare checkpoints"):
        Evaluator(plan(settings))


def test_compare_to_and_a_baseline_combine(tmp_path: Path) -> None:
    """The reference model is checked against the baseline; the others against the reference."""
    from pytest_mllmprobe.baseline import merge, write_json_atomic
    from pytest_mllmprobe.demo import DEMO_DATA
    from pytest_mllmprobe.engine import Evaluator, plan
    from pytest_mllmprobe.settings import Settings

    evaluator = Evaluator(plan(Settings(models=("demo",), data=str(DEMO_DATA))))
    baseline = tmp_path / "baseline.json"
    write_json_atomic(baseline, merge(None, {"demo": (evaluator.entry("demo"), set())}))
    tuned = build_faulty("permuted-answer", tmp_path)
    results = run(["demo", str(tuned)], data=str(DEMO_DATA), compare_to="demo", baseline=str(baseline))
    assert results["demo"].comparison["kind"] == "baseline"
    assert results["demo"].comparison["regressed_stages"] == []
    assert results["permuted-answer"].comparison["kind"] == "model"
    assert results["permuted-answer"].comparison["regressed_stages"] == ["answer"]
