"""Known answers from planted faults: each damaged stage fails, and nothing upstream of it."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_mllmprobe import run
from pytest_mllmprobe.demo import DEMO_DATA
from pytest_mllmprobe.health import FAILURE_MODES

from .faults import build_faulty


@pytest.fixture(scope="module")
def healthy():
    return run("demo")["demo"]


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("faults")
    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            path = build_faulty(name, root)
            cache[name] = run(str(path), data=str(DEMO_DATA))[name]
        return cache[name]

    return get


def _failing(result) -> set[str]:
    return {name for name, verdict in result.verdicts.items() if not verdict.passed}


def _stage_tests(result, stage: str) -> set[str]:
    return {name for name, verdict in result.verdicts.items() if verdict.stage == stage}


def test_the_healthy_demo_passes_every_test(healthy) -> None:
    assert _failing(healthy) == set()
    assert healthy.first_failing_stage is None
    assert healthy.loci["answer"].accuracy >= 0.8


def test_rank1_connector_fails_the_connector_rule_and_nothing_upstream(healthy, faulty) -> None:
    result = faulty("rank1-connector")
    failing = _failing(result)
    assert "stage.connector" in failing
    assert not failing & _stage_tests(result, "vision")
    assert result.first_failing_stage == "connector"
    for name in _stage_tests(result, "vision") - {"stage.vision"}:  # upstream is untouched
        assert result.loci[name].accuracy == healthy.loci[name].accuracy
    assert result.loci["connector"].accuracy < healthy.loci["connector"].accuracy


def test_permuted_answer_rows_fail_the_answer_stage_only(healthy, faulty) -> None:
    result = faulty("permuted-answer")
    failing = _failing(result)
    assert failing and {result.verdicts[name].stage for name in failing} == {"answer"}
    assert "stage.answer" in failing
    assert result.first_failing_stage == "answer"
    # the hidden states are the same: every probe reads exactly what the healthy model's did
    for name, locus in result.loci.items():
        if name != "answer" and not name.startswith("lens."):  # the lens reads the permuted rows too
            assert locus.accuracy == healthy.loci[name].accuracy, name
    assert result.scores["P_final"] < 0.5 * healthy.scores["P_final"]


def test_corrupted_middle_layer_fails_the_language_model_stage(healthy, faulty) -> None:
    result = faulty("corrupted-layer")
    failing = _failing(result)
    assert "stage.llm" in failing
    assert result.first_failing_stage == "llm"
    assert not failing & (_stage_tests(result, "vision") | _stage_tests(result, "connector"))
    n = len([name for name in result.loci if name.endswith(".image")])
    middle = n // 2
    for i in range(middle):  # layers before the corrupted one are untouched
        assert f"llm.{i}.image" not in failing and f"llm.{i}.last" not in failing
    assert {f"llm.{middle}.image", f"llm.{middle}.last"} <= failing
    assert result.loci[f"llm.{middle}.image"].finite is False
    assert result.scores["FHS_L"] < healthy.scores["FHS_L"]


def test_the_engine_and_the_plugin_see_the_same_numbers(healthy, pytester: pytest.Pytester) -> None:
    import json

    report = pytester.path / "report.xml"
    result = pytester.runpytest_subprocess("--mllm-model=demo", "--junitxml", str(report), "-p", "no:cacheprovider")
    result.assert_outcomes(passed=len(healthy.verdicts))
    import xml.etree.ElementTree as ET

    props = {p.get("name"): p.get("value") for p in ET.parse(report).getroot().iter("property")}
    connector = json.loads(props["mllmprobe:mllm/demo::connector"])
    assert connector["value"] == round(healthy.loci["connector"].accuracy, 4)


def test_a_planted_fault_names_its_stage_in_the_pytest_output(tmp_path: Path, pytester: pytest.Pytester) -> None:
    path = build_faulty("permuted-answer", tmp_path)
    result = pytester.runpytest_subprocess(
        f"--mllm-model={path}", f"--mllm-data={DEMO_DATA}", "-p", "no:cacheprovider"
    )
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines([
        "*mllm permuted-answer::stage.answer*",
        "model * stage * locus * metric * value * threshold * delta * rule",
        "permuted-answer * answer * answer * accuracy *FAIL P_final >= 0.8 x P(llm.3.last)*",
        f"failure mode: {FAILURE_MODES['answer']} (stage answer)",
        "*mllmprobe: feature health*",
        f"*first failing stage: answer ({FAILURE_MODES['answer']})",
    ])
    assert "Traceback" not in result.stdout.str()
    result.stdout.no_fnmatch_line("FAILED *::stage.connector*")
