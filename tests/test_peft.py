"""PEFT adapters as models, gated against their own base (issue 16).

Every adapter here is a real one: ``get_peft_model(base, LoraConfig(...))`` saved by peft, over a
tiny base saved with ``save_pretrained`` (the demo LLaVA, and Qwen2-VL from tests/tiny_families.py).
Known answers come from what the adapter touches: a LoRA on the language model leaves the vision
and connector features bit-identical; a LoRA that collapses the projector is the root cause.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch  # noqa: F401  imported before any pytester test: pytester drops modules first imported inside one

from pytest_mllmprobe import run
from pytest_mllmprobe.engine import ModelRun, plan
from pytest_mllmprobe.models.peft_adapter import EXTRA_HINT, SUPPORTED_TEXT
from pytest_mllmprobe.settings import Settings

from .peft_adapters import LLM_ATTENTION, collapse_connector, merge_by_hand, save_adapter, save_base

RUN = ("-p", "no:cacheprovider")
UPSTREAM = ("vision", "connector")


@pytest.fixture(scope="module")
def llava_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_base(tmp_path_factory.mktemp("bases") / "lesion-base")


@pytest.fixture(scope="module")
def qwen_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_base(tmp_path_factory.mktemp("bases") / "qwen-base", "qwen2_vl")


@pytest.fixture(scope="module")
def lesions300(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 fresh synthetic images (every one a paired test image), as tests/test_gating.py uses."""
    from pytest_mllmprobe.demo.synth import make_images, write_image_folder

    return write_image_folder(make_images(100, seed=99), tmp_path_factory.mktemp("lesions300"))


def features(models: list[str], data: Path, **options: object) -> dict[str, object]:
    """Each model's extracted features (no cache), through the engine's own steps."""
    the_plan = plan(Settings(models=tuple(models), data=str(data), **options))
    return {m.spec.label: ModelRun(the_plan, m).compute() for m in the_plan.models}


# -- (a) a LoRA on the language model only ------------------------------------------------------
@pytest.mark.parametrize("family, lora", [
    ("llava", {"use_dora": True}),
    ("qwen2_vl", {"use_rslora": True, "lora_alpha": 16}),
])
def test_a_language_model_lora_leaves_vision_and_connector_bit_identical(
    request: pytest.FixtureRequest, tmp_path: Path, lesion_data: Path, family: str, lora: dict
) -> None:
    base = request.getfixturevalue("llava_base" if family == "llava" else "qwen_base")
    adapter = save_adapter(tmp_path / f"{family}-lora", base, target_modules=LLM_ATTENTION, r=4,
                           init_lora_weights=False, **lora)
    results = run([str(adapter)], str(lesion_data), compare_to="base")
    tuned = results[adapter.name]
    n_layers = len(tuned.stage_map["llm_layers"])
    assert tuned.changes["changed"] == ["llm"]
    assert tuned.changes["unchanged"] == ["vision", "connector", "answer"]
    assert tuned.changes["stages"]["llm"]["lora_modules"] == 2 * n_layers  # q_proj and v_proj per layer
    assert tuned.changes["text"].startswith(f"changed: llm ({2 * n_layers} LoRA modules); unchanged: vision")
    assert tuned.comparison["against"] == f"base model {base.name!r}" and tuned.comparison["contradictions"] == []
    assert tuned.stage_map == results[base.name].stage_map  # found on the merged model as on the base
    # the report marks the stages the adapter left alone
    from pytest_mllmprobe.report.layout import curve_of
    from pytest_mllmprobe.report.page import changes_paragraph

    model = results.to_dict()["models"][adapter.name]
    assert curve_of(model).unchanged == ("vision", "connector", "answer")
    assert f"weights: changed: llm ({2 * n_layers} LoRA modules)" in changes_paragraph(model)

    found = features([str(adapter), str(base)], lesion_data)
    ours, theirs = found[adapter.name], found[base.name]
    for name in ours.loci:
        if name.split(".")[0] in UPSTREAM:
            assert np.array_equal(ours.loci[name], theirs.loci[name]), name
    last = f"llm.{n_layers - 1}.last"
    assert not np.allclose(ours.loci[last], theirs.loci[last])  # the adapter did change the LLM


