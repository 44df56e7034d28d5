"""Never a silent wrong layer: tie-breaks, odd but legal configs, and the data-flow check.

Structures are real transformers models built on the ``meta`` device from tester-like configs
(two lists of equal length, cross-attention layers past the decoder, a feature layer that reads
the embeddings); the data-flow check runs on the bundled demo with planted wrong stage maps.
"""

from __future__ import annotations

import pytest

from pytest_mllmprobe.demo import DEMO_DATA
from pytest_mllmprobe.errors import ConfigError
from pytest_mllmprobe.models import detect_stages

from .tiny_families import BUILDERS

RUN = ("-p", "no:cacheprovider")


def _structure(config):
    import torch
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config)


def test_equal_lists_go_to_the_first_registered_qwen3_vl_blocks_not_deepstack_mergers() -> None:
    """transformers' Qwen3-VL tester shape: as many deepstack mergers as vision blocks."""
    config, _ = BUILDERS["qwen3_vl"]()
    config.vision_config.depth = 2
    config.vision_config.deepstack_visual_indexes = [0, 1]
    stage_map = detect_stages(_structure(config))
    assert stage_map.vision_layers == ("model.visual.blocks.0", "model.visual.blocks.1")
    assert stage_map.connector == "model.visual.merger"


def test_cross_attention_layers_past_the_decoder_are_a_usage_error() -> None:
    """Mllama's tester: 2 decoder layers, a cross-attention layer at index 3."""
    config, _ = BUILDERS["mllama"]()
    config.text_config.num_hidden_layers = 2
    config.text_config.cross_attention_layers = [3]
    with pytest.raises(ConfigError, match=r"cross_attention_layers \[3\] names decoder layer\(s\) 3, but "
                                          r"model.language_model.layers has 2 layers"):
        detect_stages(_structure(config))


@pytest.mark.parametrize("layers, consumed, embeddings", [
    ([0, -2], (1,), True),   # hidden_states[0] is the embeddings: noted, not a block
    ([-4, 3], (2,), True),   # -(n + 1) is the embeddings too (3 blocks)
    ([1, -1], (0, 2), False),
])
def test_vipllava_never_counts_the_embeddings_as_a_block(layers, consumed, embeddings) -> None:
    from pytest_mllmprobe.demo.tiny import tiny_llava

    model, _ = tiny_llava("vipllava", vision_layers=3, vision_feature_layer=layers)
    stage_map = detect_stages(model)
    assert stage_map.consumed_vision_layers == consumed
    assert any("vision embeddings" in note for note in stage_map.notes) is embeddings


@pytest.mark.parametrize("layers, message", [
    ([0], "reads only the vision embeddings"),
    ([-5], "index -5 is outside the vision encoder's hidden states"),
    ([4], "index 4 is outside"),
])
def test_feature_layers_that_read_no_block_are_usage_errors(layers, message) -> None:
    from pytest_mllmprobe.demo.tiny import tiny_llava

    model, _ = tiny_llava("vipllava", vision_layers=3, vision_feature_layer=layers)
    with pytest.raises(ConfigError, match=message):
        detect_stages(model)


def test_mm_vision_select_layer_is_read_when_the_config_has_no_transformers_key() -> None:
    from types import SimpleNamespace

    from pytest_mllmprobe.models.stages import _consumed_layers, _feature_layer

    config = SimpleNamespace(mm_vision_select_layer=-3)  # the original LLaVA code's key
    assert _feature_layer(config) == -3
    assert _consumed_layers(_feature_layer(config), 4) == (1,)  # hidden_states[-3] = block 1 of 4


def test_a_vision_list_inside_the_language_model_is_refused() -> None:
    from pytest_mllmprobe.demo.tiny import tiny_llava

    model, _ = tiny_llava("llava")
    with pytest.raises(ConfigError, match="one layer list lies inside the other"):
        detect_stages(model, {"vision": "model.language_model.layers.0.mlp.down_proj",
                              "llm": "model.language_model.layers"})


# -- data flow ------------------------------------------------------------------------------

