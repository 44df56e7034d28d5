"""The feature cache in real runs, and pytest-xdist: same numbers, one extraction per model."""

from __future__ import annotations

import json
import multiprocessing
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from pytest_mllmprobe.answer import class_continuations
from pytest_mllmprobe.data import load_image, load_image_folder
from pytest_mllmprobe.extract import extract
from pytest_mllmprobe.models import detect_stages, load_model, resolve_model
from pytest_mllmprobe.prompts import build_prompt

from .helpers import hooks_left

RUN = ("-p", "no:cacheprovider")


def _figures(report: Path) -> dict[str, dict]:
    props = {p.get("name"): p.get("value") for p in ET.parse(report).getroot().iter("property")}
    return {name: json.loads(value) for name, value in props.items() if name.startswith("mllmprobe:mllm/")}


def test_a_rerun_that_changes_only_thresholds_or_probes_loads_no_model(pytester: pytest.Pytester) -> None:
    cache = pytester.path / "features"
    first = pytester.runpytest_subprocess("--mllm-model=demo", f"--mllm-cache-dir={cache}", *RUN)
    first.assert_outcomes(passed=18)
    first.stdout.no_fnmatch_line("*features from the cache*")
    pytester.makefile(".yaml", strict="version: 1\nstages:\n  connector: {min_keep: 0.95}\n")
    again = pytester.runpytest_subprocess(
        "--mllm-model=demo", f"--mllm-cache-dir={cache}", "--mllm-thresholds=strict.yaml",
        "--mllm-probe=mlp", *RUN,
    )
    again.stdout.fnmatch_lines(["demo (llava, 150 test images; *; features from the cache)"])
    again.stdout.no_fnmatch_line("*extracted*images*")  # no forward pass ran
    assert len(list(cache.glob("*.npz"))) == 1
    # --mllm-no-cache reads and writes nothing
    fresh = pytester.runpytest_subprocess("--mllm-model=demo", f"--mllm-cache-dir={cache}", "--mllm-no-cache", *RUN)
    fresh.stdout.no_fnmatch_line("*features from the cache*")


def _run_demo(cache: str, queue: multiprocessing.Queue) -> None:
    from pytest_mllmprobe import run

    result = run("demo", cache_dir=cache)["demo"]
    queue.put((result.timings.get("cache"), result.loci["connector"].accuracy))


