"""Probe fitting at the scale of a real run: the batched torch probes against scikit-learn per locus.

    python benchmarks/bench_probes.py                    # 90 loci x 1,000 images x 512, CPU, ~2 min
    python benchmarks/bench_probes.py --size paper       # 90 loci x 5,000 x 4,096 on a GPU (the paper's scale)

A real run has about 90 loci (e.g. 32 vision blocks + connector + 28 decoder layers x 2
readouts). This script plants class signal of growing strength in ``--loci`` feature matrices
(``--samples`` x ``--width``, float32), splits them 80/20 stratified, and on one machine in one
run times:

* ``linear``  -- ``fit_probes(kind="linear")``: batched L-BFGS in torch, one locus at a time;
* ``sklearn`` -- ``LogisticRegression(C=1)`` per locus, the same standardisation (the naive
  reference's probe; skipped with ``--no-sklearn``);
* ``mlp``     -- ``fit_probes(kind="mlp")``: the paper's MLP recipe (20 epochs, batch 4, AdamW,
  cosine schedule) for all loci as one batched network.

Prints a table, the largest accuracy difference between ``linear`` and ``sklearn`` over the loci,
and one JSON line with the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import numpy as np

PRESETS: dict[str, dict[str, int]] = {
    "small": dict(loci=90, samples=1000, width=512, classes=3),
    "paper": dict(loci=90, samples=5000, width=4096, classes=3),
}


def planted(loci: int, samples: int, width: int, classes: int, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Loci whose class signal grows with the index: a class-dependent direction in noise."""
    rng = np.random.default_rng(seed)
    y = np.arange(samples) % classes
    directions = rng.normal(size=(classes, width)).astype(np.float32)
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    features = {}
    for i in range(loci):
        strength = 0.5 + 3.0 * i / max(1, loci - 1)
        X = rng.normal(size=(samples, width)).astype(np.float32)
        X += strength * directions[y]
        features[f"locus.{i}"] = X
    return features, y


def timed(fn: Any) -> tuple[Any, float, float]:
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - start, time.process_time() - cpu


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(PRESETS), default="small")
    parser.add_argument("--loci", type=int, default=None)
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--device", default=None, help="default: cuda when there is one, else cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--no-sklearn", action="store_true", help="skip the per-locus scikit-learn fits")
    parser.add_argument("--no-mlp", action="store_true", help="skip the MLP probes")
    args = parser.parse_args(argv)

    import torch

    from pytest_mllmprobe.data.splits import split_indices
    from pytest_mllmprobe.probes import fit_probes

    if args.threads:
        torch.set_num_threads(args.threads)
    # The first torch optimiser of a process imports torch._dynamo (about a second). transformers'
    # model classes import it too, so a plugin run has paid it before its probes: kept apart here.
    start = time.perf_counter()
    import torch._dynamo  # noqa: F401

    import_s = time.perf_counter() - start
    preset = dict(PRESETS[args.size])
    for key in ("loci", "samples", "width"):
        if getattr(args, key):
            preset[key] = getattr(args, key)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    features, y = planted(**preset)
    train, test = split_indices(y, test_size=0.2, seed=0)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    runs: dict[str, dict[str, float]] = {}
    scores: dict[str, Any] = {}
    kinds = [("linear", "linear", device)]
    if not args.no_sklearn:
        kinds.append(("sklearn", "sklearn", "cpu"))
    if not args.no_mlp:
        kinds.append(("mlp", "mlp", device))
    for label, kind, where in kinds:
        def fit(kind: str = kind, where: str = where) -> Any:
            result = fit_probes(features, y, train, test, kind=kind, device=where)
            sync()
            return result

        scores[label], wall, cpu = timed(fit)
        accuracies = [s.accuracy for s in scores[label].values()]
        runs[label] = {"wall_s": wall, "cpu_s": cpu, "device": where,
                       "mean_accuracy": float(np.mean(accuracies)), "min_accuracy": float(np.min(accuracies))}

    shape = f"{preset['loci']} loci x {len(train)} train / {len(test)} test images x {preset['width']} features"
    print(f"\n{args.size}: {shape}, {preset['classes']} classes; {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}")
    print(f"{'probe':<9} {'device':<8} {'wall s':>8} {'CPU s':>8} {'mean acc':>9} {'min acc':>8}")
    for label, run in runs.items():
        print(f"{label:<9} {run['device']:<8} {run['wall_s']:>8.2f} {run['cpu_s']:>8.2f} "
              f"{run['mean_accuracy']:>9.3f} {run['min_accuracy']:>8.3f}")
    print(f"left out: the one-off torch._dynamo import of the first torch optimiser, {import_s:.2f} s")
    summary: dict[str, Any] = {"size": args.size, **preset, "train": len(train), "device": device,
                               "threads": torch.get_num_threads(), "optimiser_import_s": round(import_s, 3)}
    for label, run in runs.items():
        summary[f"{label}_s"] = round(run["wall_s"], 3)
        summary[f"{label}_mean_accuracy"] = round(run["mean_accuracy"], 4)
    if "sklearn" in runs:
        gap = max(abs(scores["linear"][n].accuracy - scores["sklearn"][n].accuracy) for n in features)
        summary["sklearn_over_linear"] = round(runs["sklearn"]["wall_s"] / runs["linear"]["wall_s"], 2)
        summary["max_accuracy_gap_linear_vs_sklearn"] = round(gap, 4)
        print(f"largest accuracy difference linear vs sklearn over {len(features)} loci: {gap:.4f} "
              f"({gap * len(test):.0f} test image(s))")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
