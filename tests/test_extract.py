"""Extraction: one forward per batch, pooled readouts, per-image invariance, hooks cleaned up."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pytest_mllmprobe.answer import class_continuations
from pytest_mllmprobe.data import load_image, load_image_folder
from pytest_mllmprobe.errors import ConfigError
from pytest_mllmprobe.extract import ExtractionError, PoolingHooks, extract
from pytest_mllmprobe.models import detect_stages, load_model, resolve_model
from pytest_mllmprobe.prompts import build_prompt

from .helpers import CLASSES, check_batch_invariance, hooks_left
from .helpers import run_extract as _run


@pytest.fixture(scope="module")
def seven_images(lesion_data: Path) -> list:
    data = load_image_folder(lesion_data)
    picks = [0, 5, 21, 26, 41, 47, 10]
    return [load_image(data.paths[i]) for i in picks]


@pytest.fixture(scope="module", params=["llava", "llava_next", "vipllava"])
def family_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    from pytest_mllmprobe.demo.tiny import save_model, tiny_llava

    model, processor = tiny_llava(request.param, seed=1)
    path = save_model(model, processor, tmp_path_factory.mktemp(request.param) / request.param)
    loaded = load_model(resolve_model(str(path)), device="cpu", dtype="float32")
    return loaded, detect_stages(loaded.model)


def test_detection_finds_every_stage_and_the_consumed_layer(family_model) -> None:
    loaded, stage_map = family_model
    assert len(stage_map.vision_layers) == 3
    assert len(stage_map.llm_layers) == 4
    assert stage_map.connector.endswith("multi_modal_projector")
    assert stage_map.drop_cls  # CLIP has a class token
    feature_layer = loaded.model.config.vision_feature_layer if stage_map.family != "vipllava" \
        else loaded.model.config.vision_feature_layers
    layers = feature_layer if isinstance(feature_layer, list) else [feature_layer]
    expected = sorted({3 + i if i < 0 else i - 1 for i in layers})
    assert list(stage_map.consumed_vision_layers) == expected


def test_features_do_not_depend_on_batch_size_position_or_padding(family_model, seven_images) -> None:
    loaded, stage_map = family_model
    check_batch_invariance(loaded, stage_map, seven_images)  # llm.3.last: the last layer of 4
    assert hooks_left(loaded.model) == 0


def test_readouts_match_a_reference_computed_from_hidden_states(family_model, seven_images) -> None:
    import torch

    loaded, stage_map = family_model
    if stage_map.family != "llava":
        pytest.skip("reference pooling written for plain llava (one tile per image)")
    prompt = build_prompt(loaded.processor, CLASSES)
    ours = _run(loaded, stage_map, seven_images[:2], [prompt] * 2, batch_size=2)
    batch = loaded.processor(images=seven_images[:2], text=[prompt] * 2, return_tensors="pt")
    with torch.inference_mode():
        out = loaded.model(**batch, output_hidden_states=True)
        vision = loaded.model.model.vision_tower(batch["pixel_values"], output_hidden_states=True)
    image = batch["input_ids"] == stage_map.image_token_id
    for i in range(len(stage_map.vision_layers)):
        expected = vision.hidden_states[i + 1][:, 1:].mean(1).numpy()
        np.testing.assert_allclose(ours.loci[f"vision.{i}"], expected, rtol=1e-4, atol=1e-5)
    n_llm = len(stage_map.llm_layers)
    for i in range(n_llm - 1):  # transformers' last hidden state is after the final norm
        hidden = out.hidden_states[i + 1]
        np.testing.assert_allclose(ours.loci[f"llm.{i}.last"], hidden[:, -1].numpy(), rtol=1e-4, atol=1e-5)
        expected = torch.stack([hidden[b][image[b]].mean(0) for b in range(2)]).numpy()
        np.testing.assert_allclose(ours.loci[f"llm.{i}.image"], expected, rtol=1e-4, atol=1e-5)
    with torch.inference_mode():
        normed = loaded.model.model.language_model.norm(torch.from_numpy(ours.loci[f"llm.{n_llm - 1}.last"]))
    np.testing.assert_allclose(normed.numpy(), out.hidden_states[-1][:, -1].numpy(), rtol=1e-4, atol=1e-5)
    names = class_continuations(loaded.processor.tokenizer, prompt, CLASSES)
    logp = torch.log_softmax(out.logits[:, -1], -1)[:, [n[0] for n in names]].numpy()
    np.testing.assert_allclose(ours.answer_scores, logp, rtol=1e-4, atol=1e-5)


def test_multi_token_names_are_scored_as_whole_sequences(family_model, seven_images) -> None:
    loaded, stage_map = family_model
    prompt = build_prompt(loaded.processor, ["benign", "malignant mass"])
    scores = _run(loaded, stage_map, seven_images[:3], [prompt] * 3, batch_size=3,
                  names=["benign", "malignant mass"]).answer_scores
    single = _run(loaded, stage_map, seven_images[:3], [prompt] * 3, batch_size=3,
                  names=["benign", "malignant"]).answer_scores
    # the single-token score equals the first column; the two-token one is a mean of two log-probs
    np.testing.assert_allclose(scores[:, 0], single[:, 0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(scores[:, 1], single[:, 1])


def test_only_multi_token_names_build_a_kv_cache_and_continue_it(family_model, seven_images) -> None:
    # single-token names: nothing reads the cache, and building one costs every layer's keys and
    # values; multi-token names: the extraction forward's cache is continued, one class at a time
    from pytest_mllmprobe.answer import cache_of

    loaded, stage_map = family_model
    seen: list[object] = []

    def spy(module, args, kwargs, output):
        seen.append((kwargs.get("use_cache", "absent"), cache_of(output) is not None, "pixel_values" in kwargs))

    handle = loaded.model.register_forward_hook(spy, with_kwargs=True)
    try:
        for names in (["benign", "malignant"], ["benign", "malignant mass", "benign cyst"]):
            prompt = build_prompt(loaded.processor, names)
            _run(loaded, stage_map, seven_images[:2], [prompt] * 2, batch_size=2, names=names)
    finally:
        handle.remove()
    # one forward for single-token names; for multi-token ones the extraction forward (building
    # the cache) and one continuation of it per multi-token class, without the image
    assert seen == [(False, False, True), (True, True, True), ("absent", True, False), ("absent", True, False)]


def test_the_continued_cache_is_freed_with_its_batch(family_model, seven_images, monkeypatch) -> None:
    # the cache lives for one batch: once the batch is scored, nothing holds its layers (their
    # keys and values, grown for the continuation) alive, not even a reference cycle
    import gc
    import weakref

    from pytest_mllmprobe import extract as extract_module
    from pytest_mllmprobe.answer import cache_of

    loaded, stage_map = family_model
    refs: list[weakref.ref] = []

    def kept(output):
        cache = cache_of(output)
        refs.extend(weakref.ref(item) for item in [cache, *cache.layers])
        return cache

    monkeypatch.setattr(extract_module, "cache_of", kept)
    names = ["benign", "malignant mass", "benign cyst"]
    prompt = build_prompt(loaded.processor, names)
    gc.collect()
    gc.disable()
    try:
        _run(loaded, stage_map, seven_images[:4], [prompt] * 4, batch_size=2, names=names)
        assert len(refs) > 2 and all(ref() is None for ref in refs)
    finally:
        gc.enable()


def test_no_cache_is_only_passed_to_a_forward_that_takes_it() -> None:
    from pytest_mllmprobe.inputs import no_cache

    class Strict:
        def forward(self, input_ids, attention_mask=None):
            return None

    class Named:
        def forward(self, input_ids, use_cache=None, **kwargs):
            return None

    class Remote:  # remote code: **kwargs handed on to a submodule that may reject use_cache
        def forward(self, input_ids, **kwargs):
            return None

    class Transformers:  # transformers' own classes take **kwargs and route use_cache
        def forward(self, input_ids, **kwargs):
            return None

    Transformers.__module__ = "transformers.models.fake.modeling_fake"
    assert no_cache(Strict()) == {}
    assert no_cache(Named()) == {"use_cache": False}
    assert no_cache(Remote()) == {}
    assert no_cache(Transformers()) == {"use_cache": False}
    # decided from the class: an instance whose forward is wrapped (accelerate's device hooks
    # replace it with a ``(*args, **kwargs)`` function) gets the same answer
    class Plain:
        def forward(self, input_ids):
            return None

    wrapped = Plain()
    wrapped.forward = lambda *args, **kwargs: None
    assert no_cache(wrapped) == {}


def test_hooks_are_removed_when_a_forward_fails(family_model) -> None:
    loaded, stage_map = family_model

    def broken_images(index):
        raise OSError("disk on fire")

    with pytest.raises(OSError, match="disk on fire"):
        extract(loaded.model, loaded.processor, stage_map, broken_images, ["x"], [[1]],
                batch_size=1, device=loaded.device, dtype=loaded.dtype)
    assert hooks_left(loaded.model) == 0


def test_a_wrong_module_path_removes_the_hooks_already_placed(family_model) -> None:
    from dataclasses import replace

    loaded, stage_map = family_model
    bad = replace(stage_map, connector="model.no_such_projector")
    with pytest.raises(ConfigError, match="no_such_projector"):
        with PoolingHooks(loaded.model, bad):
            pass
    assert hooks_left(loaded.model) == 0


def test_a_hook_that_never_fires_is_reported(family_model, seven_images) -> None:
    from dataclasses import replace

    import torch

    loaded, stage_map = family_model
    # a module the forward never calls stands in for a wrongly detected stage
    loaded.model.add_module("unused_block", torch.nn.Linear(2, 2))
    try:
        bad = replace(stage_map, connector="unused_block")
        prompt = build_prompt(loaded.processor, CLASSES)
        with pytest.raises(ExtractionError, match="did not fire during the forward pass: connector"):
            _run(loaded, bad, seven_images[:1], [prompt], batch_size=1)
    finally:
        del loaded.model.unused_block
    assert hooks_left(loaded.model) == 0


def test_cache_continuation_scores_equal_one_forward_per_class(family_model, seven_images) -> None:
    """The extraction and the variant scoring (``score_answers``) continue the prompt's cache;
    both equal one full forward per class (padded prompts of two lengths, 1-3 token names)."""
    import torch

    from pytest_mllmprobe.answer import score_answers, scores_by_continuation
    from pytest_mllmprobe.models.adapter import ModelAdapter

    from .helpers import LONG, SHORT

    loaded, stage_map = family_model
    names = ["normal", "benign cyst", "covid-positive"]
    prompts = [build_prompt(loaded.processor, names, LONG if i % 2 else SHORT) for i in range(3)]
    continuations = class_continuations(loaded.processor.tokenizer, prompts[0], names)
    assert [len(c) for c in continuations] == [1, 2, 3]
    images = seven_images[:3]
    adapter = ModelAdapter()
    inputs = adapter.encode(loaded.processor, images, prompts, loaded.device, loaded.dtype, "left",
                            family_name=stage_map.family)
    with torch.inference_mode():
        reference = scores_by_continuation(loaded.model, inputs, continuations,
                                           adapter.positions(inputs, family_name=stage_map.family)).numpy()
    extracted = _run(loaded, stage_map, images, prompts, batch_size=3, names=names).answer_scores
    variant = score_answers(loaded.model, loaded.processor, adapter, stage_map.family,
                            lambda idx: [images[i] for i in idx],
                            prompts, continuations, batch_size=2, device=loaded.device, dtype=loaded.dtype)
    np.testing.assert_allclose(extracted, reference, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(variant, reference, rtol=1e-4, atol=1e-5)


def test_the_prompt_cache_with_its_rooms_is_one_allocation() -> None:
    # the prompt's keys and values of every full-attention layer, with room for the longest name,
    # are views of one block (mapped on its own, handed back whole with the batch); a layer of
    # another shape or dtype, or one more than the block was sized for, gets a tensor of its own
    import torch

    from pytest_mllmprobe.answer import _Arena

    arena = _Arena(layers=2)
    states = torch.randn(3, 2, 5, 4)
    parts = [arena.take(states, room=2) for _ in range(3)]
    assert all(part.shape == (3, 2, 7, 4) for part in parts[:3])
    block = arena.block.untyped_storage().data_ptr()
    assert [part.untyped_storage().data_ptr() == block for part in parts] == [True, True, True]
    assert len({part.data_ptr() for part in parts}) == 3  # each its own part of the block
    assert arena.block.numel() == 4 * 3 * 2 * 7 * 4
    shorter = arena.take(torch.randn(3, 2, 2, 4), room=2)  # fits in the last slot
    assert shorter.untyped_storage().data_ptr() == block and shorter.shape == (3, 2, 4, 4)
    past = arena.take(states, room=2)  # the block has no slot left
    wider = _Arena(layers=2)
    wider.take(states, room=0)
    other = wider.take(torch.randn(3, 2, 9, 4), room=0)  # longer than the slots
    half = wider.take(states.half(), room=0)
    assert all(t.untyped_storage().data_ptr() not in (block, wider.block.untyped_storage().data_ptr())
               for t in (past, other, half))


def test_a_cache_that_cannot_be_rewound_falls_back_to_one_forward_per_class(family_model, seven_images) -> None:
    # the names continue the cache one at a time and rewind it; a cache whose layers write into
    # their tensors (static, quantised) or that has no layers cannot be rewound: full forwards
    import torch
    from transformers.cache_utils import Cache, StaticLayer

    from pytest_mllmprobe.answer import rewindable, scores_by_continuation, scores_from_cache
    from pytest_mllmprobe.models.adapter import ModelAdapter

    loaded, stage_map = family_model
    names = ["normal", "benign cyst", "covid-positive"]
    prompt = build_prompt(loaded.processor, names)
    continuations = class_continuations(loaded.processor.tokenizer, prompt, names)
    adapter = ModelAdapter()
    inputs = adapter.encode(loaded.processor, seven_images[:2], [prompt] * 2, loaded.device, loaded.dtype, "left",
                            family_name=stage_map.family)
    with torch.inference_mode():
        out = loaded.model(**inputs, use_cache=True, logits_to_keep=1)
        reference = scores_by_continuation(loaded.model, inputs, continuations, {})
        assert rewindable(out.past_key_values)
        assert not rewindable(Cache(layers=[StaticLayer(max_cache_len=8)])) and not rewindable(object())
        fallback = scores_from_cache(loaded.model, inputs, continuations, {}, object(), out.logits[:, -1])
    np.testing.assert_allclose(fallback.numpy(), reference.numpy(), rtol=1e-5, atol=1e-6)


def test_remote_code_and_listed_families_keep_the_full_forward_per_class(family_model) -> None:
    from pytest_mllmprobe.answer import continues_cache

    class RemoteModel:  # remote code: not known to continue a cache without its image inputs
        pass

    loaded, stage_map = family_model
    assert continues_cache(stage_map.family, loaded.model)
    assert not continues_cache(stage_map.family, RemoteModel())
    assert not continues_cache("blip-2", loaded.model)
