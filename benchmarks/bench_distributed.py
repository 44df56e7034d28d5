"""Data-parallel extraction: torchrun with N CPU processes against one process, side by side.

    python benchmarks/bench_distributed.py                 # small preset, 2 ranks x 1 thread against 1 x 1
    python benchmarks/bench_distributed.py --size ci       # seconds: does it run (tests use it)
    python benchmarks/bench_distributed.py --ranks 4 --threads 2

Builds the same random-init LLaVA and synthetic images as ``bench_extraction.py`` (its presets),
then runs ``pytest_mllmprobe.run`` (one split, no control task, no intervals: the extraction is
what is measured) in a fresh process, and the same under ``torchrun --standalone
--nproc-per-node N``, each process with ``--threads`` torch threads, repeated and interleaved
(the fastest counts). The extraction time of the distributed run is rank 0's own share, plus its
wait for the slowest rank, plus the gather (``extract_s + rank_wait_s + gather_s`` of its
timings); model loading, which every rank does at the same time, is reported apart. Prints a
table and one JSON line; the target on a 2-core machine is a speed-up of at least 1.7 with 2
ranks of 1 thread.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_extraction import PRESETS, RESULT, interleaved, measured  # noqa: E402  (the sibling script's helpers)


def worker(args: argparse.Namespace) -> None:
    """One rank (or the only process): the engine on the benchmark model; rank 0 prints."""
    import torch

    torch.set_num_threads(args.threads)
    from pytest_mllmprobe import run

    start = time.perf_counter()
    results = run(str(args.model), str(args.data), max_samples=args.images, batch_size=args.batch_size,
                  device="cpu", folds=1, permutations=0, bootstrap=0, cache_dir=None)
    wall = time.perf_counter() - start
    if results is None:  # a serving rank
        return
    timings = next(iter(results.models.values())).timings
    extraction = timings["extract_s"] + timings.get("rank_wait_s", 0.0) + timings.get("gather_s", 0.0)
    print(RESULT + json.dumps({"timings": timings, "extraction_s": extraction, "wall_s": wall,
                               "threads": torch.get_num_threads(), "n_images": results.data["n_images"]}))


def measure(ranks: int, args: argparse.Namespace, model_dir: Path, data_dir: Path) -> dict[str, Any]:
    script = [str(Path(__file__).resolve()), "--mode", "worker", "--model", str(model_dir), "--data", str(data_dir),
              "--images", str(args.images), "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    if ranks == 1:
        command = [sys.executable, *script]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", *script]
    start = time.perf_counter()
    found = measured(command, f"{ranks}-rank", env={"OMP_NUM_THREADS": str(args.threads)})
    found["process_s"] = time.perf_counter() - start  # interpreter start and imports included
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(PRESETS), default="small")
    parser.add_argument("--images", type=int, default=None, help="default: the preset's")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--ranks", type=int, default=2, help="torchrun processes (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved runs of each, the fastest counting")
    parser.add_argument("--workdir", default=None, help="keep the model and images here (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write every trial to this file")
    parser.add_argument("--mode", choices=("worker",), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    preset = PRESETS[args.size]
    args.images = args.images or preset["images"]
    args.batch_size = args.batch_size or preset["batch_size"]
    if args.mode == "worker":
        worker(args)
        return
    interleaved([1, args.ranks], args, preset, measure, report, key="extraction_s")


def report(best: dict[int, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """The table of the fastest trial of each, and the speed-ups (one JSON line)."""
    one, many = best[1], best[args.ranks]
    print("| run | load s | extraction s (rank 0 own / wait / gather) | whole run s |")
    print("|---|---|---|---|")
    for ranks, found in best.items():
        t = found["timings"]
        parts = f"{t['extract_s']:.2f} / {t.get('rank_wait_s', 0.0):.2f} / {t.get('gather_s', 0.0):.2f}"
        print(f"| {ranks} process(es) x {args.threads} thread(s) | {t['load_s']:.2f} | "
              f"{found['extraction_s']:.2f} ({parts}) | {found['wall_s']:.2f} |")
    summary = {
        "size": args.size, "images": one["n_images"], "batch_size": args.batch_size, "ranks": args.ranks,
        "threads": args.threads, "cpus": os.cpu_count(), "repeats": args.repeats,
        "one_extraction_s": round(one["extraction_s"], 3), "ranks_extraction_s": round(many["extraction_s"], 3),
        "extraction_speedup": round(one["extraction_s"] / many["extraction_s"], 4),
        "whole_run_speedup": round(one["wall_s"] / many["wall_s"], 4),
    }
    print(json.dumps(summary))
    return summary

if __name__ == "__main__":
    main()
