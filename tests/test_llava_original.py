"""Checkpoints of the original LLaVA code (HuatuoGPT-Vision-34B's layout), converted on load.

The bundled demo written in that layout (flat Llama config + ``mm_*`` keys, ``model.mm_projector``
and ``model.vision_tower.vision_tower`` state-dict names, the tower in ``./vit``) must give the
demo's numbers exactly; what the conversion cannot do is a usage error.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pytest_mllmprobe.demo import DEMO_DATA
from pytest_mllmprobe.errors import ConfigError

from .llava_original import save_llava_original

RUN = ("-p", "no:cacheprovider")


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_llava_original(tmp_path_factory.mktemp("llava-original") / "huatuo-tiny")


def _rewrite(folder: Path, target: Path, **changes: object) -> Path:
    import shutil

    shutil.copytree(folder, target)
    config = json.loads((target / "config.json").read_text())
    config.update(changes)
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_the_original_layout_gives_the_demos_numbers(original: Path) -> None:
    from pytest_mllmprobe import run

    converted = run(str(original), str(DEMO_DATA))["huatuo-tiny"]
    demo = run("demo")["demo"]
    assert converted.stage_map["connector"] == "model.multi_modal_projector"
    assert converted.stage_map["vision_feature_layer"] == -2  # mm_vision_select_layer
    assert converted.stage_map["consumed_vision_layers"] == demo.stage_map["consumed_vision_layers"]
    for name, locus in demo.loci.items():
        assert converted.loci[name].accuracy == locus.accuracy, name
        assert converted.loci[name].auroc == locus.auroc, name


def test_the_weights_are_the_checkpoints_and_every_logit_is_kept(original: Path, tmp_path: Path) -> None:
    """A tokenizer without ``<image>`` (the original code splices at id -200): the token is added
    past the embedding matrix, one embedding row is added, the LM head keeps its rows."""
    import torch
    from safetensors.torch import load_file

    from pytest_mllmprobe.demo.tiny import build_tokenizer
    from pytest_mllmprobe.models.llava_original import load

    # as many tokens as the embedding has rows: <image> falls past the matrix
    plain = build_tokenizer(["zebra"], specials=("<pad>", "<s>", "</s>", "<unk>"), extra_special_tokens={})
    folder = tmp_path / "no-image-token"
    save_llava_original(folder, tokenizer=plain)
    saved = load_file(str(folder / "model.safetensors"))
    model, processor = load(str(folder), torch.float32)
    rows = saved["model.embed_tokens.weight"].shape[0]
    assert model.config.image_token_id == len(plain) == rows == processor.tokenizer.convert_tokens_to_ids("<image>")
    assert model.model.language_model.embed_tokens.weight.shape[0] == rows + 1
    assert torch.equal(model.model.language_model.embed_tokens.weight[:rows], saved["model.embed_tokens.weight"])
    assert torch.equal(model.lm_head.weight, saved["lm_head.weight"])  # no logit added
    assert torch.equal(model.model.multi_modal_projector.linear_2.weight, saved["model.mm_projector.2.weight"])
    tower = "model.vision_tower.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"
    assert torch.equal(model.get_submodule("model.vision_tower").state_dict()["encoder.layers.0.mlp.fc1.weight"],
                       saved[tower])


def test_a_tower_outside_the_checkpoint_is_read_from_mm_vision_tower(tmp_path: Path) -> None:
    import torch

    from pytest_mllmprobe.models.llava_original import load

    inside, _ = load(str(save_llava_original(tmp_path / "inside")), torch.float32)
    outside, _ = load(str(save_llava_original(tmp_path / "outside", tower_inside=False)), torch.float32)
    for (name, a), (_, b) in zip(inside.state_dict().items(), outside.state_dict().items()):
        assert torch.equal(a, b), name


def test_pytest_runs_it_end_to_end(pytester: pytest.Pytester, original: Path) -> None:
    result = pytester.runpytest_subprocess(f"--mllm-model={original}", f"--mllm-data={DEMO_DATA}", *RUN)
    result.assert_outcomes(passed=18)
    result.stdout.fnmatch_lines(["*huatuo-tiny (llava, 150 test images; connector reads vision.2*"])


@pytest.mark.parametrize("changes, message", [
    ({"mm_projector_type": "mlp3x_gelu"}, "mm_projector_type = 'mlp3x_gelu'*mlp2x_gelu*module:function"),
    ({"mm_vision_tower": "./vit/missing"}, "mm_vision_tower = './vit/missing'*neither a folder*"),
    ({"mm_hidden_size": 7}, "mm_hidden_size = 7, but the vision tower*hidden size 32*"),
    ({"mm_vision_select_feature": "cls"}, "mm_vision_select_feature = 'cls'*"),
    ({"model_type": "llava_phi", "architectures": ["LlavaPhiForCausalLM"]}, "model_type 'llava_phi'*own adapter*"),
])
def test_what_the_conversion_cannot_do_is_a_usage_error(
    pytester: pytest.Pytester, original: Path, tmp_path: Path, changes: dict, message: str
) -> None:
    broken = _rewrite(original, tmp_path / "broken", **changes)
    result = pytester.runpytest_subprocess(f"--mllm-model={broken}", f"--mllm-data={DEMO_DATA}", *RUN)
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str() + result.stderr.str()
    result.stderr.fnmatch_lines([f"ERROR: *{message}*"])
    assert "Traceback" not in result.stderr.str()


def test_convert_config_reads_the_original_keys(original: Path) -> None:
    from pytest_mllmprobe.models.llava_original import convert_config

    config = convert_config(str(original))
    assert config.model_type == "llava" and config.text_config.model_type == "llama"
    assert config.vision_feature_layer == -2 and config.vision_feature_select_strategy == "default"
    with pytest.raises(ConfigError, match="mm_vision_select_feature"):
        convert_config(str(original), {**json.loads((original / "config.json").read_text()),
                                       "mm_vision_select_feature": "all"})
