"""Stage detection, hooks and per-image invariance for every supported VLM family.

Each family is a tiny real transformers model built offline (``tests/tiny_families.py``),
saved with ``save_pretrained`` and loaded back with ``AutoModelForImageTextToText``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from pytest_mllmprobe.answer import class_continuations
from pytest_mllmprobe.data import load_image, load_image_folder
from pytest_mllmprobe.errors import ConfigError
from pytest_mllmprobe.extract import extract
from pytest_mllmprobe.models import LoadedModel, ModelSpec, detect_stages, load_model, resolve_model
from pytest_mllmprobe.models.families import segments
from pytest_mllmprobe.models.stages import MASK_POSITION_FAMILIES, NO_VISION_ENCODER
from pytest_mllmprobe.prompts import build_prompt

from .helpers import CLASSES, check_batch_invariance, hooks_left
from .helpers import run_extract as _run
from .tiny_families import AUTO_PROCESSOR_FAMILIES, FAMILIES, save_processor, tiny_family


#: where each family's stages are (paths in the loaded model)
EXPECTED = {
    "qwen2_vl": ("model.visual.blocks", "model.visual.merger", "model.language_model.layers"),
    "qwen2_5_vl": ("model.visual.blocks", "model.visual.merger", "model.language_model.layers"),
    "qwen3_vl": ("model.visual.blocks", "model.visual.merger", "model.language_model.layers"),
    "glm4v": ("model.visual.blocks", "model.visual.merger", "model.language_model.layers"),
    "gemma3": ("model.vision_tower.encoder.layers", "model.multi_modal_projector",
               "model.language_model.layers"),
    "paligemma": ("model.vision_tower.encoder.layers", "model.multi_modal_projector",
                  "model.language_model.layers"),
    "idefics2": ("model.vision_model.encoder.layers", "model.connector", "model.text_model.layers"),
    "idefics3": ("model.vision_model.encoder.layers", "model.connector", "model.text_model.layers"),
    "smolvlm": ("model.vision_model.encoder.layers", "model.connector", "model.text_model.layers"),
    "internvl": ("model.vision_tower.encoder.layer", "model.multi_modal_projector", "model.language_model.layers"),
    "mistral3": ("model.vision_tower.transformer.layers", "model.multi_modal_projector",
                 "model.language_model.layers"),
    "aya_vision": ("model.vision_tower.encoder.layers", "model.multi_modal_projector",
                   "model.language_model.layers"),
    "llava_onevision": ("model.vision_tower.encoder.layers", "model.multi_modal_projector",
                        "model.language_model.layers"),
    "deepseek_vl": ("model.vision_model.encoder.layers", "model.aligner", "model.language_model.layers"),
    "janus": ("model.vision_model.encoder.layers", "model.aligner", "model.language_model.layers"),
    "mllama": ("model.vision_model.transformer.layers", "model.multi_modal_projector",
               "model.language_model.layers"),
    "blip-2": ("vision_model.encoder.layers", "language_projection", "language_model.model.decoder.layers"),
    "instructblip": ("vision_model.encoder.layers", "language_projection", "language_model.model.decoder.layers"),
}


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    family = request.param
    model, processor = tiny_family(family, seed=1)
    path = tmp_path_factory.mktemp(family) / family
    if family in AUTO_PROCESSOR_FAMILIES:
        model.save_pretrained(path)
        save_processor(processor, path)
        loaded = load_model(resolve_model(str(path)), device="cpu", dtype="float32")
    else:  # the weights round-trip; the processor cannot be saved and reloaded here
        model.save_pretrained(path)
        from transformers import AutoModelForImageTextToText

        import torch

        reloaded = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
        loaded = LoadedModel(ModelSpec(family, str(path)), reloaded, processor,
                             torch.device("cpu"), torch.float32)
    return loaded, detect_stages(loaded.model)


@pytest.fixture(scope="module")
def seven_images(lesion_data: Path) -> list:
    """Seven lesion images of different sizes (so images of one batch differ in patch count)."""
    data = load_image_folder(lesion_data)
    picks = [0, 5, 21, 26, 41, 47, 10]
    sizes = [(32, 32), (48, 32), (32, 48), (40, 40), (32, 32), (48, 48), (24, 40)]
    return [load_image(data.paths[i]).resize(size) for i, size in zip(picks, sizes)]


def test_detection_finds_the_family_stages(family_model) -> None:
    loaded, stage_map = family_model
    family = stage_map.family
    vision, connector, llm = EXPECTED[family]
    assert stage_map.vision_layers[0] == f"{vision}.0"
    assert stage_map.connector == connector
    assert stage_map.llm_layers[0] == f"{llm}.0"
    assert stage_map.image_token_id == loaded.model.config.image_token_id
    # InternViT, the BLIP vision model and Mllama's ViT carry a class token; SigLIP, Pixtral and Qwen's do not
    assert stage_map.drop_cls == (family in ("internvl", "blip-2", "instructblip", "mllama"))
    if family == "mllama":  # local then global vision layers; cross-attention decoder
        assert stage_map.vision_layers[2:] == ("model.vision_model.global_transformer.layers.0",)
        assert stage_map.consumed_vision_layers == (0, 1, 2)  # intermediate_layers_indices + the global output
        assert len(stage_map.llm_layers) == 4 and stage_map.llm_entry == 1
        assert stage_map.llm_readouts == ("last",) and "llm.1.image" not in stage_map.loci
    else:
        assert len(stage_map.llm_layers) == 2 and stage_map.llm_entry == 0
        assert stage_map.llm_readouts == ("image", "last")
    if family.startswith("qwen") or family == "glm4v":
        assert family not in MASK_POSITION_FAMILIES  # mrope computes its own positions


def test_detection_is_the_same_on_the_meta_structure(family_model) -> None:
    import torch
    from transformers import AutoModelForImageTextToText

    loaded, stage_map = family_model
    with torch.device("meta"):
        structure = AutoModelForImageTextToText.from_config(loaded.model.config)
    assert detect_stages(structure) == stage_map


def test_every_hook_fires_once_and_pools_per_image(family_model, seven_images) -> None:
    loaded, stage_map = family_model
    prompt = build_prompt(loaded.processor, CLASSES)
    features = _run(loaded, stage_map, seven_images[:3], [prompt] * 3, batch_size=3)
    assert set(features.loci) == set(stage_map.loci) - {"answer"}
    for name, values in features.loci.items():
        assert values.shape[0] == 3 and np.isfinite(values).all(), name
    assert features.answer_scores.shape == (3, 3)
    assert hooks_left(loaded.model) == 0


def test_features_do_not_depend_on_batch_size_position_or_padding(family_model, seven_images) -> None:
    loaded, stage_map = family_model
    check_batch_invariance(loaded, stage_map, seven_images)


def test_images_of_one_batch_are_split_by_their_own_patch_or_tile_counts(family_model, seven_images) -> None:
    import torch

    from pytest_mllmprobe.inputs import prepare_inputs
    from pytest_mllmprobe.models.families import family

    loaded, stage_map = family_model
    prompt = build_prompt(loaded.processor, CLASSES)
    inputs = prepare_inputs(loaded.processor, seven_images[:3], [prompt] * 3, "cpu", torch.float32,
                            nested=family(stage_map.family).nested_images)
    split = segments(stage_map, loaded.model, inputs)
    if split.vision is None and split.vision_mask is not None:  # one row per image, padded tiles (Mllama)
        tokens = split.vision_mask.sum(1).tolist()
        assert len(tokens) == 3 and len(set(tokens)) > 1  # 1, 2 or 4 real tiles of 16 patches
        assert all(n % 16 == 0 for n in tokens)
        assert split.connector_mask.sum(1).tolist() == [n // 16 * 17 for n in tokens]  # + a class token per tile
        return
    if split.vision is None:
        assert family(stage_map.family).segments is None
        pytest.skip("one vision row per image")
    assert len(split.vision) == 3
    if split.vision_mask is not None:  # tiles padded to the batch's largest image (Idefics2)
        real = [int(chunk.sum()) for chunk in torch.split(split.vision_mask.sum(1), list(split.vision))]
        assert len(set(real)) > 1 and not bool(split.vision_mask.all())  # real patches differ per image
    else:
        assert len(set(split.vision)) > 1  # images of different sizes: different tile or patch counts
    pixels = inputs["pixel_values"]
    if stage_map.family == "mistral3":  # padded [images, C, H, W]; image_sizes hold the real sizes
        rows = sum(int(h) * int(w) // 64 for h, w in inputs["image_sizes"].tolist())
    elif pixels.dim() == 5:  # [batch, tiles, C, H, W] padded with all-zero tiles
        rows = int((pixels != 0).flatten(2).any(-1).sum())
    else:
        rows = pixels.shape[0]
    assert sum(split.vision) == rows
    if split.flat:  # one token sequence for the batch: the merger joins m x m patches
        assert sum(split.vision) == sum(split.connector) * 4
        if stage_map.family.startswith("qwen") or stage_map.family == "glm4v":
            assert list(split.connector) == (inputs["input_ids"] == stage_map.image_token_id).sum(1).tolist()
    else:
        assert split.connector == split.vision


def test_cross_attention_layers_are_where_the_image_enters_mllama(seven_images) -> None:
    """Mllama's text stream holds no image tokens: before the first cross-attention layer the
    last-token state does not depend on the image, from it on it does."""
    import torch

    model, processor = tiny_family("mllama", seed=2)
    loaded = LoadedModel(ModelSpec("mllama", "-"), model, processor, torch.device("cpu"), torch.float32)
    stage_map = detect_stages(model)
    prompt = build_prompt(loaded.processor, CLASSES)
    features = _run(loaded, stage_map, seven_images[:3], [prompt] * 3, batch_size=3)
    before, entry = features.loci["llm.0.last"], features.loci[f"llm.{stage_map.llm_entry}.last"]
    np.testing.assert_allclose(before[0], before[1], atol=1e-6)
    assert np.abs(entry[0] - entry[1]).max() > 1e-4


def test_a_model_without_a_vision_encoder_is_a_clear_config_error() -> None:
    import torch
    from transformers import AutoModelForImageTextToText, FuyuConfig

    config = FuyuConfig(text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4))
    with torch.device("meta"):
        fuyu = AutoModelForImageTextToText.from_config(config)
    with pytest.raises(ConfigError) as info:
        detect_stages(fuyu)
    message = str(info.value)
    assert NO_VISION_ENCODER.split("{")[0] in message and "'fuyu'" in message
    assert "--mllm-stages vision=" in message


LLAVA_FAMILIES = ("llava_next", "vipllava")


def test_end_to_end_run_of_every_family_autoprocessor_loads(pytester: pytest.Pytester) -> None:
    """One pytest run probes them all (one torch import instead of one per family)."""
    from pytest_mllmprobe.demo.synth import make_images, write_image_folder

    from pytest_mllmprobe.demo.tiny import save_model, tiny_llava

    models = []
    for family in AUTO_PROCESSOR_FAMILIES:
        model, processor = tiny_family(family, seed=0)
        model.save_pretrained(pytester.path / family)
        save_processor(processor, pytester.path / family)
        models += [f"--mllm-model={pytester.path / family}"]
    for family in LLAVA_FAMILIES:  # the LLaVA builders of the demo (llava itself: tests/test_end_to_end.py)
        save_model(*tiny_llava(family, seed=0), pytester.path / family)
        models += [f"--mllm-model={pytester.path / family}"]
    data = write_image_folder(make_images(10, seed=1), pytester.path / "data")
    junit, report = pytester.path / "junit.xml", pytester.path / "report"
    result = pytester.runpytest_subprocess(*models, f"--mllm-data={data}", "-p", "no:cacheprovider",
                                           f"--junitxml={junit}", f"--mllm-report={report}")
    out = result.stdout.str()
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed", 0) + outcomes.get("failed", 0) > 0, out
    assert "error" not in outcomes and "errors" not in outcomes, out
    assert "Traceback" not in out + result.stderr.str(), out
    # a random model may fail probe rules, never with an exception (ValueError, ExtractionError, ...)
    assert not re.search(r"^FAILED \S+ - \w*(Error|Exception)\b", out, re.MULTILINE), out
    result.stdout.fnmatch_lines(["*mllmprobe: feature health*"])
    for family in (*AUTO_PROCESSOR_FAMILIES, *LLAVA_FAMILIES):
        result.stdout.fnmatch_lines([f"{family} ({family}, * test images*",
                                     "*profile: FHS_V * -> FHS_C * -> FHS_L * -> P_final *",
                                     "*probe tests ran, * failed"])
    import json
    import xml.etree.ElementTree as ET

    tests: dict[str, set[str]] = {}
    for case in ET.parse(junit).iter("testcase"):
        tests.setdefault(case.get("classname"), set()).add(case.get("name"))
    for family in (*AUTO_PROCESSOR_FAMILIES, *LLAVA_FAMILIES):
        names = tests[f"mllm.{family}"]
        assert {"connector", "llm.1.last", "stage.llm", "answer"} <= names, family
        # cross-attention (mllama): no image tokens in the text stream, so no image readout
        assert ("llm.1.image" in names) == (family != "mllama"), family
    results = json.loads((report / "results.json").read_text())
    by_family = {m["stage_map"]["family"]: m for m in results["models"].values()}
    assert set(by_family) == {*AUTO_PROCESSOR_FAMILIES, *LLAVA_FAMILIES}
    assert by_family["mllama"]["stage_map"]["llm_entry"] == 1
    assert "P(llm.1.last)" in json.dumps(by_family["mllama"]["verdicts"])
    assert (report / "index.html").is_file()


def test_a_flat_stage_output_without_per_image_counts_is_an_error() -> None:
    import torch

    from pytest_mllmprobe.extract import ExtractionError, _pool_per_image

    with pytest.raises(ExtractionError, match="models/families.py"):
        _pool_per_image("vision.0", torch.zeros(12, 4), None)
    with pytest.raises(ExtractionError, match="has 12 rows but the batch's images have 10 tokens"):
        _pool_per_image("vision.0", torch.zeros(12, 4), (4, 6), flat=True)
    pooled = _pool_per_image("connector", torch.arange(24.0).reshape(1, 6, 4), (2, 4), flat=True)
    np.testing.assert_allclose(pooled.numpy(), [[2, 3, 4, 5], [14, 15, 16, 17]])


def test_multi_token_class_names_are_scored_in_every_family(family_model, seven_images) -> None:
    """Per-token side inputs (Qwen's mm_token_type_ids) grow with the appended answer tokens."""
    from pytest_mllmprobe.prompts import build_prompt

    loaded, stage_map = family_model
    names = ["benign", "malignant mass"]
    prompt = build_prompt(loaded.processor, names)
    continuations = class_continuations(loaded.processor.tokenizer, prompt, names)
    assert max(len(c) for c in continuations) > 1
    out = extract(
        loaded.model, loaded.processor, stage_map, lambda idx: [seven_images[i] for i in idx],
        [prompt] * 3, continuations, batch_size=3, device=loaded.device, dtype=loaded.dtype,
    )
    assert out.answer_scores.shape == (3, 2) and np.isfinite(out.answer_scores).all()


#: class names of one, two and three tokens under the word-level tokenizers ("-" is its own token)
MIXED_NAMES = ["normal", "benign cyst", "malignant mass", "covid-positive"]


def test_multi_token_names_continue_the_prompt_cache_with_the_same_scores(family_model, seven_images,
                                                                          monkeypatch) -> None:
    """Names of 2-3 tokens continue the extraction forward's KV cache (one pass per name, rewound
    after each, no image inputs): the scores equal one full forward per class, under left padding."""
    import torch

    import contextlib

    from pytest_mllmprobe import answer as answer_module
    from pytest_mllmprobe.answer import NO_CACHE_CONTINUATION, scores_by_continuation
    from pytest_mllmprobe.extract import AnswerScoringWarning
    from pytest_mllmprobe.models.adapter import ModelAdapter
    from pytest_mllmprobe.prompts import build_prompt

    from .helpers import LONG, SHORT

    loaded, stage_map = family_model
    prompts = [build_prompt(loaded.processor, MIXED_NAMES, LONG if i % 2 else SHORT) for i in range(3)]
    continuations = class_continuations(loaded.processor.tokenizer, prompts[0], MIXED_NAMES)
    assert sorted({len(c) for c in continuations}) == [1, 2, 3]
    assert class_continuations(loaded.processor.tokenizer, prompts[1], MIXED_NAMES) == continuations
    images = seven_images[:3]
    calls: list[dict] = []
    handle = loaded.model.register_forward_hook(
        lambda module, args, kwargs, output: calls.append(kwargs), with_kwargs=True)
    slow = stage_map.family in NO_CACHE_CONTINUATION
    taken: list[tuple[int, ...]] = []  # what the prompt's forward wrote into the one-block cache (_Arena)
    original_take = answer_module._Arena.take
    monkeypatch.setattr(answer_module._Arena, "take",
                        lambda self, states, room: taken.append(tuple(states.shape)) or original_take(self, states, room))
    layers: list[tuple[list[str], int]] = []  # per batch: the cache's layer kinds, and how many had room made
    original_done = answer_module._Rewind.prompt_done

    def prompt_done(self) -> None:
        layers.append(([type(layer).__name__ for layer in self.cache.layers],
                       sum(slots.arena is not None for slots in self.slots)))
        original_done(self)

    monkeypatch.setattr(answer_module._Rewind, "prompt_done", prompt_done)
    try:  # the slow path says so
        with pytest.warns(AnswerScoringWarning, match=stage_map.family) if slow else contextlib.nullcontext():
            ours = extract(loaded.model, loaded.processor, stage_map, lambda idx: [images[i] for i in idx], prompts,
                           continuations, batch_size=3, device=loaded.device, dtype=loaded.dtype,
                           adapter=getattr(loaded, "adapter", None))
    finally:
        handle.remove()
    # the room for the names was made before the prompt's forward, in one block: keys and values
    # of every full-attention layer of the cache (sliding-window ones are rewound as they are)
    if slow:
        assert taken == [] and layers == []
    else:
        [(kinds, arena_slots)] = layers  # one batch
        full = kinds.count("DynamicLayer")
        assert full == arena_slots and len(taken) == 2 * full and all(shape[0] == 3 for shape in taken), (kinds, taken)
        assert full > 0 or set(kinds) == {"DynamicSlidingWindowLayer"}, kinds
    adapter = getattr(loaded, "adapter", None) or ModelAdapter()
    inputs = adapter.encode(loaded.processor, images, prompts, loaded.device, loaded.dtype, "left",
                            family_name=stage_map.family)
    assert inputs["attention_mask"].shape[1] > int(inputs["attention_mask"].sum(1).min())  # really padded
    with torch.inference_mode():
        reference = scores_by_continuation(loaded.model, inputs, continuations,
                                           adapter.positions(inputs, family_name=stage_map.family))
    np.testing.assert_allclose(ours.answer_scores, reference.numpy(), rtol=1e-4, atol=1e-5)
    if slow:
        # today's path: every forward runs the image again, one per multi-token class
        assert len(calls) > sum(len(c) > 1 for c in continuations) and all("pixel_values" in c for c in calls)
    else:  # the extraction forward, then one continuation of its cache per multi-token name, without the image
        fed = [len(c) - 1 for c in continuations if len(c) > 1]
        assert [tuple(c["input_ids"].shape) for c in calls[1:]] == [(3, n) for n in fed]
        assert "pixel_values" in calls[0] and not any("pixel" in key for c in calls[1:] for key in c)
