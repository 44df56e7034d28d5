"""End-to-end pytest runs in a subprocess: the demo, -k selection, failure output, JUnit XML."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pytest_mllmprobe.health import FAILURE_MODES

RUN = ("-p", "no:cacheprovider", "-p", "no:randomly")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[pytest.RunResult, Path]:
    """One full demo run with a JUnit report (xunit2, the default family)."""
    import subprocess
    import sys

    from .conftest import subprocess_env

    where = tmp_path_factory.mktemp("demo-run")
    report = where / "report.xml"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--mllm-model=demo", "--junitxml", str(report), "-rA", *RUN],
        cwd=where, capture_output=True, text=True, env=subprocess_env(), timeout=600,
    )
    return done, report


def test_demo_passes_and_prints_the_profile(demo_run) -> None:
    done, _ = demo_run
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "mllmprobe: feature health" in out
    assert "profile: FHS_V " in out and " -> FHS_C " in out and " -> FHS_L " in out and " -> P_final " in out
    assert "all stages pass" in out
    assert "mllmprobe: demo: extracted 150/150 images" in out  # progress shows through capture
    assert "connector reads vision.2 (vision_feature_layer=-2)" in out
    for name in ("mllm/demo::vision.0", "mllm/demo::connector", "mllm/demo::llm.0.image",
                 "mllm/demo::llm.0.last", "mllm/demo::answer", "mllm/demo::stage.connector"):
        assert f"PASSED {name}" in out
    assert "warning" not in out.lower()


def test_junit_xunit2_validates_against_the_schema(demo_run, junit_schema: Path) -> None:
    import xmlschema

    _, report = demo_run
    xmlschema.XMLSchema(str(junit_schema)).validate(str(report))
    root = ET.parse(report).getroot()
    suite = root.find("testsuite")
    assert suite is not None
    cases = suite.findall("testcase")
    assert all(case.find("properties") is None for case in cases)
    props = {p.get("name"): p.get("value") for p in suite.find("properties")}
    figures = json.loads(props["mllmprobe:mllm/demo::connector"])
    assert figures["model"] == "demo" and figures["stage"] == "connector" and figures["locus"] == "connector"
    assert {"metric", "value", "threshold", "delta", "failure_mode"} <= set(figures)
    assert figures["value"] >= figures["threshold"]
    assert "FHS_V" in props["mllmprobe:demo:profile"]
    assert {c.get("classname") for c in cases} == {"mllm.demo"}


def test_k_selects_by_stage_and_readout(tmp_path: Path, pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--mllm-model=demo", "-k", "connector", "--collect-only", "-q", *RUN)
    result.stdout.fnmatch_lines(["mllm/demo::connector", "mllm/demo::stage.connector", "2/* tests collected*"])
    ran = pytester.runpytest_subprocess("--mllm-model=demo", "-k", "connector", "-q", *RUN)
    ran.assert_outcomes(passed=2, deselected=16)
    ran.stdout.no_fnmatch_line("*extracted*images*")  # -q keeps the progress quiet
    result = pytester.runpytest_subprocess("--mllm-model=demo", "-k", "llm and last", "--collect-only", "-q", *RUN)
    lines = [line for line in result.stdout.lines if line.startswith("mllm/")]
    assert lines and all(line.endswith(".last") and "::llm." in line for line in lines)


@pytest.fixture(scope="module")
def faulty_xunit1_run(tmp_path_factory: pytest.TempPathFactory):
    """The demo with its answer rows permuted, reported with testcase-level properties."""
    import subprocess
    import sys

    from pytest_mllmprobe.demo import DEMO_DATA

    from .conftest import subprocess_env
    from .faults import build_faulty

    where = tmp_path_factory.mktemp("xunit1-run")
    model = build_faulty("permuted-answer", where)
    report = where / "report.xml"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", f"--mllm-model={model}", f"--mllm-data={DEMO_DATA}",
         "--junitxml", str(report), "-o", "junit_family=xunit1", *RUN],
        cwd=where, capture_output=True, text=True, env=subprocess_env(), timeout=600,
    )
    return done, report


def test_junit_xunit1_carries_figures_per_testcase(faulty_xunit1_run) -> None:
    done, report = faulty_xunit1_run
    assert done.returncode == 1, done.stdout + done.stderr
    assert "warning" not in done.stdout.lower()
    root = ET.parse(report).getroot()
    case = next(c for c in root.iter("testcase") if c.get("name") == "stage.answer")
    props = {p.get("name"): p.get("value") for p in case.find("properties")}
    assert props["model"] == "permuted-answer" and props["stage"] == "answer" and props["locus"] == "answer"
    assert props["failure_mode"] == FAILURE_MODES["answer"]
    assert float(props["value"]) < float(props["threshold"])
    failure = case.find("failure")
    assert failure is not None and FAILURE_MODES["answer"] in failure.get("message")
    passing = next(c for c in root.iter("testcase") if c.get("name") == "connector")
    names = {p.get("name") for p in passing.find("properties")}
    assert {"model", "stage", "locus", "metric", "value", "threshold"} <= names
    assert "failure_mode" not in names
