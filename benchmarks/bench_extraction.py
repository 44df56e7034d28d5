"""Extraction cost: the engine against a bare forward pass and a naive reference, on one machine.

    python benchmarks/bench_extraction.py                  # small: 2 CPU cores, a few minutes
    python benchmarks/bench_extraction.py --size large     # a GPU: CLIP-L-sized tower, 1,024 images
    python benchmarks/bench_extraction.py --size ci        # seconds: does it run (tests use it)

Builds a randomly initialised LLaVA (CLIP vision tower + Llama decoder, real transformers
classes) in a temporary folder, writes synthetic lesion images, then measures four runs, each
in its own subprocess so that its peak RSS (``ru_maxrss``) is its own:

* ``bare``  -- ``model(**inputs)`` over the dataset, same batches and processor, no hooks.
* ``lean``  -- the same with ``use_cache=False`` and ``logits_to_keep=1``, the two savings the
  engine's own forward makes: the stricter floor.
* ``full``  -- ``pytest_mllmprobe.engine`` ``plan`` + ``evaluate``: every locus pooled by hooks
  in one forward per batch, the answer scored, linear probes fitted (``result.timings``).
* ``naive`` -- ``output_hidden_states=True`` forward plus a vision-tower call that returns every
  layer, pooled after the forward, then scikit-learn ``LogisticRegression`` per locus.

With multi-token class names (``--names multi`` or ``both``, the default), the same dataset is
read through a dataset YAML whose ``display_names`` take 2, 3 and 4 tokens (:data:`MULTI_NAMES`),
and three more runs are measured side by side with the single-token ones:

* ``lean-multi`` -- the lean bare forward over the (longer) multi-token prompt: the floor.
* ``full-multi`` -- the engine; the class names continue each batch's KV cache, one at a time.
* ``full-multi-per-class`` -- the engine with the cache continuation switched off: one more full
  forward per multi-token class and batch (the path before issue 17, still the fallback).

Model loading is timed separately and left out of the ratios. Each run is repeated (``--repeats``,
interleaved) and the fastest counts. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    # ~ a 384-wide, 6-block ViT at 224 px (256 patches) and a 512-wide, 8-layer decoder.
    "small": dict(vision_layers=6, vision_hidden=384, text_layers=8, text_hidden=512,
                  image_size=224, patch_size=14, images=256, batch_size=8),
    # CI-sized: checks that the script runs end to end (tests/test_benchmarks.py); its figures
    # are startup and noise, not a measurement.
    "ci": dict(vision_layers=2, vision_hidden=32, text_layers=2, text_hidden=64,
               image_size=32, patch_size=8, images=24, batch_size=8),
    # ~ CLIP ViT-L/14 at 224 px (24 x 1024) and a 2048-wide, 24-layer decoder.
    "large": dict(vision_layers=24, vision_hidden=1024, text_layers=24, text_hidden=2048,
                  image_size=224, patch_size=14, images=1024, batch_size=16),
}
RESULT = "RESULT "

#: display names of 2, 3 and 4 tokens under the demo's word-level tokenizer ("-" is a token)
MULTI_NAMES = {"normal": "no lesion", "benign": "benign cyst mass", "malignant": "malignant tumor - positive"}
#: the runs of each group of class names
GROUPS = {"single": ("bare", "lean", "full", "naive"), "multi": ("lean-multi", "full-multi", "full-multi-per-class")}


# -- the three measured runs (each runs in its own subprocess) ---------------------------------
def _peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def _plan(args: argparse.Namespace) -> Any:
    from pytest_mllmprobe.engine import plan
    from pytest_mllmprobe.settings import Settings

    # One split and no control task or intervals: the naive reference fits one probe per locus,
    # so the engine does too; the default's folds and controls are priced by bench_seed_spread.py.
    return plan(Settings(
        models=(args.model,), data=args.data, max_samples=args.images, batch_size=args.batch_size,
        device=args.device, dtype=args.dtype, folds=1, permutations=0, bootstrap=0,
    ))


def _sync(device: Any) -> None:
    import torch

    if getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.synchronize()


def _batches(the_plan: Any, loaded: Any, batch_size: int):
    """``(index, inputs)`` per batch: the engine's processor call and prompt, for bare and naive."""
    from pytest_mllmprobe.inputs import prepare_inputs
    from pytest_mllmprobe.prompts import DEFAULT_QUESTION, build_prompt

    dataset = the_plan.dataset
    prompt = build_prompt(loaded.processor, list(dataset.display_names), dataset.prompt or DEFAULT_QUESTION)
    for start in range(0, len(dataset), batch_size):
        index = list(range(start, min(start + batch_size, len(dataset))))
        images = [dataset.image(i) for i in index]
        yield index, prepare_inputs(loaded.processor, images, [prompt] * len(index), loaded.device, loaded.dtype)


