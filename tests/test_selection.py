"""Only what a run needs: a selection of tests extracts only the loci it reads, stops the
forward after the last of them, reuses cached loci and never writes a partial whole-model output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pytest_mllmprobe import engine
from pytest_mllmprobe.cache import (
    CacheWarning, cached_features, entry_paths, is_complete, load_features, save_features,
)
from pytest_mllmprobe.errors import ConfigError
from pytest_mllmprobe.extract import Features
from pytest_mllmprobe.models import LoadedModel, ModelSpec, detect_stages
from pytest_mllmprobe.prompts import build_prompt
from pytest_mllmprobe.selection import (
    NO_FLOW_NOTE, NO_STOP_NOTE, PARTIAL_NOTE, Need, everything, select, stage_reads, stop_after, whole_model_reason,
)
from pytest_mllmprobe.settings import Settings

from .helpers import CLASSES, hooks_left
from .tiny_families import tiny_family

pytest_plugins = "pytester"

#: LLaVA (CLIP tower, MLP projector), Qwen2-VL (one flattened token sequence, the merger inside
#: the vision model), Idefics3 (pixel-shuffle connector), BLIP-2 (Q-Former, OPT decoder) and
#: Mllama (tiled vision, cross-attention decoder): four different vision paths
FAMILIES = ("llava", "qwen2_vl", "idefics3", "blip-2", "mllama")


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request: pytest.FixtureRequest):
    import torch

    if request.param == "llava":
        from pytest_mllmprobe.demo.tiny import tiny_llava

        model, processor = tiny_llava("llava", seed=1)
        model.eval()
    else:
        model, processor = tiny_family(request.param, seed=1)
    loaded = LoadedModel(ModelSpec(request.param, request.param), model, processor, torch.device("cpu"), torch.float32)
    return loaded, detect_stages(model)


@pytest.fixture(scope="module")
def images() -> list:
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]


def _extract(loaded, stage_map, images, need: Need | None) -> Features:
    from pytest_mllmprobe.answer import class_continuations
    from pytest_mllmprobe.extract import extract

    prompt = build_prompt(loaded.processor, CLASSES)
    continuations = class_continuations(getattr(loaded.processor, "tokenizer", loaded.processor), prompt, CLASSES)
    return extract(loaded.model, loaded.processor, stage_map, lambda idx: [images[i] for i in idx], [prompt] * 3,
                   continuations, batch_size=3, device=loaded.device, dtype=loaded.dtype, adapter=loaded.adapter,
                   need=need)


def _layer_calls(model, paths) -> tuple[list[int], list]:
    """Record which of ``paths`` (decoder layers) run, by index."""
    calls: list[int] = []
    handles = [model.get_submodule(p).register_forward_hook(lambda *a, i=i: calls.append(i))
               for i, p in enumerate(paths)]
    return calls, handles


def test_vision_only_never_runs_the_language_model(family_model, images) -> None:
    loaded, stage_map = family_model
    full = _extract(loaded, stage_map, images, None)
    vision = Need(frozenset(n for n in stage_map.loci if n.startswith("vision.")), answer=False)
    calls, handles = _layer_calls(loaded.model, stage_map.llm_layers)
    try:
        part = _extract(loaded, stage_map, images, vision)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == []  # no decoder layer ran: the forward stopped in the vision tower
    assert set(part.loci) == vision.loci and part.answer_scores is None and part.notes == []
    for name in vision.loci:
        np.testing.assert_allclose(part.loci[name], full.loci[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert hooks_left(loaded.model) == 0


def test_a_middle_layer_selection_stops_after_it(family_model, images) -> None:
    loaded, stage_map = family_model
    full = _extract(loaded, stage_map, images, None)
    n = len(stage_map.llm_layers)
    middle = max(stage_map.llm_entry, n // 2 - 1)
    assert middle < n - 1  # the test needs layers after it
    name = f"llm.{middle}.last"
    calls, handles = _layer_calls(loaded.model, stage_map.llm_layers)
    try:
        part = _extract(loaded, stage_map, images, Need(frozenset({name, "connector"}), answer=False))
    finally:
        for handle in handles:
            handle.remove()
    assert sorted(set(calls)) == list(range(middle + 1))  # later layers never ran
    assert set(part.loci) == {name, "connector"}
    np.testing.assert_allclose(part.loci[name], full.loci[name], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(part.loci["connector"], full.loci["connector"], rtol=1e-5, atol=1e-6)


def test_an_adapter_that_cannot_stop_runs_to_the_end_and_says_so(family_model, images) -> None:
    loaded, stage_map = family_model
    if stage_map.family != "llava":
        pytest.skip("one family is enough for the fallback")
    from dataclasses import replace

    from pytest_mllmprobe.models.adapter import ModelAdapter

    class RunsToTheEnd(ModelAdapter):
        stops_early = False

    calls, handles = _layer_calls(loaded.model, stage_map.llm_layers)
    try:
        part = _extract(replace(loaded, adapter=RunsToTheEnd()), stage_map, images,
                        Need(frozenset({"vision.0"}), answer=False))
    finally:
        for handle in handles:
            handle.remove()
    assert calls  # the language model ran
    assert set(part.loci) == {"vision.0"}
    assert part.notes and part.notes[0].startswith(NO_STOP_NOTE.split("{")[0])
    np.testing.assert_allclose(part.loci["vision.0"], _extract(loaded, stage_map, images, None).loci["vision.0"],
                               rtol=1e-5, atol=1e-6)


def test_a_needed_hook_that_never_fires_is_still_an_error(family_model, images) -> None:
    from pytest_mllmprobe.extract import ExtractionError, PoolingHooks

    loaded, stage_map = family_model
    if stage_map.family != "llava":
        pytest.skip("one family is enough")
    hooks = PoolingHooks(loaded.model, stage_map, loci={"vision.0", "llm.1.last"}, stop_after="llm.1.last")
    assert hooks.expected_loci() == ["vision.0", "llm.1.last"]
    hooks.begin_batch(None, None, rows=slice(0, 1), n=1)
    with pytest.raises(ExtractionError, match="llm.1.last"):
        hooks.end_batch()


# -- which loci a selection reads ---------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_plan():
    return engine.plan(Settings(models=("demo",)))


def test_stage_rules_read_what_the_selection_says(demo_plan) -> None:
    stage_map = demo_plan.models[0].stage_map
    consumed = max(stage_map.consumed_vision_layers)
    n = len(stage_map.llm_layers)
    reads = stage_reads(stage_map)
    assert reads["vision"] == {f"vision.{i}" for i in range(consumed + 1)}
    assert "connector" in reads["connector"] and f"vision.{consumed}" in reads["connector"]
    assert reads["llm"] == {"connector", *(f"llm.{i}.image" for i in range(n))}
    assert reads["answer"] == {"answer", *(f"llm.{i}.last" for i in range(n))}
    vision = select(stage_map, ["vision.0", "stage.vision"])
    assert not vision.need.answer and stop_after(stage_map, vision.need) == f"vision.{consumed}"
    assert vision.stages == {"vision"} and "connector" in vision.skipped and "answer" in vision.skipped
    assert stop_after(stage_map, select(stage_map, ["answer"]).need) is None  # the answer needs the last logits
    assert select(stage_map, [*everything(stage_map).tests]).full
    with pytest.raises(ConfigError, match="did you mean 'connector'"):
        select(stage_map, ["conector"])


@pytest.fixture(scope="module")
def demo_full(tmp_path_factory: pytest.TempPathFactory):
    """The demo run in full (one split, no control, no bootstrap: quick), with its cache."""
    cache = tmp_path_factory.mktemp("selection-cache")
    options = dict(folds=1, permutations=0, bootstrap=0, cache_dir=str(cache))
    return engine.run("demo", **options)["demo"], options


def test_each_stage_rule_judged_on_its_reads_alone_equals_the_full_judgement(demo_full, demo_plan) -> None:
    from pytest_mllmprobe.verdicts import judge, stage_scores

    full, _ = demo_full
    model_plan = demo_plan.models[0]
    stage_map, thresholds = model_plan.stage_map, model_plan.thresholds
    for stage, reads in stage_reads(stage_map).items():
        # the logit lens's loci are computed, not extracted, from the last-token rows the answer stage reads
        lens = [n for n in full.loci if n.startswith("lens.")] if stage == "answer" else []
        assert len(lens) == (len(stage_map.llm_layers) if stage == "answer" else 0)
        loci = {n: full.loci[n] for n in [*reads, *lens]}
        scores = stage_scores(loci, stage_map.consumed_vision_layers, thresholds.metric, stage_map.llm_entry,
                              stage_map.loci)
        verdicts = judge(loci, scores, stage_map.consumed_vision_layers, thresholds, stage_map.llm_entry,
                         stages=[stage])
        assert set(verdicts) == {*reads, f"stage.{stage}"}
        mine, theirs = verdicts[f"stage.{stage}"], full.verdicts[f"stage.{stage}"]
        assert [c.rule for c in mine.checks] == [c.rule for c in theirs.checks], stage
        for a, b in zip(mine.checks, theirs.checks):
            assert a.value == pytest.approx(b.value, nan_ok=True) and a.passed == b.passed, (stage, a.rule)


def test_a_vision_selection_then_a_full_run_then_a_subset(tmp_path: Path, monkeypatch) -> None:
    options = dict(folds=1, permutations=0, bootstrap=0, cache_dir=str(tmp_path))
    decoder_calls: list[int] = []
    load = engine.ModelRun.load

    def load_and_watch(self):  # every forward of the run (data-flow check included) is watched
        loaded = load(self)
        layer = loaded.model.get_submodule(self.stage_map.llm_layers[0])
        layer.register_forward_pre_hook(lambda *_: decoder_calls.append(1))
        return loaded

    monkeypatch.setattr(engine.ModelRun, "load", load_and_watch)
    part = engine.run("demo", tests=["vision.1", "stage.vision"], **options)["demo"]
    assert decoder_calls == []  # the language model never ran, not even in the data-flow check
    stage_map = engine.plan(Settings(models=("demo",))).models[0].stage_map
    vision = {f"vision.{i}" for i in range(max(stage_map.consumed_vision_layers) + 1)}
    assert set(part.loci) == vision  # the stage rule's curve, nothing past it
    assert set(part.verdicts) == vision | {"stage.vision"}
    assert part.timings["pooled_loci"] == len(vision)
    selection = part.selection
    assert not selection["full"] and selection["reason"] is None
    assert selection["skipped"][-1] == "answer" and "connector" in selection["skipped"]
    assert NO_FLOW_NOTE in selection["notes"]
    assert selection["notes"][0].startswith(PARTIAL_NOTE.split("(")[0])
    assert np.isnan(part.scores["FHS_C"]) and np.isnan(part.scores["P_final"]) and np.isfinite(part.scores["FHS_V"])
    [key] = [p.stem for p in tmp_path.glob("*.npz")]
    assert not is_complete(tmp_path, key)

    full = engine.run("demo", **options)["demo"]
    assert decoder_calls  # the watch works: a full run does run the decoder
    assert full.selection["full"] and full.timings["cache"] == 0.0
    n_pooled = len([n for n in stage_map.loci if n != "answer"])
    # the vision loci came from the cache; only the others were pooled
    assert full.timings["cached_loci"] == len(vision)
    assert full.timings["pooled_loci"] == n_pooled - len(vision)
    assert is_complete(tmp_path, key)
    assert len(list(tmp_path.glob("*.npz"))) == 1  # merged into the one entry
    # the selection's verdicts are the full run's: each locus's probe is fitted apart from the
    # loci beside it, so fitting fewer of them changes no number
    for name in sorted(part.verdicts):
        mine, theirs = part.verdicts[name].checks, full.verdicts[name].checks
        assert [(c.rule, c.value, c.passed) for c in mine] == [(c.rule, c.value, c.passed) for c in theirs], name
    assert part.scores["FHS_V"] == full.scores["FHS_V"]

    def no_load(self):
        raise AssertionError("a pure cache hit loaded the model")

    monkeypatch.setattr(engine.ModelRun, "load", no_load)
    subset = engine.run("demo", tests=["connector", "llm.2.last"], **options)["demo"]
    assert subset.timings["cache"] == 1.0 and set(subset.loci) == {"connector", "llm.2.last"}
    assert set(subset.verdicts) == {"connector", "llm.2.last"}


def test_outputs_that_promise_the_whole_model_extract_everything(demo_plan) -> None:
    assert whole_model_reason(Settings(models=("demo",))) is None
    cases = {
        "--mllm-save-baseline": dict(save_baseline="b.json"),
        "--mllm-compare-to": dict(compare_to="demo"),
        "random-init": dict(controls=("random-init",)),
        "--mllm-answer generate": dict(answer="generate"),
        "--mllm-baseline": dict(baseline="b.json"),
    }
    for flag, options in cases.items():
        assert flag in whole_model_reason(Settings(models=("demo",), **options)), flag
    assert "--mllm-report" in whole_model_reason(Settings(models=("demo",)), report="out")
    evaluator = engine.Evaluator(engine.plan(Settings(models=("demo",), save_baseline="b.json")))
    chosen = evaluator.select("demo", ["vision.0"])
    assert chosen.full and chosen.need.answer and "--mllm-save-baseline" in chosen.reason
    assert chosen.tests == {"vision.0"}  # only the selected tests are run


# -- the cache keeps partial entries -------------------------------------------------------------
KEY = "b" * 64


def _fake(need: Need, n: int = 5) -> Features:
    rng = np.random.default_rng(len(need.loci))
    loci = {name: rng.normal(size=(n, 4)).astype(np.float32) for name in sorted(need.loci)}
    return Features(loci=loci, answer_scores=rng.normal(size=(n, 3)).astype(np.float32) if need.answer else None)


def test_partial_entries_are_merged_and_a_subset_is_a_pure_hit(tmp_path: Path) -> None:
    whole = Need(frozenset({"vision.0", "vision.1", "connector", "llm.0.last"}), answer=True)
    asked: list[Need] = []

    def compute(missing: Need) -> Features:
        asked.append(missing)
        return _fake(missing)

    vision = Need(frozenset({"vision.0", "vision.1"}), answer=False)
    first, hit = cached_features(tmp_path, KEY, compute, need=vision, whole=whole)
    assert not hit and asked == [vision] and set(first.loci) == vision.loci and first.answer_scores is None
    assert not is_complete(tmp_path, KEY)
    second, hit = cached_features(tmp_path, KEY, compute, need=whole, whole=whole)
    assert not hit and asked[1] == Need(frozenset({"connector", "llm.0.last"}), answer=True)  # only what was missing
    for name in vision.loci:  # the cached loci are kept as they were
        np.testing.assert_array_equal(second.loci[name], first.loci[name])
    assert is_complete(tmp_path, KEY) and second.answer_scores is not None
    third, hit = cached_features(tmp_path, KEY, compute, need=Need(frozenset({"connector"}), False), whole=whole)
    assert hit and len(asked) == 2 and set(third.loci) == {"connector"} and third.answer_scores is None
    # a caller that asks for everything (need=None) reads the complete entry too
    _, hit = cached_features(tmp_path, KEY, lambda: pytest.fail("recomputed"))
    assert hit


def test_a_partial_entry_is_no_hit_for_a_caller_that_needs_everything(tmp_path: Path) -> None:
    vision = Need(frozenset({"vision.0"}), answer=False)
    cached_features(tmp_path, KEY, _fake, need=vision, whole=Need(frozenset({"vision.0", "connector"}), True))
    full = _fake(Need(frozenset({"vision.0", "connector"}), True))
    got, hit = cached_features(tmp_path, KEY, lambda: full)
    assert not hit and set(got.loci) == {"vision.0", "connector"}


def test_a_format_2_entry_reads_as_complete_and_older_ones_miss_loudly(tmp_path: Path) -> None:
    features = _fake(Need(frozenset({"vision.0", "connector"}), True))
    save_features(tmp_path, KEY, features)
    meta_path = entry_paths(tmp_path, KEY)[1]
    sidecar = json.loads(meta_path.read_text())
    for name in ("answer", "complete"):  # what format 2 did not write
        del sidecar[name]
    meta_path.write_text(json.dumps({**sidecar, "format": 2}))
    assert is_complete(tmp_path, KEY)
    got, hit = cached_features(tmp_path, KEY, lambda: pytest.fail("recomputed"))
    assert hit and got.answer_scores is not None
    meta_path.write_text(json.dumps({**sidecar, "format": 1}))
    with pytest.warns(CacheWarning, match="another format"):
        assert load_features(tmp_path, KEY) is None


# -- the pytest face ----------------------------------------------------------------------------
def test_k_vision_extracts_the_vision_loci_only_and_a_whole_model_output_forces_all(pytester: pytest.Pytester) -> None:
    cache = pytester.path / "cache"
    common = ["-p", "no:cacheprovider", "--mllm-model=demo", f"--mllm-cache-dir={cache}",
              "--mllm-folds=1", "--mllm-permutations=0", "--mllm-bootstrap=0"]
    result = pytester.runpytest_subprocess(*common, "-k", "vision and not stage")
    result.assert_outcomes(passed=4, deselected=14)
    result.stdout.fnmatch_lines(["*only the selected tests' loci were extracted (4 of 14; skipped, not selected: *",
                                 "*the data-flow check of the stage map stopped before the language model*"])
    [sidecar] = list(cache.glob("*.json"))
    written = json.loads(sidecar.read_text())
    assert sorted(written["loci"]) == [f"vision.{i}" for i in range(4)] and not written["answer"]

    # nothing of the model selected: the model is never evaluated (the cache entry is untouched)
    before = sidecar.read_text()
    result = pytester.runpytest_subprocess(*common, "-k", "not demo")
    assert result.ret == pytest.ExitCode.NO_TESTS_COLLECTED
    assert sidecar.read_text() == before

    baseline = pytester.path / "baseline.json"
    result = pytester.runpytest_subprocess(*common, "-k", "vision.0", f"--mllm-save-baseline={baseline}")
    result.assert_outcomes(passed=1, deselected=17)
    result.stdout.fnmatch_lines(["*--mllm-save-baseline writes the whole model's baseline*"])
    entry = json.loads(baseline.read_text())["models"]["demo"]
    assert len(entry["loci"]) == 14 and entry["scores"]["P_final"] is not None  # whole, never partial