# -- (b) a planted LoRA that collapses the connector --------------------------------------------
def test_compare_to_base_names_a_collapsed_connector_as_root_cause(
    pytester: pytest.Pytester, llava_base: Path, lesions300: Path, tmp_path: Path
) -> None:
    """``pytest --mllm-model ./lingshu-busi-lora --mllm-data ./busi --mllm-compare-to base``."""
    adapter = save_adapter(tmp_path / "lingshu-busi-lora", llava_base, collapse_connector,
                           target_modules=["linear_2"], r=48, lora_alpha=48)
    report = tmp_path / "report"
    result = pytester.runpytest_subprocess(
        f"--mllm-model={adapter}", f"--mllm-data={lesions300}", "--mllm-compare-to=base",
        f"--mllm-report={report}", *RUN,
    )
    outcomes = result.parseoutcomes()
    assert outcomes["failed"] >= 1 and outcomes["passed"] >= 18, result.stdout.str()
    result.stdout.fnmatch_lines([
        "*lingshu-busi-lora (llava, 300 test images*",
        "*root cause of the regression vs base model 'lesion-base': connector*",
        "*changed: connector (1 LoRA module); unchanged: vision, llm, answer (vs its base*lesion-base)",
        "*lesion-base (llava, 300 test images*",
    ])
    assert "contradiction" not in result.stdout.str()
    doc = json.loads((report / "results.json").read_text())
    tuned = doc["models"]["lingshu-busi-lora"]
    assert tuned["comparison"]["regressed_stages"][0] == "connector"
    assert tuned["changed_stages"]["changed"] == ["connector"]
    assert doc["models"]["lesion-base"]["comparison"] is None


def test_the_base_is_read_once_for_both(llava_base: Path, lesion_data: Path, tmp_path: Path) -> None:
    from pytest_mllmprobe.engine import Evaluator

    adapter = save_adapter(tmp_path / "lora", llava_base, target_modules=LLM_ATTENTION, r=2)
    evaluator = Evaluator(plan(Settings(models=(str(adapter),), data=str(lesion_data), compare_to="base")))
    assert [m.spec.label for m in evaluator.plan.models] == ["lora", "lesion-base"]
    evaluator.result("lora")
    assert evaluator.model_plan("lora").adapter.reused_base
    # given explicitly, the base is not added twice
    both = plan(Settings(models=(str(adapter), str(llava_base)), data=str(lesion_data), compare_to="base"))
    assert [m.spec.label for m in both.models] == ["lora", "lesion-base"] and both.references == {"lora": "lesion-base"}