def test_two_processes_extract_a_model_once(tmp_path: Path) -> None:
    """What xdist workers do: the second waits on the lock, then reads the first one's features."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_run_demo, args=(str(tmp_path), queue)) for _ in range(2)]
    for worker in workers:
        worker.start()
    outcomes = [queue.get(timeout=300) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    assert sorted(hit for hit, _ in outcomes) == [0.0, 1.0]  # one computed, one read
    assert outcomes[0][1] == outcomes[1][1]


def test_xdist_gives_the_serial_results(pytester: pytest.Pytester) -> None:
    serial, parallel = pytester.path / "serial.xml", pytester.path / "parallel.xml"
    pytester.runpytest_subprocess("--mllm-model=demo", "--junitxml", str(serial), *RUN).assert_outcomes(passed=18)
    result = pytester.runpytest_subprocess(
        "--mllm-model=demo", "-n", "2", f"--mllm-cache-dir={pytester.path / 'features'}",
        "--junitxml", str(parallel), *RUN,
    )
    result.assert_outcomes(passed=18)
    assert _figures(parallel) == _figures(serial)
    assert len(list((pytester.path / "features").glob("*.npz"))) == 1


@pytest.mark.parametrize("where", ["forward", "last decoder layer"])
def test_out_of_memory_halves_the_batch_and_gives_the_same_features(
    tiny_llava_dir: Path, lesion_data: Path, where: str
) -> None:
    """A forward that runs out of memory above 2 images: the batch of 8 becomes 4, then 2.

    In the last decoder layer, the vision, connector and earlier decoder hooks have already
    written their rows of the failed batch: the retry must overwrite every one of them.
    """
    import torch

    from pytest_mllmprobe.extract import ExtractionError

    images = [load_image(p) for p in load_image_folder(lesion_data).paths[:7]]
    loaded = load_model(resolve_model(str(tiny_llava_dir)), device="cpu", dtype="float32")
    stage_map = detect_stages(loaded.model)
    prompt = build_prompt(loaded.processor, ["normal", "benign", "malignant"])
    continuations = class_continuations(loaded.processor.tokenizer, prompt, ["normal", "benign", "malignant"])

    def run(batch_size: int, on_oom=None):
        return extract(loaded.model, loaded.processor, stage_map, lambda idx: [images[i] for i in idx],
                       [prompt] * 7, continuations, batch_size=batch_size, device="cpu", dtype=torch.float32,
                       on_oom=on_oom)

    reference = run(2)
    original = type(loaded.model).forward

    def small_memory(self, *args, **kwargs):
        if kwargs["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (planted)")
        return original(self, *args, **kwargs)

    def small_layer_memory(module, args):
        if args[0].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (planted)")

    halved: list[int] = []
    with pytest.MonkeyPatch.context() as patch:
        if where == "forward":
            patch.setattr(type(loaded.model), "forward", small_memory)
            features = run(8, halved.append)
        else:
            planted = loaded.model.get_submodule(stage_map.llm_layers[-1]).register_forward_pre_hook(small_layer_memory)
            try:
                features = run(8, halved.append)
            finally:
                planted.remove()
        assert halved == [4, 2] and features.batch_size == 2
        for name, values in reference.loci.items():
            np.testing.assert_allclose(features.loci[name], values, rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(features.answer_scores, reference.answer_scores, rtol=1e-5, atol=1e-6)
        patch.setattr(type(loaded.model), "forward",
                      lambda self, *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("planted")))
        with pytest.raises(ExtractionError, match="out of memory with batch size 1"):
            run(2)
    assert hooks_left(loaded.model) == 0  # removed after the error


@pytest.mark.parametrize("worker, count, expected", [
    ("gw0", 4, "cuda:0"), ("gw5", 4, "cuda:1"), ("gw3", 1, "cuda:0"), (None, 4, "cuda:0"), ("", 2, "cuda:0"),
])
def test_xdist_workers_are_pinned_to_different_gpus(monkeypatch: pytest.MonkeyPatch, worker, count, expected) -> None:
    import torch

    from pytest_mllmprobe.models.load import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    if worker is None:
        assert str(pick_device("auto")) == expected
        monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw2")
        assert str(pick_device("auto")) == ("cuda:2" if count > 2 else "cuda:0")
    else:
        assert str(pick_device("auto", worker)) == expected
    assert str(pick_device("cuda:3", "gw1")) == "cuda:3"  # an explicit device is never moved


def _features(loaded, images, batch_size=4):
    stage_map = detect_stages(loaded.model)
    names = ["normal", "benign", "malignant"]
    prompt = build_prompt(loaded.processor, names)
    return extract(loaded.model, loaded.processor, stage_map, lambda idx: [images[i] for i in idx],
                   [prompt] * len(images), class_continuations(loaded.processor.tokenizer, prompt, names),
                   batch_size=batch_size, device=loaded.device, dtype=loaded.dtype)


def test_device_map_loading_gives_the_same_features(tiny_llava_dir: Path, lesion_data: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """``--mllm-device-map auto`` goes through accelerate; on a CPU-only machine every weight
    stays on the CPU, so the features must be those of a plain load."""
    pytest.importorskip("accelerate", reason="--mllm-device-map needs accelerate (the [gpu] extra)")
    images = [load_image(p) for p in load_image_folder(lesion_data).paths[:5]]
    spec = resolve_model(str(tiny_llava_dir))
    plain = _features(load_model(spec, device="cpu", dtype="float32"), images)
    from transformers import AutoModelForImageTextToText

    asked: list[object] = []
    real_load = AutoModelForImageTextToText.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        asked.append(kwargs.get("device_map"))
        return real_load(cls, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(AutoModelForImageTextToText, "from_pretrained", classmethod(spy))
        mapped_model = load_model(spec, device="cpu", dtype="float32", device_map="auto")
    assert asked == ["auto"] and mapped_model.device.type == "cpu"  # inputs go to the embeddings' device
    mapped = _features(mapped_model, images)
    for name, values in plain.loci.items():
        np.testing.assert_allclose(mapped.loci[name], values, rtol=1e-5, atol=1e-6, err_msg=name)

    import importlib.util

    from pytest_mllmprobe.errors import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a))
    with pytest.raises(ConfigError, match=r"--mllm-device-map auto needs the accelerate package: pip install"):
        load_model(spec, device="cpu", device_map="auto")


def test_bfloat16_forward_pools_in_float32(tiny_llava_dir: Path, lesion_data: Path) -> None:
    """A bf16 model: the pooled features are float32 and close to the float32 model's (the
    pooling accumulates in float32; bf16 has ~3 significant digits per activation)."""
    images = [load_image(p) for p in load_image_folder(lesion_data).paths[:6]]
    spec = resolve_model(str(tiny_llava_dir))
    full = _features(load_model(spec, device="cpu", dtype="float32"), images)
    half = _features(load_model(spec, device="cpu", dtype="bfloat16"), images)
    for name, values in full.loci.items():
        assert half.loci[name].dtype == np.float32, name
        assert np.isfinite(half.loci[name]).all(), name
        scale = np.abs(values).max()
        assert np.abs(half.loci[name] - values).max() <= 0.05 * scale, name
        # the images stay told apart as in float32: same pairwise ordering of distances
        d_full = np.linalg.norm(values[:, None] - values[None], axis=-1)
        d_half = np.linalg.norm(half.loci[name][:, None] - half.loci[name][None], axis=-1)
        assert np.corrcoef(d_full.ravel(), d_half.ravel())[0, 1] > 0.95, name


@pytest.mark.parametrize("probe", ["linear", "mlp"])
def test_probes_train_on_the_extraction_device(monkeypatch: pytest.MonkeyPatch, probe: str) -> None:
    """Where extraction picks a GPU, the batched probes are fitted there too (a cache hit included)."""
    import torch

    from pytest_mllmprobe import engine, probes
    from pytest_mllmprobe.settings import Settings

    asked: list[str] = []
    fit = probes.fit_folds

    def spy(*args, device="cpu", **kwargs):
        asked.append(device)
        return fit(*args, device="cpu", **kwargs)  # this machine may have no GPU: fit on the CPU

    monkeypatch.setattr(probes, "fit_folds", spy)
    monkeypatch.setattr(engine, "pick_device", lambda device: torch.device("cuda", 1))
    # one permutation: the control's probes go to the same device as the real ones
    the_plan = engine.plan(Settings(models=("demo",), device="cpu", probe=probe, max_samples=60, permutations=1))
    result = engine.evaluate(the_plan, the_plan.models[0])
    assert asked == ["cuda:1"] and len(result.loci) > 3


def test_probes_fall_back_to_the_cpu_when_the_gpu_runs_out_of_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from pytest_mllmprobe import engine, probes
    from pytest_mllmprobe.items import model_summary
    from pytest_mllmprobe.settings import Settings

    settings = Settings(models=("demo",), device="cpu", max_samples=60)
    the_plan = engine.plan(settings)
    reference = engine.evaluate(the_plan, the_plan.models[0])
    assert model_summary(reference)["memory"] is None

    asked: list[str] = []
    fit = probes.fit_folds

    def small_gpu(*args, device="cpu", **kwargs):
        asked.append(device)
        if device != "cpu":
            raise torch.OutOfMemoryError("CUDA out of memory (planted)")
        return fit(*args, device=device, **kwargs)

    monkeypatch.setattr(probes, "fit_folds", small_gpu)
    monkeypatch.setattr(engine, "pick_device", lambda device: torch.device("cuda", 0))
    result = engine.evaluate(the_plan, the_plan.models[0])
    assert asked[0] == "cuda:0" and set(asked[1:]) == {"cpu"}
    assert result.timings["probe_cpu_fallback"] == 1.0
    assert "probes ran out of accelerator memory and were fitted on the CPU" in model_summary(result)["memory"]
    assert {name: locus.accuracy for name, locus in result.loci.items()} == \
        {name: locus.accuracy for name, locus in reference.loci.items()}
