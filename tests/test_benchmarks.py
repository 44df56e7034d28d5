"""The benchmark scripts run end to end in their CI-sized form.

Their figures are not asserted (speed and memory goals are benchmarks, not timed tests; the
achieved figures are in docs/performance.md); what is checked is that each script runs, measures
what it says and prints the JSON line its documentation promises.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _json_line(text: str) -> dict:
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def test_extraction_benchmark_runs_in_ci_size(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_extraction.py"), "--size", "ci", "--repeats", "1",
         "--threads", "1", "--workdir", str(tmp_path), "--json", str(tmp_path / "runs.json")],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = _json_line(done.stdout)
    assert summary["size"] == "ci" and summary["threads"] == 1 and summary["device"] == "cpu"
    for key in ("full_over_bare", "naive_over_full", "full_rss_over_budget", "probe_over_bare",
                "full_over_lean", "full_rss_over_lean_budget"):
        assert math.isfinite(summary[key]) and summary[key] > 0, (key, summary[key])
    for line in ("bare forward", "bare, lean", "full engine", "naive reference"):
        assert line in done.stdout
    runs = {mode: found[0] for mode, found in json.loads((tmp_path / "runs.json").read_text())["trials"].items()}
    # 2 vision blocks + the connector + 2 decoder layers x (image mean, last token)
    assert runs["full"]["loci"] == runs["naive"]["loci"] == 7
    n = runs["full"]["n_images"]
    assert runs["full"]["pooled_bytes"] == 4 * n * (2 * 32 + 64 + 2 * 2 * 64)
    assert np.isclose(summary["rss_budget_mb"], runs["bare"]["peak_rss_mb"] + 2 * runs["full"]["pooled_bytes"] / 2**20,
                      atol=1e-3)
    assert summary["probe_over_bare"] == round(runs["full"]["probe_s"] / runs["bare"]["forward_s"], 4)
    assert summary["full_over_lean"] == round(runs["full"]["forward_s"] / runs["lean"]["forward_s"], 4)
    # multi-token class names, side by side in the same run: 2, 3 and 4 tokens, the cache continued
    for line in ("bare, lean (multi)", "full, cache (multi)", "full, per class (multi)"):
        assert line in done.stdout
    assert sorted(runs["full-multi"]["name_tokens"]) == [2, 3, 4] and runs["full"]["name_tokens"] == [1, 1, 1]
    assert runs["full-multi"]["kv_cache_bytes"] > 0 and runs["full-multi-per-class"]["kv_cache_bytes"] == 0
    assert runs["full"]["kv_cache_bytes"] == 0  # single-token names build no cache
    multi_ratio = runs["full-multi"]["forward_s"] / runs["lean-multi"]["forward_s"]
    assert summary["multi_full_over_lean"] == round(multi_ratio, 4)
    assert np.isclose(summary["multi_rss_budget_mb"], runs["lean-multi"]["peak_rss_mb"]
                      + 2 * runs["full-multi"]["pooled_bytes"] / 2**20 + runs["full-multi"]["kv_cache_bytes"] / 2**20,
                      atol=1e-3)


def test_probe_benchmark_runs_and_compares_with_sklearn(capsys) -> None:
    spec = importlib.util.spec_from_file_location("bench_probes", BENCHMARKS / "bench_probes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--loci", "4", "--samples", "150", "--width", "16", "--device", "cpu"])
    summary = _json_line(capsys.readouterr().out)
    assert (summary["loci"], summary["samples"], summary["width"], summary["train"]) == (4, 150, 16, 120)
    assert {"linear_s", "sklearn_s", "mlp_s"} <= set(summary)
    # planted signal: all three probes read it well above chance (1/3); linear within one test image of sklearn
    for kind in ("linear", "sklearn", "mlp"):
        assert summary[f"{kind}_mean_accuracy"] > 0.6, summary
    assert summary["max_accuracy_gap_linear_vs_sklearn"] <= 1 / 30 + 1e-9


def test_seed_spread_benchmark_runs(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_seed_spread.py"), "--seeds", "2"],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = _json_line(done.stdout)
    assert summary["seeds"] == 2 and set(summary["spread_ratio"]) == {"FHS_V", "FHS_C", "FHS_L", "P_final"}
    assert summary["probe_s_folds"] > 0 and summary["probe_s_one_split"] > 0
    assert "one split (0.3)" in done.stdout and "5 folds (default)" in done.stdout


def test_selection_benchmark_runs_in_ci_size(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_selection.py"), "--size", "ci", "--threads", "1",
         "--workdir", str(tmp_path), "--json", str(tmp_path / "runs.json")],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = _json_line(done.stdout)
    assert summary["size"] == "ci" and summary["threads"] == 1 and summary["target"] == 1.1
    for line in ("bare forward", "vision tower (bare, stopped)", "engine, -k vision", "vision_select_over_vision_share"):
        assert line in done.stdout
    runs = {mode: found[0] for mode, found in json.loads((tmp_path / "runs.json").read_text())["trials"].items()}
    chosen = runs["select"]
    # the ci model: 2 vision blocks; -k vision reads them and nothing past the vision tower
    assert chosen["loci"] == ["vision.0", "vision.1"] and chosen["decoder_calls"] == summary["decoder_calls"] == 0
    assert chosen["tests"] == ["stage.vision", "vision.0", "vision.1"] and chosen["skipped"][-1] == "answer"
    assert summary["vision_select_over_vision_share"] == round(chosen["forward_s"] / runs["vision"]["forward_s"], 4)
    assert summary["vision_share_of_bare"] == round(runs["vision"]["forward_s"] / runs["bare"]["forward_s"], 4)
    assert 0 < summary["vision_share_of_bare"] and math.isfinite(summary["vision_select_over_bare"])


def test_distributed_benchmark_runs_in_ci_size(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_distributed.py"), "--size", "ci", "--workdir", str(tmp_path),
         "--json", str(tmp_path / "runs.json")],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = _json_line(done.stdout)
    assert summary["ranks"] == 2 and summary["threads"] == 1 and summary["images"] == 24
    trials = json.loads((tmp_path / "runs.json").read_text())["trials"]
    one, two = trials["1"][0], trials["2"][0]
    assert "ranks" not in one["timings"] and two["timings"]["ranks"] == 2
    assert two["extraction_s"] == two["timings"]["extract_s"] + two["timings"]["rank_wait_s"] + two["timings"]["gather_s"]
    assert summary["extraction_speedup"] == round(one["extraction_s"] / two["extraction_s"], 4)
    for line in ("1 process(es) x 1 thread(s)", "2 process(es) x 1 thread(s)"):
        assert line in done.stdout