# -- (c) merged and saved by hand gives the same numbers ----------------------------------------
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_an_adapter_gives_the_numbers_of_the_same_model_merged_by_hand(
    request: pytest.FixtureRequest, tmp_path: Path, lesion_data: Path, family: str
) -> None:
    """LoRA (DoRA) on the vision tower, the connector and the language model, the connector's output
    layer trained whole (``modules_to_save``)."""
    base = request.getfixturevalue("llava_base" if family == "llava" else "qwen_base")
    targets = {"llava": ["fc1", "linear_1", "q_proj"], "qwen2_vl": ["fc1", "mlp.0", "q_proj"]}[family]
    saved = {"llava": ["linear_2"], "qwen2_vl": ["mlp.2"]}[family]
    adapter = save_adapter(tmp_path / "adapter", base, target_modules=targets, modules_to_save=saved, r=4,
                           use_dora=True, init_lora_weights=False)
    merged = merge_by_hand(adapter, base, tmp_path / "merged")
    found = features([str(adapter), str(merged)], lesion_data)
    for name, reference in found["merged"].loci.items():
        np.testing.assert_allclose(found["adapter"].loci[name], reference, rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(found["adapter"].answer_scores, found["merged"].answer_scores, rtol=1e-5, atol=1e-6)
    results = run([str(adapter), str(merged)], str(lesion_data))
    for name, locus in results["merged"].loci.items():
        assert results["adapter"].loci[name].accuracy == locus.accuracy, name
    changes = results["adapter"].changes
    assert changes["changed"] == ["vision", "connector", "llm"] and changes["unchanged"] == ["answer"]
    assert changes["stages"]["connector"] == {"changed": True, "lora_modules": 1, "saved_modules": 1}


# -- the other two user commands -----------------------------------------------------------------
@pytest.mark.parametrize("how", ["option", "ini"])
def test_a_base_not_where_the_adapter_says_is_given_with_base_model(
    pytester: pytest.Pytester, llava_base: Path, lesion_data: Path, tmp_path: Path, how: str
) -> None:
    """``pytest --mllm-model ./lora --mllm-base-model ./local-base --mllm-data ./busi``."""
    adapter = save_adapter(tmp_path / "lora", llava_base, target_modules=LLM_ATTENTION, r=2)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "lingshu-medical/Lingshu-7B"  # not in the local cache
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    local = shutil.copytree(llava_base, pytester.path / "local-base")
    args = [f"--mllm-model={adapter}", f"--mllm-data={lesion_data}", *RUN]
    missing = pytester.runpytest_subprocess(*args)
    assert missing.ret == pytest.ExitCode.USAGE_ERROR
    missing.stderr.fnmatch_lines(["ERROR: *base model was not found: adapter_config.json key "
                                  "base_model_name_or_path = 'lingshu-medical/Lingshu-7B'*--mllm-base-model*"])
    if how == "option":
        result = pytester.runpytest_subprocess(*args, "--mllm-base-model=./local-base")
    else:
        pytester.makeini("[pytest]\nmllm_base_model = local-base\n")
        result = pytester.runpytest_subprocess(*args)
    result.assert_outcomes(passed=18)
    result.stdout.fnmatch_lines([f"*changed: llm (8 LoRA modules); unchanged: vision, connector, answer (vs its base {local})"])


def _parquet_of(folder: Path, target: Path) -> Path:
    """An image folder as a Hugging Face parquet file (PNG bytes, a ClassLabel), written by datasets."""
    datasets = pytest.importorskip("datasets")
    names = sorted(p.name for p in folder.iterdir() if p.is_dir())
    files = sorted(folder.rglob("*.png"))
    table = datasets.Dataset.from_dict(
        {"image": [{"bytes": f.read_bytes(), "path": f.name} for f in files],
         "label": [names.index(f.parent.name) for f in files]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)}),
    )
    table.to_parquet(str(target))
    return target


