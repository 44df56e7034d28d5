"""Causal-LM remote code (Hulu-Med's shape): ``AutoModelForCausalLM`` + its own processor.

The tiny look-alike (tests/hulu_med.py) keeps what makes Hulu-Med hard: only
``AutoModelForCausalLM`` in its ``auto_map``, the vision encoder and projector inside the decoder
module ``get_decoder()`` returns, extra forward inputs (``grid_sizes``, ``merge_sizes``,
``modals``), one flat ``[sum of patches, D]`` vision sequence for the batch, a processor that
reads one prompt per call, and a ``generate`` that returns only the new tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pytest_mllmprobe.models import adapter_for, detect_stages, resolve_model
from pytest_mllmprobe.models.remote import RemoteCausalLMAdapter

from .helpers import check_batch_invariance
from .hulu_med import expected_modules, save_hulu_med

RUN = ("-p", "no:cacheprovider")


@pytest.fixture(scope="module")
def seven_images(lesion_data: Path) -> list:
    from pytest_mllmprobe.data import load_image, load_image_folder

    data = load_image_folder(lesion_data)
    return [load_image(data.paths[i]) for i in (0, 5, 21, 26, 41, 47, 10)]


@pytest.fixture(scope="module")
def hulu(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_hulu_med(tmp_path_factory.mktemp("hulu") / "hulu-med-tiny", image_merge_size=2)


def test_it_needs_the_remote_code_opt_in(pytester: pytest.Pytester, hulu: Path, lesion_data: Path) -> None:
    result = pytester.runpytest_subprocess(f"--mllm-model={hulu}", f"--mllm-data={lesion_data}", *RUN)
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str() + result.stderr.str()
    result.stderr.fnmatch_lines(["ERROR: *needs its own code*--mllm-trust-remote-code*"])


def test_it_runs_end_to_end_through_pytest(pytester: pytest.Pytester, hulu: Path, lesion_data: Path) -> None:
    result = pytester.runpytest_subprocess(
        f"--mllm-model={hulu}", f"--mllm-data={lesion_data}", "--mllm-trust-remote-code",
        f"--mllm-report={pytester.path / 'report'}", *RUN,
    )
    outcomes = result.parseoutcomes()
    # 3 vision + connector + 4 x 2 decoder readouts + answer + 4 stage rules, every one run
    assert outcomes.get("passed", 0) + outcomes.get("failed", 0) == 17, result.stdout.str()
    assert "error" not in outcomes and "errors" not in outcomes
    assert "Error" not in "".join(line for line in result.stdout.lines if line.startswith("FAILED"))
    model = json.loads((pytester.path / "report" / "results.json").read_text())["models"]["hulu-med-tiny"]
    paths = expected_modules()
    assert model["stage_map"]["vision_layers"] == [f"{paths['vision']}.{i}" for i in range(3)]
    assert model["stage_map"]["connector"] == paths["connector"]
    assert model["stage_map"]["llm_layers"] == [f"{paths['llm']}.{i}" for i in range(4)]


def test_flat_outputs_split_per_image_and_the_batch_does_not_matter(hulu: Path, seven_images: list) -> None:
    adapter = adapter_for(resolve_model(str(hulu)), trust_remote_code=True)
    assert isinstance(adapter, RemoteCausalLMAdapter)
    model, processor = adapter.load("cpu", "float32")
    from pytest_mllmprobe.models import LoadedModel, ModelSpec

    loaded = LoadedModel(ModelSpec("hulu", str(hulu)), model, processor, __import__("torch").device("cpu"),
                         __import__("torch").float32, adapter)
    stage_map = detect_stages(model)
    check_batch_invariance(loaded, stage_map, seven_images)


def test_the_language_model_is_never_the_vision_encoder_it_holds(hulu: Path) -> None:
    """get_decoder() returns the module that also holds the vision encoder; with more vision
    blocks than decoder layers, the longest list under it is the vision encoder's."""
    import torch
    from transformers import AutoModelForCausalLM

    adapter = adapter_for(resolve_model(str(hulu)), trust_remote_code=True)
    config = adapter.config()
    config.vision_encoder_config.num_hidden_layers = 6
    with torch.device("meta"):
        structure = AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    assert structure.get_decoder() is structure.model
    stage_map = detect_stages(structure)
    assert stage_map.llm_layers[-1] == "model.layers.3"
    assert stage_map.vision_layers[-1] == "model.vision_encoder.encoder.layers.5"
    assert stage_map.connector == "model.mm_projector"


def test_generated_answers_are_read_when_generate_returns_only_the_new_tokens(hulu: Path, lesion_data: Path) -> None:
    """Hulu-Med's generate returns the new tokens without the prompt: cutting the prompt's length
    off them (what echoing models need) would leave every answer empty."""
    from pytest_mllmprobe import run

    result = run(str(hulu), str(lesion_data), trust_remote_code=True, answer="generate", max_samples=12)
    examples = result["hulu-med-tiny"].answers["generate"]["examples"]
    assert examples and all(example["text"].strip() for example in examples), examples
