"""The closed-set logit lens and the answer under reordered options and reworded prompts.

Known answers: the healthy demo's lens rises to ``P_final`` at the last layer; the
permuted-answer fault (the class names' LM-head rows rotated) drops the lens at every layer
while the probes stay; a planted position-biased model (a hook makes the first listed option
win) answers each rotation of the options differently (consistency 1/K) while its probes pass.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pytest_mllmprobe import run
from pytest_mllmprobe.demo import DEMO_DATA
from pytest_mllmprobe.errors import ConfigError
from pytest_mllmprobe.lens import PREFIX, READOUT, LensHead, logits, verify
from pytest_mllmprobe.prompts import DEFAULT_QUESTION

from .faults import build_faulty

RUN = ("-p", "no:cacheprovider")
K = 3  # the demo's classes, and the rotations asked for

FIRST_OPTION = '''
from pytest_mllmprobe import ModelAdapter
from pytest_mllmprobe.demo import DEMO_MODEL
from pytest_mllmprobe.demo.synth import CLASSES


class FirstOption(ModelAdapter):
    """The demo model, made to answer whichever class name its prompt lists first."""

    def load(self, device="auto", dtype="auto", device_map=None):
        model, processor = super().load(device, dtype, device_map)
        ids = [processor.tokenizer.convert_tokens_to_ids(name) for name in CLASSES]
        seen = {}

        def remember(module, args, kwargs):
            seen["input_ids"] = kwargs["input_ids"]

        def first_listed_wins(module, args, output):
            for row, prompt in enumerate(seen["input_ids"].tolist()):
                first = min(ids, key=lambda i: prompt.index(i) if i in prompt else len(prompt))
                output[row, :, first] += 100.0
            return output

        model.register_forward_pre_hook(remember, with_kwargs=True)
        model.lm_head.register_forward_hook(first_listed_wins)
        return model, processor


def first_option():
    return FirstOption(str(DEMO_MODEL))
'''


@pytest.fixture(scope="module")
def healthy():
    return run("demo", answer_orders=K)["demo"]


@pytest.fixture(scope="module")
def permuted(tmp_path_factory: pytest.TempPathFactory):
    path = build_faulty("permuted-answer", tmp_path_factory.mktemp("faults"))
    return run(str(path), data=str(DEMO_DATA))["permuted-answer"]


@pytest.fixture(scope="module")
def biased(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("biased")
    (folder / "biased_models.py").write_text(FIRST_OPTION)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(folder))
        return run("biased_models:first_option", data=str(DEMO_DATA), answer_orders=K)["first_option"]


def _lens(result) -> list[float]:
    n = len([name for name in result.loci if name.startswith(PREFIX)])
    return [result.loci[f"{PREFIX}{i}"].accuracy for i in range(n)]


def _check(result, rule: str):
    return next(c for c in result.verdicts["stage.answer"].checks if c.rule == rule)


# -- the healthy demo -----------------------------------------------------------------------------

def test_the_healthy_lens_rises_to_p_final_at_the_last_layer(healthy) -> None:
    lens = _lens(healthy)
    n_llm = len([name for name in healthy.loci if name.endswith(".last")])
    assert len(lens) == n_llm
    last = healthy.loci[f"{PREFIX}{n_llm - 1}"]
    # single-token class names: the lens at the last layer IS the model's answer, image by image
    assert np.array_equal(last.correct, healthy.loci["answer"].correct)
    assert last.accuracy == healthy.scores["P_final"]
    assert lens[0] < lens[-1]  # the answer forms inside the decoder, not at its first layer
    assert healthy.answers["lens"]["note"] is None
    assert healthy.answers["lens"]["head"]["norm_kind"] == "rms"  # LLaMA's RMSNorm, found by running it


def test_lens_loci_are_scored_like_probes_but_have_no_test_of_their_own(healthy) -> None:
    for name, locus in healthy.loci.items():
        if name.startswith(PREFIX):
            assert locus.stage == "llm" and locus.readout == READOUT
            low, high = locus.intervals["accuracy"]
            assert low <= locus.accuracy <= high
            assert np.isfinite(locus.auroc) and locus.control is None
            assert name not in healthy.verdicts
    check = _check(healthy, "min_lens_keep")
    assert check.passed and check.locus == f"{PREFIX}{len(_lens(healthy)) - 1}"
    assert check.interval is not None and "lens/llm" in healthy.intervals
    assert healthy.first_failing_stage is None


def test_the_healthy_answer_survives_rotated_options(healthy) -> None:
    orders = healthy.answers["invariance"]["orders"]
    assert orders["n_prompts"] == K and len(orders["accuracy"]) == K
    own = orders["what"][0]
    assert orders["what"] == [own, own[1:] + own[:1], own[2:] + own[:2]]  # cyclic rotations
    assert orders["accuracy"][0] == healthy.scores["P_final"]  # the run's own order comes first
    assert orders["consistency"] >= 0.9
    assert orders["circular_accuracy"] <= min(orders["accuracy"])
    check = _check(healthy, "min_consistency")
    assert check.passed and check.value == orders["consistency"]


# -- planted faults -------------------------------------------------------------------------------

def test_permuted_answer_rows_drop_the_lens_at_every_layer_while_the_probes_stay(healthy, permuted) -> None:
    for ours, theirs in zip(_lens(permuted), _lens(healthy)):
        assert ours < theirs
    for name, locus in permuted.loci.items():
        if name.startswith(("llm.", "vision.", "connector")):
            assert locus.accuracy == healthy.loci[name].accuracy, name
    check = _check(permuted, "min_lens_keep")
    assert not check.passed
    assert "the class is readable from llm.0 on, but the model's own words never say it" in check.explanation


def test_a_position_biased_model_answers_each_rotation_differently_and_fails_min_consistency(biased) -> None:
    orders = biased.answers["invariance"]["orders"]
    assert orders["consistency"] == pytest.approx(1 / K)
    assert orders["all_same"] == 0.0 and orders["circular_accuracy"] == 0.0
    check = _check(biased, "min_consistency")
    assert not check.passed
    assert "the answer follows the position of the options, not the image" in check.explanation
    # the probes read the image as well as ever: only the answer stage fails
    failing = {name for name, verdict in biased.verdicts.items() if not verdict.passed}
    assert {biased.verdicts[name].stage for name in failing} == {"answer"}
    # its head is hooked: the lens cannot reproduce its logits, and says so instead of guessing
    assert "do not reproduce its own logits" in biased.answers["lens"]["note"]
    assert not any(name.startswith(PREFIX) for name in biased.loci)


# -- the cache: a hit needs no model --------------------------------------------------------------

def test_a_cache_hit_computes_the_lens_and_the_invariance_without_the_model(tmp_path: Path, monkeypatch) -> None:
    from pytest_mllmprobe.engine import ModelRun

    first = run("demo", answer_orders=2, cache_dir=str(tmp_path), bootstrap=0, permutations=0)["demo"]

    def no_model(self):
        raise AssertionError("a cache hit loaded the model")

    monkeypatch.setattr(ModelRun, "load", no_model)
    second = run("demo", answer_orders=2, cache_dir=str(tmp_path), bootstrap=0, permutations=0)["demo"]
    assert second.timings["cache"] == 1.0
    assert _lens(second) == _lens(first) and _lens(second)
    assert second.answers["invariance"]["orders"] == first.answers["invariance"]["orders"]
    assert second.answers["invariance"]["cost_s"] is None  # nothing was run: said as "from the cache"


# -- families whose final norm or head differ -----------------------------------------------------

def _family_features(family: str, tweak):
    import torch
    from transformers import AutoModelForImageTextToText

    from pytest_mllmprobe.demo.synth import make_images
    from pytest_mllmprobe.lens import capture
    from pytest_mllmprobe.models import detect_stages
    from pytest_mllmprobe.models.adapter import ModelAdapter
    from pytest_mllmprobe.prompts import build_prompt

    from .helpers import CLASSES, run_extract
    from .tiny_families import AFTER_INIT, BUILDERS

    config, processor = BUILDERS[family]()
    tweak(config)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config)
    if family in AFTER_INIT:
        AFTER_INIT[family](model)
    with torch.no_grad():  # trained norms are not all ones (or zeros): make the kind matter
        for name, param in model.named_parameters():
            if "norm" in name and param.dim() == 1:
                param.copy_(torch.randn_like(param) * 0.3 + (0.0 if family == "gemma3" else 1.0))
    model.eval()
    stage_map = detect_stages(model)
    images = [image.convert("RGB") for image, _ in make_images(2, seed=3)]
    prompts = [build_prompt(processor, CLASSES)] * len(images)

    class Loaded:
        pass

    loaded = Loaded()
    loaded.model, loaded.processor, loaded.device, loaded.dtype = model, processor, torch.device("cpu"), torch.float32
    loaded.adapter = ModelAdapter()
    features = run_extract(loaded, stage_map, images, prompts, batch_size=3)
    from pytest_mllmprobe.answer import class_continuations

    first_ids = [c[0] for c in class_continuations(processor.tokenizer, prompts[0], CLASSES)]
    head, note = capture(model, stage_map.llm_layers[-1], first_ids)
    assert note is None, note
    return model, head, features, f"llm.{len(stage_map.llm_layers) - 1}.last"


def _tie(config) -> None:
    config.tie_word_embeddings = True
    config.get_text_config().tie_word_embeddings = True


def _softcap(config) -> None:
    config.get_text_config().final_logit_softcapping = 0.5  # small: the tanh bends every logit


@pytest.mark.parametrize("family, tweak, kind", [
    ("gemma3", _tie, "rms_plus_one"),     # Gemma's (1 + weight) RMSNorm, head tied to the embeddings
    ("paligemma", _softcap, "rms_plus_one"),  # its image-text class applies the text config's soft-capping
    ("mllama", lambda config: None, "rms"),  # cross-attention decoder: the last layer is read all the same
    ("blip-2", lambda config: None, "layer"),  # OPT: a LayerNorm with a bias, named final_layer_norm
])
def test_the_lens_reproduces_the_model_s_own_logits_in_families_that_differ(family, tweak, kind) -> None:
    model, head, features, last = _family_features(family, tweak)
    assert head.norm_kind == kind
    if family == "gemma3":
        assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    chosen, note = verify(head, features.loci[last], features.first_logits, "float32")
    assert note is None and chosen is not None
    if family == "paligemma":
        assert chosen.softcap == 0.5
        # without the soft-capping the lens would not be the model's own logits: the check sees it
        uncapped = LensHead(**{**head.__dict__, "softcap": None})
        theirs = features.first_logits - features.first_logits.mean(1, keepdims=True)
        ours = logits(uncapped, features.loci[last])
        assert np.abs(ours - ours.mean(1, keepdims=True) - theirs).max() > 0.01


def test_gemma3_s_text_config_softcapping_is_not_applied_by_its_image_text_class() -> None:
    """The config names a soft-capping that Gemma 3's image-text class never applies: the check
    keeps the head that matches the model, not the config."""
    model, head, features, last = _family_features("gemma3", _softcap)
    assert head.softcap == 0.5
    chosen, note = verify(head, features.loci[last], features.first_logits, "float32")
    assert note is None and chosen.softcap is None


# -- options, data and messages -------------------------------------------------------------------

def test_bad_answer_orders_are_usage_errors() -> None:
    with pytest.raises(ConfigError, match="--mllm-answer-orders 0 must be at least 1"):
        run("demo", answer_orders=0)
    with pytest.raises(ConfigError, match=r"--mllm-answer-orders 4: the prompt lists 3 options, which have only 3"):
        run("demo", answer_orders=4)


def test_prompt_wordings_from_the_dataset_yaml_are_scored(tmp_path: Path) -> None:
    config = tmp_path / "data.yaml"
    config.write_text(f"source: {DEMO_DATA}\nprompts: ['Which finding? Options: {{options}}.', "
                      "'Look at the scan and pick one of {options}.']\n")
    result = run("demo", data=str(config), bootstrap=0, permutations=0)["demo"]
    prompts = result.answers["invariance"]["prompts"]
    assert prompts["n_prompts"] == 3 and "orders" not in result.answers["invariance"]
    assert prompts["what"][0] == DEFAULT_QUESTION and prompts["what"][1] == "Which finding? Options: {options}."
    assert 1 / 3 <= prompts["consistency"] <= 1.0
    assert any(c.metric == "consistency (prompts)" for c in result.verdicts["stage.answer"].checks)


@pytest.mark.parametrize("value, message", [
    ("prompts: 'one wording'", "prompts must be a list of question wordings"),
    ("prompts: ['no placeholder']", r"prompts\[0\] 'no placeholder' has no '\{options\}' placeholder"),
])
def test_bad_prompt_lists_name_the_file_and_the_fix(tmp_path: Path, value: str, message: str) -> None:
    config = tmp_path / "data.yaml"
    config.write_text(f"source: {DEMO_DATA}\n{value}\n")
    with pytest.raises(ConfigError, match=message):
        run("demo", data=str(config))


# -- what the user sees ---------------------------------------------------------------------------

def test_the_plugin_prints_the_lens_and_the_consistency_and_junit_carries_them(
        healthy, pytester: pytest.Pytester) -> None:
    import xml.etree.ElementTree as ET

    report = pytester.path / "report.xml"
    result = pytester.runpytest_subprocess("--mllm-model=demo", f"--mllm-answer-orders={K}", "--junitxml",
                                           str(report), "--mllm-report", str(pytester.path / "out"), *RUN)
    result.assert_outcomes(passed=len(healthy.verdicts))
    consistency = healthy.answers["invariance"]["orders"]["consistency"]
    result.stdout.fnmatch_lines([
        "*logit lens, accuracy of the model's own words at each decoder layer (llm.0 -> llm.3): *",
        f"*answer invariance: {K} option orders: accuracy *, consistency {consistency:.3f}, CircularEval accuracy *"
        f"[[]cost: {K - 1} more forward(s) per image, * s[]]",
    ])
    props = {p.get("name"): p.get("value") for p in ET.parse(report).getroot().iter("property")}
    answer = json.loads(props["mllmprobe:mllm/demo::stage.answer"])
    assert answer["lens.3"] == round(healthy.loci["lens.3"].accuracy, 4)
    assert answer["consistency_orders"] == round(consistency, 4)
    saved = json.loads((pytester.path / "out" / "results.json").read_text())["models"]["demo"]
    assert saved["loci"]["lens.3"]["readout"] == "lens"
    assert saved["answers"]["invariance"]["orders"]["n_prompts"] == K


def test_the_pipeline_plot_draws_the_lens_beside_the_last_token_probe(healthy) -> None:
    pytest.importorskip("matplotlib")
    from pytest_mllmprobe.report.plots import model_figure

    fig = model_figure(healthy.to_dict())
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    lens = lines["logit lens: the model's own words at the layer"]
    last = lines["probe: LLM last token"]
    assert list(lens.get_xdata()) == list(last.get_xdata())
    np.testing.assert_allclose(lens.get_ydata(), _lens(healthy))


# -- the failure text: where probe and lens part --------------------------------------------------

def _curve(probe: list[float], lens: list[float]) -> dict:
    """Loci of a 3-class model with these last-token probe and lens accuracies (chance 1/3)."""
    from pytest_mllmprobe.results import LocusResult

    def locus(name: str, value: float) -> LocusResult:
        return LocusResult(name=name, stage="llm", layer=None, readout=None, dim=8, accuracy=value,
                           balanced_accuracy=value, chance={"accuracy": 1 / 3}, correct=np.array([True]))

    loci = {f"llm.{i}.last": locus(f"llm.{i}.last", v) for i, v in enumerate(probe)}
    loci.update({f"{PREFIX}{i}": locus(f"{PREFIX}{i}", v) for i, v in enumerate(lens)})
    return loci


@pytest.mark.parametrize("probe, lens, story", [
    ([0.3, 0.9, 0.9, 0.9, 0.9, 0.9], [0.3, 0.3, 0.3, 0.9, 0.9, 0.2],
     "the class is readable from llm.1 on, but in the model's own words only from llm.3 and wrongly after llm.4"),
    ([0.3, 0.9, 0.9, 0.9], [0.3, 0.9, 0.9, 0.9], "the class is readable from llm.1 on, and in the model's own words from llm.1"),
    ([0.9, 0.9, 0.9, 0.9], [0.3, 0.1, 0.0, 0.0], "the class is readable from llm.0 on, but the model's own words never say it"),
    ([0.9, 0.9, 0.9, 0.3], [0.3, 0.3, 0.3, 0.3], "the class is not readable at the last layer's last token"),
])
def test_the_lens_rule_names_the_layers_where_probe_and_lens_part(probe, lens, story) -> None:
    from pytest_mllmprobe.thresholds import load_thresholds
    from pytest_mllmprobe.verdicts import lens_check

    rules = load_thresholds().for_model("m", "m")
    check, = lens_check(_curve(probe, lens), "accuracy", rules, {})
    assert story in check.explanation
    assert check.passed is (lens[-1] >= 0.8 * probe[-1])
    assert check.locus == f"{PREFIX}{len(lens) - 1}" and check.rule == "min_lens_keep"