def test_a_trainer_checkpoint_with_sharded_weights_loads_as_it_is(
    pytester: pytest.Pytester, lesion_data: Path
) -> None:
    """``pytest --mllm-model ./full-finetune/checkpoint-1200 --mllm-data ./busi.parquet``: sharded
    safetensors with their index, and the Trainer's files beside them; the data a parquet file."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from pytest_mllmprobe.demo import DEMO_MODEL

    folder = pytester.path / "full-finetune" / "checkpoint-1200"
    AutoModelForImageTextToText.from_pretrained(DEMO_MODEL).save_pretrained(folder, max_shard_size="100KB")
    AutoProcessor.from_pretrained(DEMO_MODEL).save_pretrained(folder)
    torch.save({"state": {}, "param_groups": []}, folder / "optimizer.pt")
    torch.save({"last_epoch": 1200}, folder / "scheduler.pt")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 1200}))
    assert len(list(folder.glob("model-*.safetensors"))) > 3 and (folder / "model.safetensors.index.json").is_file()
    busi = _parquet_of(lesion_data, pytester.path / "busi.parquet")  # the issue's ./busi.parquet
    result = pytester.runpytest_subprocess("--mllm-model=full-finetune/checkpoint-1200", f"--mllm-data={busi}",
                                           "--mllm-model=demo", "--mllm-compare-to=demo", *RUN)
    result.assert_outcomes(passed=36)
    result.stdout.fnmatch_lines([
        "*checkpoint-1200 (llava, 60 test images*",
        "*no regression vs model 'demo'*",
        "*changed: nothing; unchanged: vision, connector, llm, answer (vs model 'demo')",
    ])


def test_a_full_finetune_is_told_what_changed_from_its_weights(tmp_path: Path, lesion_data: Path) -> None:
    from .faults import build_faulty

    tuned = build_faulty("rank1-connector", tmp_path)
    results = run(["demo", str(tuned)], str(lesion_data), compare_to="demo")
    changes = results["rank1-connector"].changes
    assert changes["source"] == "weights" and changes["changed"] == ["connector"]
    assert changes["stages"]["connector"]["tensors"] == 1  # linear_2.weight; its bias is unchanged
    assert changes["stages"]["vision"]["fingerprint"]  # one hash per stage
    assert results["demo"].changes is None


def test_a_regression_where_nothing_changed_is_a_contradiction() -> None:
    from pytest_mllmprobe.models.changes import adapter_changes, contradictions

    roots = {"vision": "model.vision_tower", "connector": "model.multi_modal_projector",
             "llm": "model.language_model", "answer": "lm_head"}
    record = adapter_changes({"model.language_model.layers.0.self_attn.q_proj": "lora"}, roots)
    assert contradictions(record, ["connector", "llm"]) == ["connector"]
    assert contradictions(record, ["llm", "answer"]) == []  # the answer inherits the LLM's change
    head = adapter_changes({"lm_head": "saved"}, roots)
    assert contradictions(head, ["llm"]) == ["llm"] and contradictions(head, ["answer"]) == []


def test_the_feature_cache_key_holds_the_adapter_weights(llava_base: Path, lesion_data: Path, tmp_path: Path) -> None:
    from pytest_mllmprobe.cache import extraction_key

    adapter = save_adapter(tmp_path / "lora", llava_base, target_modules=LLM_ATTENTION, r=2, init_lora_weights=False)

    def key() -> str:
        the_plan = plan(Settings(models=(str(adapter),), data=str(lesion_data)))
        return extraction_key(the_plan, the_plan.models[0])[0]

    first = key()
    assert key() == first
    save_adapter(tmp_path / "other", llava_base, target_modules=LLM_ATTENTION, r=2, init_lora_weights=False,
                 lora_dropout=0.1)
    shutil.copy(tmp_path / "other" / "adapter_model.safetensors", adapter / "adapter_model.safetensors")
    import torch
    from safetensors.torch import load_file, save_file

    weights = load_file(str(adapter / "adapter_model.safetensors"))
    name = next(k for k in weights if "lora_B" in k)
    weights[name] = weights[name] + torch.ones_like(weights[name])
    save_file(weights, str(adapter / "adapter_model.safetensors"))
    assert key() != first


# -- bad input: a usage error (exit 4) with its message ------------------------------------------
def _vocab_adapter(base: Path, target: Path) -> Path:
    """An adapter trained after adding tokens: its saved LM head has 80 rows, the base's 75."""
    from peft import LoraConfig, get_peft_model

    from .peft_adapters import load_base

    model = load_base(base)
    model.resize_token_embeddings(80)
    get_peft_model(model, LoraConfig(r=2, target_modules=LLM_ATTENTION, modules_to_save=["lm_head"])).save_pretrained(target)
    return target


@pytest.mark.parametrize("case", ["base-missing", "architecture", "vocabulary", "tokenizer", "no-peft", "peft-type",
                                  "optimizer-only"])
