"""The feature cache: exact round trips, atomic writes, loud-but-safe corruption, one extraction per key."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pytest

from pytest_mllmprobe import cache
from pytest_mllmprobe.cache import (
    CacheWarning, cached_features, entry_paths, feature_key, load_features, locked, model_fingerprint,
    save_features,
)
from pytest_mllmprobe.extract import Features

KEY = "a" * 64


def features(seed: int = 0, n: int = 6) -> Features:
    rng = np.random.default_rng(seed)
    loci = {
        "vision.0": rng.normal(size=(n, 4)).astype(np.float32),
        "connector": rng.normal(size=(n, 8)).astype(np.float32),
        "llm.0.image": rng.normal(size=(n, 8)).astype(np.float32),
        "llm.0.last": np.full((n, 8), np.nan, dtype=np.float32),  # NaN loci survive as NaN
    }
    return Features(loci=loci, answer_scores=rng.normal(size=(n, 3)).astype(np.float32))


def assert_same(a: Features, b: Features) -> None:
    assert list(a.loci) == list(b.loci)
    for name in a.loci:
        np.testing.assert_array_equal(a.loci[name], b.loci[name])
        assert a.loci[name].dtype == b.loci[name].dtype
    np.testing.assert_array_equal(a.answer_scores, b.answer_scores)


def test_round_trip_keeps_every_array_its_order_and_the_meta(tmp_path: Path) -> None:
    original = features()
    save_features(tmp_path, KEY, original, {"model": "demo", "batch_size": 8})
    assert_same(load_features(tmp_path, KEY), original)
    sidecar = json.loads(entry_paths(tmp_path, KEY)[1].read_text())
    assert sidecar["meta"] == {"model": "demo", "batch_size": 8}
    assert sidecar["loci"] == list(original.loci) and sidecar["n_images"] == 6


def test_a_missing_entry_is_none_without_a_warning(tmp_path: Path, recwarn: pytest.WarningsRecorder) -> None:
    assert load_features(tmp_path, KEY) is None
    assert load_features(tmp_path / "not-made-yet", KEY) is None
    assert not recwarn.list


def test_entries_are_never_pickles(tmp_path: Path) -> None:
    save_features(tmp_path, KEY, features())
    with np.load(entry_paths(tmp_path, KEY)[0], allow_pickle=False) as stored:
        assert all(stored[name].dtype != object for name in stored.files)


def test_writes_leave_no_temporary_files(tmp_path: Path) -> None:
    save_features(tmp_path, KEY, features(0))
    save_features(tmp_path, KEY, features(1))  # overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{KEY}.json", f"{KEY}.npz"]


def test_a_write_that_fails_midway_leaves_the_old_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = features(0)
    save_features(tmp_path, KEY, old)

    def half_a_write(fh, **arrays):
        fh.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(cache.np, "savez", half_a_write)
    with pytest.raises(KeyboardInterrupt):
        save_features(tmp_path, KEY, features(1))
    monkeypatch.undo()
    assert_same(load_features(tmp_path, KEY), old)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{KEY}.json", f"{KEY}.npz"]


def _crash_while_writing(cache_dir: str) -> None:
    def die(fh, **arrays):
        fh.write(b"PK\x03\x04 half a zip")
        fh.flush()
        os._exit(3)  # a killed process: no cleanup runs

    cache.np.savez = die
    save_features(cache_dir, KEY, features(1))


def test_a_process_killed_mid_write_leaves_the_old_entry(tmp_path: Path) -> None:
    old = features(0)
    save_features(tmp_path, KEY, old)
    child = multiprocessing.get_context("spawn").Process(target=_crash_while_writing, args=(str(tmp_path),))
    child.start()
    child.join(60)
    assert child.exitcode == 3
    assert_same(load_features(tmp_path, KEY), old)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "no-sidecar", "wrong-sidecar"])
def test_a_corrupt_entry_is_none_with_a_warning_naming_the_file(tmp_path: Path, damage: str) -> None:
    save_features(tmp_path, KEY, features())
    arrays_path, meta_path = entry_paths(tmp_path, KEY)
    if damage == "truncate":
        data = arrays_path.read_bytes()
        arrays_path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        arrays_path.write_bytes(b"\x00" * 100)
    elif damage == "no-sidecar":
        meta_path.unlink()
    else:
        sidecar = json.loads(meta_path.read_text())
        sidecar["loci"] = ["vision.0"]
        meta_path.write_text(json.dumps(sidecar))
    with pytest.warns(CacheWarning, match=str(arrays_path).replace("\\", "\\\\") + ".*recomputed"):
        assert load_features(tmp_path, KEY) is None


def test_a_corrupt_entry_is_recomputed_and_replaced(tmp_path: Path) -> None:
    save_features(tmp_path, KEY, features(0))
    arrays_path = entry_paths(tmp_path, KEY)[0]
    arrays_path.write_bytes(arrays_path.read_bytes()[:50])
    with pytest.warns(CacheWarning):
        got, hit = cached_features(tmp_path, KEY, lambda: features(1))
    assert not hit
    assert_same(got, features(1))
    assert_same(load_features(tmp_path, KEY), features(1))


def test_the_key_changes_with_each_input() -> None:
    extraction = {"batch_size": 8, "dtype": "float32", "prompt": "Classify.", "classes": ["a", "b"]}
    base = feature_key("model", "data", extraction)
    assert len(base) == 64 and base == feature_key("model", "data", dict(reversed(extraction.items())))
    variants = [
        feature_key("model2", "data", extraction),
        feature_key("model", "data2", extraction),
        *(feature_key("model", "data", {**extraction, name: value}) for name, value in
          [("batch_size", 4), ("dtype", "bfloat16"), ("prompt", "Classify!"), ("classes", ["b", "a"])]),
        feature_key("model", "data", {**extraction, "transformers": "5.0"}),
    ]
    assert base not in variants and len(set(variants)) == len(variants)


def test_the_model_fingerprint_follows_config_and_weights(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 8}')
    (model / "model.safetensors").write_bytes(b"\x01" * 1000)
    (model / "README.md").write_text("notes")
    first = model_fingerprint(model)
    assert model_fingerprint(str(model)) == first
    (model / "README.md").write_text("other notes")  # not part of the model
    assert model_fingerprint(model) == first
    (model / "config.json").write_text('{"hidden_size": 16}')
    second = model_fingerprint(model)
    assert second != first
    (model / "model.safetensors").write_bytes(b"\x02" * 1000)  # same size, new content
    assert model_fingerprint(model) != second
    assert model_fingerprint("demo") == model_fingerprint("demo") != first
    assert model_fingerprint("some-org/not-downloaded") != model_fingerprint("some-org/other")


def _slow_extraction(cache_dir: str, log: str, barrier) -> None:
    barrier.wait(60)  # both processes ask for the key at the same moment

    def compute() -> Features:
        with open(log, "a") as fh:
            fh.write("extracted\n")
        time.sleep(1.0)
        return features(7)

    got, _ = cached_features(cache_dir, KEY, compute)
    assert_same(got, features(7))


def test_the_lock_lets_one_of_two_processes_extract(tmp_path: Path) -> None:
    log = tmp_path / "log.txt"
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    workers = [
        ctx.Process(target=_slow_extraction, args=(str(tmp_path / "cache"), str(log), barrier)) for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert [w.exitcode for w in workers] == [0, 0]
    assert log.read_text() == "extracted\n"


def test_the_lock_is_released_after_an_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with locked(tmp_path, KEY):
            raise RuntimeError("extraction failed")
    with locked(tmp_path, KEY):  # would block forever if still held (flock is per open file)
        pass


def test_no_cache_dir_always_computes() -> None:
    calls = []
    got, hit = cached_features(None, KEY, lambda: calls.append(1) or features())
    assert not hit and calls == [1]
    assert_same(got, features())


def test_the_engine_key_ignores_probe_settings_and_follows_extraction_settings() -> None:
    from pytest_mllmprobe.cache import extraction_key
    from pytest_mllmprobe.engine import plan
    from pytest_mllmprobe.settings import Settings

    def key(**options) -> str:
        the_plan = plan(Settings(models=("demo",), **options))
        return extraction_key(the_plan, the_plan.models[0])[0]

    base = key()
    assert key() == base
    assert key(probe="mlp", test_size=0.4, seed=0, metric="balanced_accuracy", folds=3) == base
    assert key(batch_size=4) != base
    assert key(dtype="bfloat16") != base
    assert key(max_samples=60) != base  # another subset of the data
