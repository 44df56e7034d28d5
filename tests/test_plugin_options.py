"""The plugin's pytest face: cheap import, options, ini keys, usage errors (exit code 4)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pytest_mllmprobe.plugin import OPTIONS

from .conftest import subprocess_env


def test_importing_the_plugin_imports_no_heavy_library() -> None:
    code = (
        "import sys, pytest_mllmprobe.plugin, pytest_mllmprobe.items; "
        "heavy = [m for m in ('torch', 'transformers', 'sklearn') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env())
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_run_without_a_model_adds_nothing_and_imports_nothing(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        "import sys\n"
        "def test_plain():\n"
        "    assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    result.stdout.no_fnmatch_line("*mllmprobe:*")


def test_help_lists_every_option_with_its_default(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--help")
    text = " ".join(result.stdout.str().split())  # help lines are wrapped
    for opt in OPTIONS:
        assert "(default: " in opt.help, opt.flag
        assert f"{opt.flag}" in text and f"{opt.ini} (" in text, opt.flag
        assert " ".join(opt.help.split())[:60] in text, opt.flag


def _usage_error(result: pytest.RunResult, *patterns: str) -> None:
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str() + result.stderr.str()
    result.stderr.fnmatch_lines([f"ERROR: *{p}*" for p in patterns])
    assert "Traceback" not in result.stderr.str() + result.stdout.str()


def test_unknown_model_path_is_a_usage_error(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--mllm-model=./no-such-model", "-p", "no:cacheprovider")
    _usage_error(result, "--mllm-model './no-such-model' was not found*expected a local folder*")


def test_folder_without_config_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.mkdir("empty-model")
    result = pytester.runpytest_subprocess("--mllm-model=empty-model", "-p", "no:cacheprovider")
    _usage_error(result, "is not a saved model: expected a folder with config.json*")


def test_data_with_one_class_is_a_usage_error(pytester: pytest.Pytester, lesion_data: Path) -> None:
    only = pytester.mkdir("one-class")
    (only / "benign").mkdir()
    for image in sorted((lesion_data / "benign").iterdir())[:5]:
        (only / "benign" / image.name).write_bytes(image.read_bytes())
    result = pytester.runpytest_subprocess("--mllm-model=demo", f"--mllm-data={only}", "-p", "no:cacheprovider")
    _usage_error(result, "has only one class with images ('benign')*at least two classes*")


def test_misspelled_threshold_key_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makefile(".yaml", bad="version: 1\nstages:\n  conector:\n    min_keep: 0.9\n")
    result = pytester.runpytest_subprocess("--mllm-model=demo", "--mllm-thresholds=bad.yaml", "-p", "no:cacheprovider")
    _usage_error(result, "bad.yaml*conector*did you mean 'connector'*")


def test_bad_ini_value_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nmllm_model = demo\nmllm_batch_size = many\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    _usage_error(result, "ini key mllm_batch_size = 'many' is not a valid int*")


def test_bad_option_value_is_a_usage_error(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--mllm-model=demo", "--mllm-test-size=1.5", "-p", "no:cacheprovider")
    _usage_error(result, "--mllm-test-size 1.5 must be between 0 and 1*")


def test_ini_keys_mirror_the_options(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nmllm_model = ./from-ini\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    _usage_error(result, "--mllm-model './from-ini' was not found*")
    # the command line wins over the ini file
    result = pytester.runpytest_subprocess("--mllm-model=./from-cli", "-p", "no:cacheprovider")
    _usage_error(result, "--mllm-model './from-cli' was not found*")


def test_remote_code_is_refused_unless_the_user_opts_in(pytester: pytest.Pytester, lesion_data: Path) -> None:
    model = pytester.mkdir("custom-model")
    (model / "config.json").write_text(
        '{"model_type": "hulu_custom", "auto_map": {"AutoConfig": "configuration_hulu.HuluConfig"}}'
    )
    (model / "configuration_hulu.py").write_text(
        "from transformers import PretrainedConfig\n"
        "class HuluConfig(PretrainedConfig):\n    model_type = 'hulu_custom'\n"
    )
    result = pytester.runpytest_subprocess(f"--mllm-model={model}", f"--mllm-data={lesion_data}", "-p", "no:cacheprovider")
    _usage_error(result, "needs its own code from the model folder or hub; run again with --mllm-trust-remote-code*")


def test_usage_errors_reach_the_user_under_xdist(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--mllm-model=demo", "--mllm-data=no-such-data", "-n", "2", "-p", "no:cacheprovider")
    _usage_error(result, "--mllm-data 'no-such-data' does not exist*")


def test_a_bad_bool_ini_value_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nmllm_model = demo\nmllm_skip_bad_images = maybe\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    _usage_error(result, "ini key mllm_skip_bad_images = 'maybe' is not true or false*")


def test_ini_paths_are_read_from_the_ini_files_folder(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
                                                    lesion_data: Path) -> None:
    only = pytester.mkdir("one-class")
    (only / "benign").mkdir()
    for image in sorted((lesion_data / "benign").iterdir())[:3]:
        (only / "benign" / image.name).write_bytes(image.read_bytes())
    pytester.makeini("[pytest]\nmllm_model = demo\nmllm_data = one-class\n")
    monkeypatch.chdir(pytester.mkdir("deeper"))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    _usage_error(result, f"--mllm-data '{only}' has only one class*")