def test_bad_adapters_are_usage_errors(
    pytester: pytest.Pytester, llava_base: Path, qwen_base: Path, lesion_data: Path, tmp_path: Path, case: str
) -> None:
    adapter = tmp_path / "adapter"
    extra: list[str] = []
    if case == "architecture":
        save_adapter(adapter, qwen_base, target_modules=["qkv"], r=2)
        extra.append(f"--mllm-base-model={llava_base}")
        message = f"*adapter was made for another architecture: its base '{llava_base}' (llava) has no module " \
                  "'model.visual.blocks.0.attn.qkv' (and 1 more)*--mllm-base-model*"
    elif case == "vocabulary":
        _vocab_adapter(llava_base, adapter)
        message = "*adapter was made for another vocabulary size: lm_head.weight has shape ?80, 48? in the adapter, " \
                  "but ?75, 48? in the base*vocabulary size 75*"
    else:
        save_adapter(adapter, llava_base, target_modules=LLM_ATTENTION, r=2)
    if case == "tokenizer":  # tokens added for training, the embeddings not saved with the adapter
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(llava_base)
        tokenizer.add_tokens(["<lesion>", "<margin>", "<echo>", "<shadow>", "<halo>", "<cyst>"])
        tokenizer.save_pretrained(adapter)
        message = "*adapter was made for another vocabulary size: its tokenizer.json has token ids up to 80, " \
                  "but the base*has vocabulary size 75*modules_to_save*"
    if case == "base-missing":
        config = json.loads((adapter / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = str(tmp_path / "gone")
        (adapter / "adapter_config.json").write_text(json.dumps(config))
        message = f"*base model was not found: adapter_config.json key base_model_name_or_path = '{tmp_path / 'gone'}'" \
                  "*--mllm-base-model PATH*"
    elif case == "no-peft":
        pytester.makeconftest("import sys\nsys.modules['peft'] = None  # as if peft were not installed\n")
        message = f"*is a PEFT adapter (adapter_config.json), which needs the peft package: {EXTRA_HINT.replace('[', '[[]')}"
    elif case == "peft-type":
        config = json.loads((adapter / "adapter_config.json").read_text())
        config["peft_type"] = "IA3"
        (adapter / "adapter_config.json").write_text(json.dumps(config))
        message = f"*adapter_config.json key peft_type = 'IA3' is not supported; supported: {SUPPORTED_TEXT}*"
    elif case == "optimizer-only":
        adapter = tmp_path / "checkpoint-600"
        adapter.mkdir()
        (adapter / "optimizer.pt").write_bytes(b"\0" * 16)
        (adapter / "trainer_state.json").write_text("{}")
        message = "*holds training state only (optimizer.pt, trainer_state.json), no model*checkpoint-N*"
    result = pytester.runpytest_subprocess(f"--mllm-model={adapter}", f"--mllm-data={lesion_data}", *extra, *RUN)
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str() + result.stderr.str()
    result.stderr.fnmatch_lines([f"ERROR: {message}"])
    assert "Traceback" not in result.stderr.str()


def test_compare_to_base_without_an_adapter_is_a_usage_error(lesion_data: Path) -> None:
    from pytest_mllmprobe.errors import ConfigError

    with pytest.raises(ConfigError, match="--mllm-compare-to base compares PEFT adapters.*no model of this run is one"):
        plan(Settings(models=("demo",), data=str(lesion_data), compare_to="base"))


def test_a_hub_base_is_read_from_the_local_cache(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, llava_base: Path, lesion_data: Path, tmp_path: Path
) -> None:
    """``base_model_name_or_path`` a hub id, offline: the snapshot in the Hugging Face cache is used."""
    hub = tmp_path / "hub"
    repo = hub / "models--lesion-lab--tiny-base"
    shutil.copytree(llava_base, repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    adapter = save_adapter(tmp_path / "busi-lora", llava_base, target_modules=LLM_ATTENTION, r=2)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "lesion-lab/tiny-base"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    result = pytester.runpytest_subprocess(f"--mllm-model={adapter}", f"--mllm-data={lesion_data}",
                                           "--mllm-compare-to=base", *RUN)
    result.assert_outcomes(passed=36)
    result.stdout.fnmatch_lines(["*no regression vs base model 'tiny-base'*",
                                 "*changed: llm (8 LoRA modules)*(vs its base lesion-lab/tiny-base)"])


def test_the_processor_comes_from_the_adapter_folder_when_it_has_one(llava_base: Path, tmp_path: Path) -> None:
    from transformers import AutoProcessor

    from pytest_mllmprobe.models import ModelSpec, adapter_for

    adapter = save_adapter(tmp_path / "lora", llava_base, target_modules=LLM_ATTENTION, r=2)
    _, processor = adapter_for(ModelSpec("lora", str(adapter))).load("cpu", "float32")
    assert processor.chat_template == AutoProcessor.from_pretrained(llava_base).chat_template  # the base's
    own = AutoProcessor.from_pretrained(llava_base)
    own.chat_template = "{% for m in messages %}ADAPTER {{ m['content'][0]['type'] }}{% endfor %}"
    own.save_pretrained(adapter)
    _, processor = adapter_for(ModelSpec("lora", str(adapter))).load("cpu", "float32")
    assert processor.chat_template.startswith("{% for m in messages %}ADAPTER")