@pytest.mark.parametrize("connector, failed", [
    ("model.language_model.embed_tokens", "is not fed by the vision encoder"),
    ("model.vision_tower.post_layernorm", "the language model does not read the connector"),
])
def test_a_planted_wrong_connector_is_refused_naming_the_one_that_passes(connector, failed) -> None:
    from pytest_mllmprobe import run

    with pytest.raises(ConfigError) as info:
        run("demo", stages={"connector": connector})
    message = str(info.value)
    assert failed in message
    assert "Modules that pass: model.multi_modal_projector;" in message  # its children are not listed
    assert "embed_tokens" not in message.split("Modules that pass:")[1]  # a failing module is never suggested


def test_a_connector_of_the_wrong_token_count_is_refused() -> None:
    """What the connector emits must be what the language model receives at the image tokens."""
    import torch

    from pytest_mllmprobe.models import adapter_for, resolve_model
    from pytest_mllmprobe.models.flow import _check_token_count, _reader
    from pytest_mllmprobe.prompts import build_prompt

    spec = resolve_model("demo")
    adapter = adapter_for(spec)
    model, processor = adapter.load("cpu", "float32")
    stage_map = detect_stages(model)
    image = __import__("PIL.Image").Image.new("RGB", (32, 32))
    inputs = adapter.encode(processor, [image], [build_prompt(processor, ["a", "b"])], "cpu", torch.float32)
    n = int((inputs["input_ids"] == stage_map.image_token_id).sum())
    read = _reader(stage_map, inputs)
    _check_token_count(model, stage_map, inputs, torch.zeros(1, n, 48), read)  # the right count and width
    with pytest.raises(ConfigError, match=f"emits {n + 1} tokens of width 48, but the language model receives {n}"):
        _check_token_count(model, stage_map, inputs, torch.zeros(1, n + 1, 48), read)
    with pytest.raises(ConfigError, match=f"emits {n} tokens of width 32, .* of width 48"):
        _check_token_count(model, stage_map, inputs, torch.zeros(1, n, 32), read)


def test_the_planted_map_ends_pytest_with_exit_4(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess(
        "--mllm-model=demo", "--mllm-stages=connector=model.language_model.embed_tokens", *RUN
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str() + result.stderr.str()
    result.stderr.fnmatch_lines(["ERROR: *stage map check*not fed by the vision encoder*"])
    assert "passed" not in result.stdout.str() and "failed" not in result.stdout.str()


def test_the_detected_map_of_every_family_passes_the_check() -> None:
    """Checked end to end for every family in tests/test_architectures.py; here on the demo."""
    from pytest_mllmprobe import run

    result = run("demo")["demo"]
    assert result.timings["flow_check_s"] > 0


# -- your own adapter -----------------------------------------------------------------------

ADAPTER = '''
from pytest_mllmprobe import ModelAdapter
from pytest_mllmprobe.demo import DEMO_MODEL


class Named(ModelAdapter):
    stages = {"connector": "model.multi_modal_projector"}


def demo_adapter():
    return Named(str(DEMO_MODEL))


def not_an_adapter():
    return "demo"


def broken():
    raise RuntimeError("weights are on another disk")
'''


def test_module_function_adapter_runs_end_to_end(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(my_models=ADAPTER)
    result = pytester.runpytest_subprocess("--mllm-model=my_models:demo_adapter", f"--mllm-data={DEMO_DATA}", *RUN)
    result.assert_outcomes(passed=18)
    result.stdout.fnmatch_lines(["*demo_adapter (llava, 150 test images*"])


@pytest.mark.parametrize("name, message", [
    ("my_models:not_an_adapter", "not_an_adapter() returned str, not a pytest_mllmprobe.ModelAdapter"),
    ("my_models:broken", "broken() raised RuntimeError: weights are on another disk"),
    ("my_models:missing", "module 'my_models' has no function 'missing'"),
    ("no_such_module:f", "cannot import module 'no_such_module'"),
])
def test_bad_adapters_are_usage_errors(pytester: pytest.Pytester, name: str, message: str) -> None:
    pytester.makepyfile(my_models=ADAPTER)
    result = pytester.runpytest_subprocess(f"--mllm-model={name}", f"--mllm-data={DEMO_DATA}", *RUN)
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str() + result.stderr.str()
    result.stderr.fnmatch_lines([f"ERROR: *{message}*"])
