"""A model with its own code and stages under unknown names (Hulu-Med style).

It loads only with --mllm-trust-remote-code; its stages are not detected, the usage error says
what the model holds and which override to write, and the override (a threshold file's
``modules`` section, or --mllm-stages, which wins) makes it run end to end.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_mllmprobe.engine import plan
from pytest_mllmprobe.errors import ConfigError
from pytest_mllmprobe.settings import Settings

from .remote_code import expected_modules, save_remote_model

RUN = ("-p", "no:cacheprovider")


@pytest.fixture(scope="module")
def remote_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_remote_model(tmp_path_factory.mktemp("remote") / "hulu-tiny")


@pytest.fixture()
def modules_yaml(tmp_path: Path) -> Path:
    paths = expected_modules()
    path = tmp_path / "hulu.yaml"
    path.write_text(
        "models:\n  hulu-*:\n    modules:\n"
        + "".join(f"      {key}: {value}\n" for key, value in paths.items())
    )
    return path


def _usage_error(result: pytest.RunResult, pattern: str) -> str:
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str() + result.stderr.str()
    result.stderr.fnmatch_lines([f"ERROR: *{pattern}*"])
    assert "Traceback" not in result.stderr.str() + result.stdout.str()
    return result.stderr.str()


def test_remote_code_needs_the_opt_in(pytester: pytest.Pytester, remote_model: Path, lesion_data: Path) -> None:
    result = pytester.runpytest_subprocess(f"--mllm-model={remote_model}", f"--mllm-data={lesion_data}", *RUN)
    _usage_error(result, "needs its own code*run again with --mllm-trust-remote-code*")


def test_unknown_structure_names_its_layer_lists_and_the_override_to_write(
    pytester: pytest.Pytester, remote_model: Path, lesion_data: Path
) -> None:
    result = pytester.runpytest_subprocess(
        f"--mllm-model={remote_model}", f"--mllm-data={lesion_data}", "--mllm-trust-remote-code", *RUN
    )
    message = _usage_error(result, "cannot find the vision encoder layers, connector, language-model layers*")
    paths = expected_modules()
    assert f"{paths['vision']} (3), {paths['llm']} (4)" in message  # every layer list, with its length
    override = ",".join(f"{key}={value}" for key, value in paths.items())
    assert f"--mllm-stages {override}" in message  # the suggestion is the right one
    assert "'modules:' entry" in message


def test_the_threshold_files_modules_section_makes_it_run(
    pytester: pytest.Pytester, remote_model: Path, lesion_data: Path, modules_yaml: Path
) -> None:
    result = pytester.runpytest_subprocess(
        f"--mllm-model={remote_model}", f"--mllm-data={lesion_data}", "--mllm-trust-remote-code",
        f"--mllm-thresholds={modules_yaml}", f"--mllm-report={pytester.path / 'report'}", *RUN,
    )
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed", 0) + outcomes.get("failed", 0) == 17, result.stdout.str()  # 3 + 1 + 4x2 + 1 + 4 stages
    assert "error" not in outcomes and "errors" not in outcomes
    import json

    model = json.loads((pytester.path / "report" / "results.json").read_text())["models"]["hulu-tiny"]
    paths = expected_modules()
    assert model["stage_map"]["vision_layers"][0] == f"{paths['vision']}.0"
    assert model["stage_map"]["connector"] == paths["connector"]
    assert model["stage_map"]["llm_layers"][-1] == f"{paths['llm']}.3"
    assert model["thresholds"]["modules"] == paths


def test_the_command_line_wins_over_the_threshold_file(remote_model: Path, lesion_data: Path,
                                                      modules_yaml: Path) -> None:
    the_plan = plan(Settings(
        models=(str(remote_model),), data=str(lesion_data), trust_remote_code=True,
        thresholds=(str(modules_yaml),), stages={"connector": "bridge.linear_2"},
    ))
    stage_map = the_plan.models[0].stage_map
    assert stage_map.connector == "bridge.linear_2"
    assert stage_map.vision_layers[0] == f"{expected_modules()['vision']}.0"


def test_a_wrong_module_path_in_the_file_names_the_file_key_and_closest_modules(
    remote_model: Path, lesion_data: Path, tmp_path: Path
) -> None:
    typo = tmp_path / "typo.yaml"
    typo.write_text("models:\n  hulu-*:\n    modules: {vision: eye.encoder.layer, connector: bridge, llm: brain.layers}\n")
    with pytest.raises(ConfigError) as info:
        plan(Settings(models=(str(remote_model),), data=str(lesion_data), trust_remote_code=True,
                      thresholds=(str(typo),)))
    message = str(info.value)
    assert f'{typo}: models["hulu-*"].modules.vision' in message
    assert "no module 'eye.encoder.layer'" in message and "did you mean 'eye.encoder.layers'" in message


@pytest.mark.parametrize("text, expected", [
    ("modules: {vision: x}\n", "'modules' names one model's stage modules: put it in a models section"),
    ("models:\n  m:\n    modules: {vison: x}\n", "unknown key 'models[\"m\"].modules.vison' (did you mean 'vision'"),
    ("models:\n  m:\n    modules: {llm: 3}\n", "models[\"m\"].modules.llm must be a module path"),
])
def test_modules_section_schema_errors(tmp_path: Path, text: str, expected: str) -> None:
    from pytest_mllmprobe.thresholds import load_thresholds

    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_thresholds([str(path)])
    assert expected in str(info.value), str(info.value)