def _load(the_plan: Any, args: argparse.Namespace) -> tuple[Any, float]:
    from pytest_mllmprobe.models import load_model

    start = time.perf_counter()
    loaded = load_model(the_plan.models[0].spec, device=args.device, dtype=args.dtype)
    return loaded, time.perf_counter() - start


def run_bare(args: argparse.Namespace, lean: bool = False) -> dict[str, Any]:
    """``model(**inputs)`` per batch; ``lean`` adds the two savings the engine's own forward
    makes, no KV cache and the logits of the last position only (the engine minus its hooks,
    probes and answer)."""
    import torch

    from pytest_mllmprobe.inputs import no_cache

    the_plan = _plan(args)
    loaded, load_s = _load(the_plan, args)
    extra = {**no_cache(loaded.model), "logits_to_keep": 1} if lean else {}
    start, cpu, system = time.perf_counter(), time.process_time(), _sys_s()
    with torch.inference_mode():
        for _, inputs in _batches(the_plan, loaded, args.batch_size):
            loaded.model(**inputs, **extra)
    _sync(loaded.device)
    return {"load_s": load_s, "forward_s": time.perf_counter() - start, "forward_cpu_s": time.process_time() - cpu,
            "forward_sys_s": _sys_s() - system}


def _sys_s() -> float:
    """System CPU seconds of this process so far (page faults on fresh memory show up here)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


def _cpu_timed(module: Any, name: str, into: dict[str, float]) -> None:
    """Wrap ``module.name`` to add its process CPU seconds to ``into[name]`` (the system part of
    them to ``into[name + "_sys"]``)."""
    original = getattr(module, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        cpu, system = time.process_time(), _sys_s()
        try:
            return original(*args, **kwargs)
        finally:
            into[name] = into.get(name, 0.0) + time.process_time() - cpu
            into[name + "_sys"] = into.get(name + "_sys", 0.0) + _sys_s() - system

    setattr(module, name, timed)


def _cache_bytes(cache: Any) -> int:
    """Bytes held by every layer's keys and values in a transformers cache (the storage under
    them: a view of a larger buffer counts the whole buffer, once)."""
    storages: dict[int, int] = {}
    for layer in getattr(cache, "layers", ()):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if tensor is not None and hasattr(tensor, "untyped_storage"):
                storage = tensor.untyped_storage()
                storages[storage.data_ptr()] = int(storage.nbytes())
    return sum(storages.values())


def _kv_measured(module: Any, into: dict[str, float]) -> None:
    """Wrap ``module.scores_from_cache`` to keep the largest cache it grew (one batch's, grown by
    the class names' tokens), in ``into["kv_cache_bytes"]``."""
    original = module.scores_from_cache

    def measured(*args: Any, **kwargs: Any) -> Any:
        try:
            return original(*args, **kwargs)
        finally:
            into["kv_cache_bytes"] = max(into.get("kv_cache_bytes", 0), _cache_bytes(args[4]))

    module.scores_from_cache = measured


def run_full(args: argparse.Namespace, per_class: bool = False) -> dict[str, Any]:
    """The engine; ``per_class`` switches the cache continuation off (one more full forward per
    multi-token class and batch, the fallback path)."""
    from pytest_mllmprobe import answer, extract, probes
    from pytest_mllmprobe.engine import evaluate

    cpu: dict[str, float] = {}
    _cpu_timed(extract, "extract", cpu)
    _cpu_timed(probes, "fit_probes", cpu)
    kv: dict[str, float] = {}
    _kv_measured(extract, kv)
    _cpu_timed(extract, "scores_from_cache", cpu)  # inside extract: the names' continuation
    _cpu_timed(extract, "scores_by_continuation", cpu)  # the per-class path's extra forwards
    if per_class:
        answer.NO_CACHE_CONTINUATION = answer.NO_CACHE_CONTINUATION | {"llava"}

    start = time.perf_counter()
    the_plan = _plan(args)
    plan_s = time.perf_counter() - start
    start = time.perf_counter()
    result = evaluate(the_plan, the_plan.models[0])
    total_s = time.perf_counter() - start
    timings = dict(result.timings)
    n = len(the_plan.dataset)
    # the pooled loci: not the answer, not the logit lens's (read from the last-token features)
    widths = [locus.dim for name, locus in result.loci.items() if name != "answer" and not name.startswith("lens.")]
    return {
        "plan_s": plan_s, "load_s": timings.get("load_s", 0.0), "forward_s": timings.get("extract_s", 0.0),
        "probe_s": timings.get("probe_s", 0.0), "evaluate_s": total_s, "timings": timings,
        "forward_cpu_s": cpu.get("extract", 0.0), "probe_cpu_s": cpu.get("fit_probes", 0.0),
        "forward_sys_s": cpu.get("extract_sys", 0.0),
        "answer_cpu_s": cpu.get("scores_from_cache", 0.0) + cpu.get("scores_by_continuation", 0.0),
        "loci": len(widths), "pooled_bytes": int(4 * n * sum(widths)), "n_images": n,
        "profile": getattr(result, "profile", None), "kv_cache_bytes": int(kv.get("kv_cache_bytes", 0)),
        "name_tokens": [len(c) for c in _continuations(the_plan, args)],
    }


def _continuations(the_plan: Any, args: argparse.Namespace) -> list[list[int]]:
    """The class names' tokens as the engine scores them."""
    from transformers import AutoProcessor

    from pytest_mllmprobe.answer import class_continuations
    from pytest_mllmprobe.prompts import DEFAULT_QUESTION, build_prompt

    processor = AutoProcessor.from_pretrained(args.model)
    names = list(the_plan.dataset.display_names)
    prompt = build_prompt(processor, names, the_plan.dataset.prompt or DEFAULT_QUESTION)
    return class_continuations(processor.tokenizer, prompt, names)


def run_naive(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    the_plan = _plan(args)
    loaded, load_s = _load(the_plan, args)
    model = loaded.model
    stage_map = the_plan.models[0].stage_map
    tower = model.get_submodule(stage_map.vision_layers[0].rsplit(".", 3)[0])  # ...vision_model
    image_token = stage_map.image_token_id
    collected: dict[str, list[np.ndarray]] = {}

    def keep(name: str, value: Any) -> None:
        collected.setdefault(name, []).append(value.float().cpu().numpy())

    start, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for _, inputs in _batches(the_plan, loaded, args.batch_size):
            out = model(**inputs, output_hidden_states=True)
            vision = tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
            for i, hidden in enumerate(vision[1:]):
                keep(f"vision.{i}", hidden[:, 1:].mean(dim=1))
            projected = out.image_hidden_states  # a tensor, or one per image (transformers 5)
            if isinstance(projected, (list, tuple)):
                projected = torch.cat([p.reshape(-1, p.shape[-1]) for p in projected])
            keep("connector", projected.reshape(len(inputs["input_ids"]), -1, projected.shape[-1]).mean(dim=1))
            mask = (inputs["input_ids"] == image_token).unsqueeze(-1).float()
            for i, hidden in enumerate(out.hidden_states[1:]):
                keep(f"llm.{i}.image", (hidden * mask).sum(dim=1) / mask.sum(dim=1))
                keep(f"llm.{i}.last", hidden[:, -1])
            del out, vision
    _sync(loaded.device)
    forward_s, forward_cpu_s = time.perf_counter() - start, time.process_time() - cpu
    loci = {name: np.concatenate(parts) for name, parts in collected.items()}
    labels = the_plan.dataset.labels
    train, test = the_plan.train, the_plan.test
    start, cpu = time.perf_counter(), time.process_time()
    accuracy = {}
    for name, X in loci.items():
        scaler = StandardScaler().fit(X[train])
        probe = LogisticRegression(C=1.0, max_iter=2000).fit(scaler.transform(X[train]), labels[train])
        accuracy[name] = float((probe.predict(scaler.transform(X[test])) == labels[test]).mean())
    probe_s, probe_cpu_s = time.perf_counter() - start, time.process_time() - cpu
    return {"load_s": load_s, "forward_s": forward_s, "probe_s": probe_s, "loci": len(loci),
            "forward_cpu_s": forward_cpu_s, "probe_cpu_s": probe_cpu_s}


MODES = {"bare": run_bare, "lean": lambda args: run_bare(args, lean=True), "full": run_full, "naive": run_naive,
         "lean-multi": lambda args: run_bare(args, lean=True), "full-multi": run_full,
         "full-multi-per-class": lambda args: run_full(args, per_class=True)}


# -- orchestration ------------------------------------------------------------------------------
def build(workdir: Path, preset: dict[str, Any], images: int) -> tuple[Path, Path]:
    from pytest_mllmprobe.demo.synth import make_images, write_image_folder
    from pytest_mllmprobe.demo.tiny import save_model, tiny_llava

    model_dir, data_dir = workdir / "bench-llava", workdir / "data"
    if not (model_dir / "config.json").exists():
        model, processor = tiny_llava(
            "llava", vision_layers=preset["vision_layers"], text_layers=preset["text_layers"],
            vision_hidden=preset["vision_hidden"], text_hidden=preset["text_hidden"],
            image_size=preset["image_size"], patch_size=preset["patch_size"], seed=0,
        )
        save_model(model, processor, model_dir)
        del model
    if not data_dir.exists():
        per_class = -(-images // 3)
        write_image_folder(make_images(per_class, size=preset["image_size"], seed=0), data_dir)
    names = "\n".join(f"  {name}: {spoken}" for name, spoken in MULTI_NAMES.items())
    (workdir / "data-multi.yaml").write_text(f"source: {data_dir.name}\ndisplay_names:\n{names}\n")
    return model_dir, data_dir


def measured(command: list[str], what: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one measured subprocess; the figures of its last ``RESULT`` line (shared by the
    benchmarks that import this one)."""
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", **(env or {})}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{what} run failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len(RESULT):])


def mode_command(script: str, mode: str, args: argparse.Namespace, model_dir: Path, data: Path) -> list[str]:
    """The command of one ``--mode`` run of ``script`` (this benchmark's options)."""
    return [
        sys.executable, script, "--mode", mode, "--model", str(model_dir), "--data", str(data),
        "--images", str(args.images), "--batch-size", str(args.batch_size), "--device", args.device,
        "--dtype", args.dtype, *(["--threads", str(args.threads)] if args.threads else []),
    ]


def measure(mode: str, args: argparse.Namespace, model_dir: Path, data_dir: Path) -> dict[str, Any]:
    data = data_dir.parent / "data-multi.yaml" if mode in GROUPS["multi"] else data_dir
    return measured(mode_command(__file__, mode, args, model_dir, data), mode)


def interleaved(modes: Any, args: argparse.Namespace, preset: dict[str, Any], measure_one: Any,
                report_runs: Any, key: str = "forward_s") -> dict[str, Any]:
    """Build the model and images (in ``--workdir`` or a temporary folder), run every mode
    ``--repeats`` times interleaved, so that a busy spell hits every run alike, report the
    fastest of each by ``key`` and write every trial to ``--json``."""
    with tempfile.TemporaryDirectory(prefix="mllmprobe-bench-") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        model_dir, data_dir = build(workdir, preset, args.images)
        print(f"built model and {args.images} images in {time.perf_counter() - start:.1f}s", file=sys.stderr)
        load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        trials: dict[Any, list[dict[str, Any]]] = {mode: [] for mode in modes}
        for _ in range(args.repeats):
            for mode in trials:
                trials[mode].append(measure_one(mode, args, model_dir, data_dir))
    runs = {mode: min(found, key=lambda r: r[key]) for mode, found in trials.items()}
    summary = report_runs(runs, args)
    print(f"best of {args.repeats} interleaved runs; {key} per run: "
          + ", ".join(f"{m} {[round(r[key], 2) for r in found]}" for m, found in trials.items())
          + f"; load average {load_before} before, "
          f"{os.getloadavg()[0] if hasattr(os, 'getloadavg') else None} after", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "trials": trials}, indent=1, default=str))
    return summary


def _report_single(runs: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, float]:
    """The single-token table; its ratios."""
    bare, lean, full, naive = runs["bare"], runs["lean"], runs["full"], runs["naive"]
    full_total = full["forward_s"] + full["probe_s"]
    naive_total = naive["forward_s"] + naive["probe_s"]
    headroom_mb = 2 * full["pooled_bytes"] / 2**20
    rss_budget, lean_budget = bare["peak_rss_mb"] + headroom_mb, lean["peak_rss_mb"] + headroom_mb
    ratios = {
        "full_over_bare": full["forward_s"] / bare["forward_s"],
        "full_with_probes_over_bare": full_total / bare["forward_s"],
        "naive_over_full": naive_total / full_total,
        "naive_forward_over_full_forward": naive["forward_s"] / full["forward_s"],
        "full_peak_rss_mb": full["peak_rss_mb"],
        "rss_budget_mb": rss_budget,
        "full_rss_over_budget": full["peak_rss_mb"] / rss_budget,
        "probe_over_bare": full["probe_s"] / bare["forward_s"],
        # the same three against the lean bare forward (no KV cache, last-position logits)
        "full_over_lean": full["forward_s"] / lean["forward_s"],
        "lean_rss_budget_mb": lean_budget,
        "full_rss_over_lean_budget": full["peak_rss_mb"] / lean_budget,
        "cpu_full_over_bare": full["forward_cpu_s"] / bare["forward_cpu_s"],
        "cpu_naive_over_full": (naive["forward_cpu_s"] + naive["probe_cpu_s"])
        / (full["forward_cpu_s"] + full["probe_cpu_s"]),
        "cpu_probe_over_bare": full["probe_cpu_s"] / bare["forward_cpu_s"],
    }
    rows = [
        ("bare forward", bare["load_s"], bare["forward_s"], None, bare["forward_s"], bare["peak_rss_mb"], bare),
        ("bare, lean", lean["load_s"], lean["forward_s"], None, lean["forward_s"], lean["peak_rss_mb"], lean),
        ("full engine", full["load_s"], full["forward_s"], full["probe_s"], full_total, full["peak_rss_mb"], full),
        ("naive reference", naive["load_s"], naive["forward_s"], naive["probe_s"], naive_total,
         naive["peak_rss_mb"], naive),
    ]
    print(f"\n{args.size}: {full['n_images']} images, batch {args.batch_size}, {full['loci']} loci, "
          f"device {args.device}, {os.cpu_count()} CPUs, torch threads {runs['bare'].get('threads')}")
    print(f"{'run':<16} {'load s':>7} {'forward s':>10} {'probes s':>9} {'total s':>8} {'peak RSS MB':>12} "
          f"{'fwd CPU s':>10} {'probe CPU s':>12}")
    for name, load_s, forward_s, probe_s, total_s, rss, run in rows:
        probes = "-" if probe_s is None else f"{probe_s:.2f}"
        probe_cpu = f"{run['probe_cpu_s']:.2f}" if "probe_cpu_s" in run else "-"
        print(f"{name:<16} {load_s:>7.2f} {forward_s:>10.2f} {probes:>9} {total_s:>8.2f} {rss:>12.0f} "
              f"{run['forward_cpu_s']:>10.2f} {probe_cpu:>12}")
    print(f"pooled features: {full['pooled_bytes'] / 2**20:.1f} MB; "
          f"RSS budget (bare peak + 2x pooled): {rss_budget:.0f} MB; lean: {lean_budget:.0f} MB")
    return ratios


def _report_multi(runs: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, float]:
    """The multi-token table; its ratios (against the lean forward over the same prompt)."""
    lean, full, per_class = runs["lean-multi"], runs["full-multi"], runs["full-multi-per-class"]
    kv_mb, pooled_mb = full["kv_cache_bytes"] / 2**20, full["pooled_bytes"] / 2**20
    budget = lean["peak_rss_mb"] + 2 * pooled_mb + kv_mb
    ratios = {
        "multi_full_over_lean": full["forward_s"] / lean["forward_s"],
        "multi_per_class_over_lean": per_class["forward_s"] / lean["forward_s"],
        "multi_per_class_over_full": per_class["forward_s"] / full["forward_s"],
        "cpu_multi_full_over_lean": full["forward_cpu_s"] / lean["forward_cpu_s"],
        "cpu_multi_answer_over_lean": full.get("answer_cpu_s", 0.0) / lean["forward_cpu_s"],
        "multi_full_peak_rss_mb": full["peak_rss_mb"],
        "multi_kv_cache_mb": kv_mb,
        "multi_rss_budget_mb": budget,
        "multi_full_rss_over_budget": full["peak_rss_mb"] / budget,
    }
    if "full" in runs:
        ratios["multi_full_over_single_full"] = full["forward_s"] / runs["full"]["forward_s"]
    print(f"\nmulti-token class names {full['name_tokens']} tokens ({', '.join(MULTI_NAMES.values())})")
    print(f"{'run':<22} {'load s':>7} {'forward s':>10} {'probes s':>9} {'peak RSS MB':>12} {'fwd CPU s':>10} "
          f"{'of it sys':>10} {'answer CPU s':>13}")
    named = (("bare, lean (multi)", lean), ("full, cache (multi)", full), ("full, per class (multi)", per_class))
    for name, run in named:
        probes = f"{run['probe_s']:.2f}" if "probe_s" in run else "-"
        answer = f"{run['answer_cpu_s']:.2f}" if "answer_cpu_s" in run else "-"
        system = f"{run['forward_sys_s']:.2f}" if "forward_sys_s" in run else "-"
        print(f"{name:<22} {run['load_s']:>7.2f} {run['forward_s']:>10.2f} {probes:>9} {run['peak_rss_mb']:>12.0f} "
              f"{run['forward_cpu_s']:>10.2f} {system:>10} {answer:>13}")
    print("answer CPU s: the class names' continuations (cache) or extra full forwards (per class), inside fwd CPU s")
    print(f"KV cache of one batch (grown by the names' tokens): {kv_mb:.1f} MB; "
          f"RSS budget (lean peak + 2x pooled + KV cache): {budget:.0f} MB")
    return ratios


def report(runs: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Both tables (for the groups that ran) and one JSON line with every ratio."""
    ratios: dict[str, float] = {}
    first = runs.get("full") or runs["full-multi"]
    if "full" in runs:
        ratios.update(_report_single(runs, args))
    if "full-multi" in runs:
        ratios.update(_report_multi(runs, args))
    summary = {"size": args.size, "images": first["n_images"], "batch_size": args.batch_size,
               "threads": first.get("threads"), "names": args.names,
               "device": args.device, "cpus": os.cpu_count(), "machine": platform.machine(),
               **{k: round(v, 4) for k, v in ratios.items()}}
    print(json.dumps(summary))
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(PRESETS), default="small")
    parser.add_argument("--images", type=int, default=None, help="default: the preset's")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--device", default=None, help="default: cpu (small), cuda (large)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in every run (default: torch's); 1 makes CPU seconds robust on a busy machine")
    parser.add_argument("--repeats", type=int, default=1,
                        help="interleaved runs of each, the fastest counting (default 1; 3 for figures to quote)")
    parser.add_argument("--names", choices=("single", "multi", "both"), default="both",
                        help="class names of one token, of 2-4 tokens, or both side by side (default)")
    parser.add_argument("--json", default=None, help="also write every run's figures to this file")
    parser.add_argument("--workdir", default=None, help="keep the model and images here (default: a temp dir)")
    parser.add_argument("--mode", choices=sorted(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    preset = PRESETS[args.size]
    args.images = args.images or preset["images"]
    args.batch_size = args.batch_size or preset["batch_size"]
    args.device = args.device or ("cuda" if args.size == "large" else "cpu")
    if args.mode:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        result = MODES[args.mode](args)
        result["peak_rss_mb"] = _peak_rss_mb()
        result["threads"] = torch.get_num_threads()
        if args.device.startswith("cuda"):
            result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
        print(RESULT + json.dumps(result, default=str))
        return
    groups = ("single", "multi") if args.names == "both" else (args.names,)
    interleaved([mode for group in groups for mode in GROUPS[group]], args, preset, measure, report)


if __name__ == "__main__":
    main()
