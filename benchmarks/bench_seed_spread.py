"""How much the split seed moves the demo's stage scores: one split against the default folds.

    python benchmarks/bench_seed_spread.py               # split seeds 0..19, ~1 min on 2 CPU cores
    python benchmarks/bench_seed_spread.py --seeds 5     # quicker

The demo's features are extracted once (a feature cache in a temporary folder); each seed then
re-splits the images and refits the probes, side by side for ``folds=1`` (one 70/30 split, the
old default) and the default evaluation (5 grouped, stratified folds: every image tested once).
Prints, per stage score, min - max and the spread over the seeds for both, the ratio of the
spreads (the target: <= 0.5), the probe time per run for both, and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

SCORES = ("FHS_V", "FHS_C", "FHS_L", "P_final")


def measure(seeds: int, folds: int | None, cache: str, permutations: int) -> tuple[dict[str, list[float]], float]:
    import pytest_mllmprobe as pm

    values: dict[str, list[float]] = {k: [] for k in SCORES}
    probe_s = 0.0
    for seed in range(seeds):
        result = pm.run("demo", seed=seed, folds=folds, cache_dir=cache, permutations=permutations)["demo"]
        for key in SCORES:
            values[key].append(result.scores[key])
        probe_s += result.timings["probe_s"]
    return values, probe_s / seeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20, help="split seeds 0..N-1 (default: 20)")
    parser.add_argument("--permutations", type=int, default=0,
                        help="control-task permutations per run (default: 0, the spread does not depend on them)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        import pytest_mllmprobe as pm

        pm.run("demo", cache_dir=cache, permutations=0)  # extract once
        start = time.perf_counter()
        one, one_probe = measure(args.seeds, 1, cache, args.permutations)
        folded, folded_probe = measure(args.seeds, None, cache, args.permutations)
        elapsed = time.perf_counter() - start
    print(f"demo, split seeds 0..{args.seeds - 1}: stage scores, min - max (spread)")
    print(f"{'score':8} {'one split (0.3)':>26} {'5 folds (default)':>26} {'ratio':>7}")
    ratios = {}
    for key in SCORES:
        a, b = one[key], folded[key]
        spread_a, spread_b = max(a) - min(a), max(b) - min(b)
        ratios[key] = spread_b / spread_a if spread_a > 0 else 0.0
        print(f"{key:8} {min(a):>8.3f} - {max(a):.3f} ({spread_a:.3f}) {min(b):>8.3f} - {max(b):.3f} ({spread_b:.3f})"
              f" {ratios[key]:>7.2f}")
    print(f"probe time per run: one split {one_probe:.2f} s, 5 folds {folded_probe:.2f} s "
          f"({folded_probe / max(one_probe, 1e-9):.1f}x; the forward is not repeated)")
    print(json.dumps({
        "seeds": args.seeds, "spread_ratio": ratios, "max_spread_ratio": max(ratios.values()),
        "probe_s_one_split": one_probe, "probe_s_folds": folded_probe, "elapsed_s": elapsed,
    }))


if __name__ == "__main__":
    main()
