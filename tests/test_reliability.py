"""A gate that never turns itself off (issue 14).

* the project's ini is read whatever the spelling of the options (or the run stops saying why);
* malformed input of every kind ends with exit 4 and one short message, or a clean run: never a
  row of failing probe tests (exit 1), an INTERNALERROR (exit 3) or a screen of traceback;
* faults: a cache that cannot be written, a report writer killed half-way, a timed-out
  extraction, reruns.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from pytest_mllmprobe.demo import DEMO_DATA, DEMO_MODEL

from .conftest import subprocess_env

RUN = ("-p", "no:cacheprovider")
#: a floor no locus of the demo reaches: a run that reads this ini fails
FAILING_INI = "[pytest]\nmllm_thresholds = floor.yaml\n"
FLOOR_YAML = "version: 1\nlocus: {floor: 0.999}\n"


def _ret(result: pytest.RunResult) -> int:
    return int(result.ret)


def _text(result: pytest.RunResult) -> str:
    return result.stdout.str() + "\n" + result.stderr.str()


# -- 1. the project's ini is never skipped ----------------------------------------------------


@pytest.fixture
def project(pytester: pytest.Pytester) -> Path:
    """A project folder whose pytest.ini sets a threshold file that fails the demo."""
    root = pytester.mkdir("project")
    (root / "pytest.ini").write_text(FAILING_INI)
    (root / "floor.yaml").write_text(FLOOR_YAML)
    return root


@pytest.mark.parametrize("spelling", ["space", "space-rootdir", "addopts-space", "equals", "inifile-space"])
def test_the_project_ini_is_never_skipped(pytester: pytest.Pytester, project: Path,
                                          monkeypatch: pytest.MonkeyPatch, spelling: str) -> None:
    """Paths outside the project (the demo data lives in the installed package): the space form
    lets pytest pick its ini from them; the run stops with exit 4 instead of passing."""
    monkeypatch.chdir(project)
    data = str(DEMO_DATA)  # absolute, outside the project
    args = {
        "space": ["--mllm-model", "demo", "--mllm-data", data],
        "space-rootdir": ["--rootdir", str(project), "--mllm-model", "demo", "--mllm-data", data],
        "addopts-space": [],
        "equals": ["--mllm-model=demo", f"--mllm-data={data}"],
        "inifile-space": ["-c", "pytest.ini", "--mllm-model", "demo", "--mllm-data", data],
    }[spelling]
    if spelling == "addopts-space":
        monkeypatch.setenv("PYTEST_ADDOPTS", f"--mllm-model demo --mllm-data {data}")
    result = pytester.runpytest_subprocess(*args, *RUN)
    assert _ret(result) != 0, _text(result)
    if spelling in ("equals", "inifile-space"):  # the ini is read: its floor fails the loci
        assert _ret(result) == 1, _text(result)
        result.stdout.fnmatch_lines(["configfile: pytest.ini", "*floor*"])
    else:
        assert _ret(result) == 4, _text(result)
        result.stderr.fnmatch_lines([
            f"ERROR: pytest read * instead of {project / 'pytest.ini'}*--mllm-model=demo*",
        ])
        assert "Traceback" not in _text(result)


def test_the_space_form_is_fine_when_pytest_reads_the_project_ini(pytester: pytest.Pytester, project: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Paths inside the project lead pytest to the project's ini: no false refusal."""
    shutil.copytree(DEMO_DATA, project / "data")
    monkeypatch.chdir(project)
    result = pytester.runpytest_subprocess("--mllm-model", "demo", "--mllm-data", "data", *RUN)
    assert _ret(result) == 1, _text(result)
    result.stdout.fnmatch_lines(["configfile: pytest.ini"])


# -- 2. malformed input: exit 4 (one message) or a clean run ---------------------------------


def _model(root: Path) -> Path:
    target = root / "model"
    if not target.exists():
        shutil.copytree(DEMO_MODEL, target)
    return target


def _data(root: Path, n: int = 50) -> Path:
    """A copy of the demo data (``n`` images per class), to damage."""
    target = root / "data"
    if not target.exists():
        for folder in sorted(DEMO_DATA.iterdir()):
            (target / folder.name).mkdir(parents=True)
            for image in sorted(folder.iterdir())[:n]:
                shutil.copy(image, target / folder.name / image.name)
    return target


def _jpeg(path: Path, truncate: bool) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path, quality=90)
    if truncate:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) * 2 // 3])


def _model_args(root: Path) -> list[str]:
    return [f"--mllm-model={_model(root)}", f"--mllm-data={_data(root)}"]


def _demo_args(root: Path) -> list[str]:
    return ["--mllm-model=demo", f"--mllm-data={_data(root)}"]


def _write(root: Path, name: str, text: str) -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def _config(root: Path, edit: Callable[[dict], object]) -> list[str]:
    model = _model(root)
    config = json.loads((model / "config.json").read_text())
    edited = edit(config)
    (model / "config.json").write_text(json.dumps(config if edited is None else edited))
    return _model_args(root)


def _weights(root: Path, damage: str) -> list[str]:
    model = _model(root)
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "garbage-header":
        weights.write_bytes((64).to_bytes(8, "little") + b"{not json" + b" " * 55 + data[72:])
    elif damage == "empty":
        weights.write_bytes(b"")
    elif damage == "gone":
        weights.unlink()
    elif damage == "index-missing-shard":
        weights.rename(model / "model-00001-of-00002.safetensors")
        (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
            "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    elif damage == "index-not-json":
        weights.rename(model / "model-00001-of-00001.safetensors")
        (model / "model.safetensors.index.json").write_text("{weight_map: ")
    return _model_args(root)


def _image(root: Path, kind: str) -> list[str]:
    folder = _data(root) / "benign"
    if kind == "truncated-png":
        png = sorted(folder.glob("*.png"))[0].read_bytes()
        (folder / "broken.png").write_bytes(png[: len(png) // 2])
    elif kind == "empty-file":
        (folder / "empty.png").write_bytes(b"")
    elif kind == "text-as-png":
        (folder / "notes.png").write_text("not an image")
    elif kind in ("truncated-jpeg", "truncated-jpeg-skipped"):
        _jpeg(folder / "cut.jpg", truncate=True)
    elif kind == "case-twins":
        shutil.copytree(folder, folder.parent / "Benign")
    args = _demo_args(root)
    return [*args, "--mllm-skip-bad-images"] if kind == "truncated-jpeg-skipped" else args


def _manifest(root: Path, kind: str) -> list[str]:
    data = _data(root)
    rows = [f"{p.relative_to(data).as_posix()},{p.parent.name}" for p in sorted(data.rglob("*.png"))]
    if kind == "csv-no-label":
        path = _write(data, "labels.csv", "path\n" + "\n".join(r.split(",")[0] for r in rows) + "\n")
    elif kind == "csv-missing-file":
        path = _write(data, "labels.csv", "path,label\n" + "\n".join(rows + ["benign/ghost.png,benign"]) + "\n")
    elif kind == "csv-empty":
        path = _write(data, "labels.csv", "")
    elif kind == "csv-misspelt-column":
        path = _write(data, "labels.csv", "path,label,grup\n" + "\n".join(r + ",P1" for r in rows) + "\n")
    elif kind == "csv-duplicate-row":
        path = _write(data, "labels.csv", "path,label\n" + "\n".join(rows + rows[:1]) + "\n")
    elif kind == "jsonl-broken-line":
        lines = [json.dumps({"path": r.split(",")[0], "label": r.split(",")[1]}) for r in rows]
        path = _write(data, "labels.jsonl", "\n".join(lines[:5] + ['{"path": "benign/x.png", "lab'] + lines[5:]))
    else:
        raise AssertionError(kind)
    return ["--mllm-model=demo", f"--mllm-data={path}"]


def _npz(root: Path, kind: str) -> list[str]:
    path = root / "scans.npz"
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (12, 28, 28), dtype=np.uint8)
    labels = np.arange(12) % 3
    if kind == "object-arrays":
        ragged = np.empty(12, dtype=object)
        ragged[:] = [rng.integers(0, 255, (28, 20 + i), dtype=np.uint8) for i in range(12)]
        np.savez(path, images=ragged, labels=labels)  # np.load without pickle cannot read it
    elif kind == "multi-label":
        np.savez(path, images=images, labels=np.zeros((12, 3), dtype=int))
    elif kind == "not-a-zip":
        path.write_bytes(b"PK\x03\x04 this is not an archive")
    elif kind == "images-1d":
        np.savez(path, images=np.zeros(12), labels=labels)
    elif kind == "lengths-differ":
        np.savez(path, images=images, labels=labels[:7])
    elif kind == "float-labels":
        np.savez(path, images=images, labels=labels + 0.5)
    elif kind == "unknown-token-labels":  # classes "0", "1", "2": not words the demo tokenizer knows
        np.savez(path, images=np.repeat(images, 5, axis=0), labels=np.tile(labels, 5))
    else:
        raise AssertionError(kind)
    return ["--mllm-model=demo", f"--mllm-data={path}"]


def _yaml(root: Path, kind: str) -> list[str]:
    text = {
        "syntax": "version: 1\nlocus: {floor: [0.5\n",
        "unknown-key": "version: 1\nlocus: {flor: 0.5}\n",
        "out-of-range": "version: 1\nlocus: {floor: 1.5}\n",
        "top-level-list": "- version: 1\n",
        "wrong-version": "version: 7\n",
    }
    if kind == "dataset":
        data = _data(root)
        path = _write(root, "dataset.yaml", f"source: {data}\nclass_name: [benign, normal]\n")
        return ["--mllm-model=demo", f"--mllm-data={path}"]
    path = _write(root, "thresholds.yaml", text[kind])
    return [*_demo_args(root), f"--mllm-thresholds={path}"]


@functools.cache
def _saved_baseline() -> dict:
    """A baseline of the demo on a copy of its data, saved by the plugin (once per process)."""
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="mllm-baseline-"))
    path = root / "baseline.json"
    done = subprocess.run([sys.executable, "-m", "pytest", *_demo_args(root), f"--mllm-save-baseline={path}", *RUN,
                           "-q"], cwd=root, env=subprocess_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(path.read_text())


def _baseline(root: Path, kind: str) -> list[str]:
    """A real baseline of the demo data copy, then damaged."""
    path = root / "baseline.json"
    if kind == "not-json":
        path.write_text("{\"format\": ")
        return [*_demo_args(root), f"--mllm-baseline={path}"]
    doc = json.loads(json.dumps(_saved_baseline()))
    model = doc["models"]["demo"]
    extra: list[str] = []
    if kind == "no-data":
        del model["data"]
    elif kind == "no-loci":
        del model["loci"]
    elif kind == "old-version":
        doc["version"] = 1
    elif kind == "short-correct":
        first = next(iter(model["loci"].values()))
        first["correct"] = first["correct"][:3]
    elif kind == "wrong-type":
        model["scores"]["FHS_V"] = "good"
    elif kind == "other-probe":
        extra = ["--mllm-probe=mlp"]
    elif kind == "other-answer":
        extra = ["--mllm-answer=generate"]
    else:
        raise AssertionError(kind)
    path.write_text(json.dumps(doc))
    return [*_demo_args(root), f"--mllm-baseline={path}", *extra]


def _entry(root: Path, kind: str) -> list[str]:
    _write(root, "fzentry.py", """
        import numpy as np

        def wrong_type():
            return 42

        def names_not_a_list():
            return np.zeros((6, 8, 8)), [0, 1, 2, 0, 1, 2], 3

        def raises():
            raise RuntimeError("the database is down")

        def label_lists():
            return np.zeros((6, 8, 8)), [[0], [1], [2], [0], [1], [2]]
    """)
    return ["--mllm-model=demo", f"--mllm-data=fzentry:{kind}"]


def _cache(root: Path, kind: str) -> list[str]:
    """A cache entry damaged after a first run: the next run recomputes it (clean run)."""
    cache = root / "cache"
    args = [*_demo_args(root), f"--mllm-cache-dir={cache}"]
    subprocess.run([sys.executable, "-m", "pytest", *args, *RUN, "-q"], cwd=root, env=subprocess_env(),
                   check=True, capture_output=True)
    (entry,) = cache.glob("*.npz")
    if kind == "truncated":
        entry.write_bytes(entry.read_bytes()[:100])
    elif kind == "garbage":
        entry.write_bytes(b"\x00" * 4096)
    return args


#: name -> (build the input under the test folder and return the pytest args, exit code, message)
CASES: dict[str, tuple[Callable[[Path], list[str]], int, str]] = {
    # model config
    "config-not-json": (lambda r: _config(r, lambda c: "{"), 4, "cannot read its config"),
    "config-unknown-type": (lambda r: _config(r, lambda c: c.update(model_type="no_such_vlm")), 4, "no_such_vlm"),
    "config-a-list": (lambda r: _config(r, lambda c: [c]), 4, "--mllm-model"),
    # weights
    "weights-truncated": (lambda r: _weights(r, "truncated"), 4, "is truncated"),
    "weights-garbage-header": (lambda r: _weights(r, "garbage-header"), 4, "not valid safetensors JSON"),
    "weights-empty": (lambda r: _weights(r, "empty"), 4, "shorter than the 8-byte header"),
    "weights-gone": (lambda r: _weights(r, "gone"), 4, "holds no weights"),
    "weights-index-missing-shard": (lambda r: _weights(r, "index-missing-shard"), 4, "not in the folder"),
    "weights-index-not-json": (lambda r: _weights(r, "index-not-json"), 4, "not a valid index"),
    # images
    "image-truncated-png": (lambda r: _image(r, "truncated-png"), 4, "broken.png"),
    "image-empty-file": (lambda r: _image(r, "empty-file"), 4, "empty.png"),
    "image-text-as-png": (lambda r: _image(r, "text-as-png"), 4, "notes.png"),
    "image-truncated-jpeg": (lambda r: _image(r, "truncated-jpeg"), 4, "cut.jpg"),
    "image-truncated-jpeg-skipped": (lambda r: _image(r, "truncated-jpeg-skipped"), 0, "skipped 1"),
    "labels-case-twins": (lambda r: _image(r, "case-twins"), 4, "Benign"),
    # manifests
    "csv-no-label": (lambda r: _manifest(r, "csv-no-label"), 4, "label"),
    "csv-missing-file": (lambda r: _manifest(r, "csv-missing-file"), 4, "ghost.png"),
    "csv-empty": (lambda r: _manifest(r, "csv-empty"), 4, "labels.csv"),
    "csv-misspelt-column": (lambda r: _manifest(r, "csv-misspelt-column"), 4, "grup"),
    "csv-duplicate-row": (lambda r: _manifest(r, "csv-duplicate-row"), 4, "already listed"),
    "jsonl-broken-line": (lambda r: _manifest(r, "jsonl-broken-line"), 4, "labels.jsonl"),
    # npz
    "npz-object-arrays": (lambda r: _npz(r, "object-arrays"), 4, "only pickle can read"),
    "npz-multi-label": (lambda r: _npz(r, "multi-label"), 4, "multi-label"),
    "npz-not-a-zip": (lambda r: _npz(r, "not-a-zip"), 4, "scans.npz"),
    "npz-images-1d": (lambda r: _npz(r, "images-1d"), 4, "expected (N, H, W)"),
    "npz-lengths-differ": (lambda r: _npz(r, "lengths-differ"), 4, "same length"),
    "npz-float-labels": (lambda r: _npz(r, "float-labels"), 4, "integer class indices"),
    "npz-unknown-token-labels": (lambda r: _npz(r, "unknown-token-labels"), 4, "tokenize"),
    # options that need the machine
    "device-not-there": (lambda r: [*_demo_args(r), "--mllm-device=cuda:7"], 4, "--mllm-device 'cuda:7'"),
    # YAML
    "thresholds-syntax": (lambda r: _yaml(r, "syntax"), 4, "thresholds.yaml"),
    "thresholds-unknown-key": (lambda r: _yaml(r, "unknown-key"), 4, "flor"),
    "thresholds-out-of-range": (lambda r: _yaml(r, "out-of-range"), 4, "1.5"),
    "thresholds-top-level-list": (lambda r: _yaml(r, "top-level-list"), 4, "thresholds.yaml"),
    "thresholds-wrong-version": (lambda r: _yaml(r, "wrong-version"), 4, "version"),
    "dataset-yaml-unknown-key": (lambda r: _yaml(r, "dataset"), 4, "class_names"),
    # baselines
    "baseline-not-json": (lambda r: _baseline(r, "not-json"), 4, "not a readable JSON baseline"),
    "baseline-no-data": (lambda r: _baseline(r, "no-data"), 4, "models['demo'].data must be present"),
    "baseline-no-loci": (lambda r: _baseline(r, "no-loci"), 4, "models['demo'].loci must be present"),
    "baseline-old-version": (lambda r: _baseline(r, "old-version"), 4, "key version is 1"),
    "baseline-short-correct": (lambda r: _baseline(r, "short-correct"), 4, "one 0/1 per test image"),
    "baseline-wrong-type": (lambda r: _baseline(r, "wrong-type"), 4, "must be a number or null, got 'good'"),
    "baseline-other-probe": (lambda r: _baseline(r, "other-probe"), 4, "--mllm-probe"),
    "baseline-other-answer": (lambda r: _baseline(r, "other-answer"), 4, "--mllm-answer"),
    # module:function
    "entry-wrong-type": (lambda r: _entry(r, "wrong_type"), 4, "returned int"),
    "entry-names-not-a-list": (lambda r: _entry(r, "names_not_a_list"), 4, "class_names 3"),
    "entry-raises": (lambda r: _entry(r, "raises"), 4, "the database is down"),
    "entry-label-lists": (lambda r: _entry(r, "label_lists"), 4, "neither an int nor a string"),
    # cache entries
    "cache-entry-truncated": (lambda r: _cache(r, "truncated"), 0, "passed"),
    "cache-entry-garbage": (lambda r: _cache(r, "garbage"), 0, "passed"),
}
SCREEN = 60  # lines: what one terminal screen shows


def test_the_fuzz_list_covers_every_kind_of_file() -> None:
    assert len(CASES) >= 30
    kinds = {name.split("-")[0] for name in CASES}
    assert {"config", "weights", "image", "csv", "jsonl", "npz", "thresholds", "dataset", "baseline",
            "entry", "cache"} <= kinds


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_input_is_a_usage_error_or_a_clean_run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
                                                         case: str) -> None:
    build, code, message = CASES[case]
    monkeypatch.syspath_prepend(pytester.path)  # for the module:function cases
    monkeypatch.setenv("PYTHONPATH", str(pytester.path))
    args = build(pytester.path)
    result = pytester.runpytest_subprocess(*args, *RUN)
    text = _text(result)
    assert _ret(result) == code, text
    assert message in text, text
    assert "Traceback" not in text and "INTERNALERROR" not in text, text
    if code == 4:
        errors = [line for line in result.stderr.lines if line.startswith("ERROR:")]
        assert len(errors) == 1, text
        assert len(result.stderr.lines) < SCREEN and "FAILED" not in text, text


def test_a_usage_error_found_during_evaluation_is_exit_4_under_xdist(pytester: pytest.Pytester) -> None:
    """Classes 'Benign' and 'benign' look alike to the tokenizer: found when the model is loaded."""
    args = _image(pytester.path, "case-twins")
    result = pytester.runpytest_subprocess(*args, "-n", "2", *RUN)
    text = _text(result)
    assert _ret(result) == 4, text
    assert "Benign" in text and "FAILED" not in text and "Traceback" not in text, text


# -- 3. faults: caches, a killed report writer, timeouts, reruns ------------------------------


def test_an_unwritable_cache_folder_runs_without_it_with_one_warning(pytester: pytest.Pytester) -> None:
    """The cache folder would sit below a file: nothing can be created there, even as root."""
    (pytester.path / "blocker").write_text("a file, not a folder")
    result = pytester.runpytest_subprocess(
        *_demo_args(pytester.path), f"--mllm-cache-dir={pytester.path / 'blocker' / 'cache'}", *RUN,
    )
    assert _ret(result) == 0, _text(result)
    assert _text(result).count("the feature cache is not used") == 1, _text(result)


def test_the_default_cache_in_an_unwritable_folder_is_switched_off(pytester: pytest.Pytester) -> None:
    """pytest's own cache folder cannot be made (its name is taken by a file): plain pytest runs,
    so must we, with one warning."""
    (pytester.path / ".pytest_cache").write_text("a file, not a folder")
    result = pytester.runpytest_subprocess(*_demo_args(pytester.path))
    assert _ret(result) == 0, _text(result)
    assert _text(result).count("the feature cache is off") == 1, _text(result)


def test_a_read_only_cache_serves_its_complete_entries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No write permission (simulated, so that it also holds when the tests run as root): a
    complete entry is read without the lock; a missing one is computed once and not kept."""
    import errno

    from pytest_mllmprobe import atomic
    from pytest_mllmprobe.cache import CacheWarning, cached_features

    cache = tmp_path / "cache"
    calls: list[int] = []

    def compute():
        from pytest_mllmprobe.extract import Features

        calls.append(1)
        return Features(loci={"vision.0": np.ones((3, 2), dtype=np.float32)}, answer_scores=np.zeros((3, 2)))

    first, hit = cached_features(cache, "k1", compute)
    assert not hit and calls == [1]
    real_open = open

    def read_only_open(file, mode="r", *args, **kwargs):
        if str(file).startswith(str(cache)) and any(m in mode for m in "wax+"):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", read_only_open)
    monkeypatch.setattr(atomic.tempfile, "mkstemp", lambda *a, **k: read_only_open(cache / "x", "w"))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        again, hit = cached_features(cache, "k1", compute)
        fresh, fresh_hit = cached_features(cache, "k2", compute)
    assert hit and not fresh_hit and calls == [1, 1]  # k1 read, not recomputed; k2 computed once
    np.testing.assert_array_equal(again.loci["vision.0"], first.loci["vision.0"])
    cache_warnings = [w for w in seen if issubclass(w.category, CacheWarning)]
    assert len(cache_warnings) == 1 and "not used" in str(cache_warnings[0].message), seen
    assert not list(cache.glob("k2*")), "nothing may be written to a read-only cache"


KILLER = """
import json, os, signal, sys
from pytest_mllmprobe import atomic
from pytest_mllmprobe.report import write_report

results, out, point = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3]
real_rename = atomic.os.rename
calls = []

def rename(src, dst):
    calls.append(1)
    if point == "between-renames" and len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_rename(src, dst)

import pathlib
real_write_bytes = pathlib.Path.write_bytes
written = []

def write_bytes(self, data):
    written.append(self.name)
    if point == "while-staging" and len(written) == 2:  # results.json is staged, the plots not yet
        os.kill(os.getpid(), signal.SIGKILL)
    return real_write_bytes(self, data)

atomic.os.rename = rename
pathlib.Path.write_bytes = write_bytes
write_report(results, out)
"""


@pytest.fixture(scope="module")
def demo_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pytest_mllmprobe import run

    path = tmp_path_factory.mktemp("results") / "results.json"
    path.write_text(json.dumps(run("demo").to_dict()))
    return path


@pytest.mark.parametrize("point", ["while-staging", "between-renames"])
def test_a_report_writer_killed_half_way_leaves_the_old_report(tmp_path: Path, demo_results: Path,
                                                                point: str) -> None:
    pytest.importorskip("matplotlib")
    from pytest_mllmprobe.report import load_results, write_report

    out = tmp_path / "report"
    old = json.loads(demo_results.read_text())
    old["models"]["demo"]["label"] = "old run"
    write_report(old, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    done = subprocess.run([sys.executable, str(script), str(demo_results), str(out), point],
                          env=subprocess_env(), capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers, "the writer was killed before it staged anything"
    # the next run (here: the next report written beside it) puts the old report back first
    from pytest_mllmprobe.atomic import remove_stale

    remove_stale(tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert load_results(out / "results.json")["models"]["demo"]["label"] == "old run"
    write_report(json.loads(demo_results.read_text()), out)
    assert load_results(out / "results.json")["models"]["demo"]["label"] == "demo"


def test_a_timed_out_extraction_runs_once_and_says_what_timed_out(pytester: pytest.Pytester) -> None:
    pytest.importorskip("pytest_timeout")
    result = pytester.runpytest_subprocess(*_demo_args(pytester.path), "--timeout=0.2", *RUN)
    text = _text(result)
    if _ret(result) == 0 and "Exception ignored" in text and "Failed: Timeout" in text:
        # pytest-timeout's SIGALRM landed inside a weakref callback, where CPython can only print
        # the exception ("Exception ignored"): the timeout never reached the run. Once more.
        result = pytester.runpytest_subprocess(*_demo_args(pytester.path), "--timeout=0.2", *RUN)
        text = _text(result)
    assert _ret(result) == 1, text
    outcomes = result.parseoutcomes()
    total = outcomes.get("failed", 0) + outcomes.get("passed", 0) + outcomes.get("errors", 0)
    assert total == 18, outcomes
    assert "stopped by pytest-timeout" in text and "is not restarted" in text, text
    assert text.count("mllmprobe: demo: extracted") <= 1, text  # never restarted by a later test


def test_reruns_are_counted_once_in_the_summary(pytester: pytest.Pytester, tmp_path: Path) -> None:
    pytest.importorskip("pytest_rerunfailures")
    from .faults import build_faulty

    faulty = build_faulty("rank1-connector", tmp_path)
    result = pytester.runpytest_subprocess(
        f"--mllm-model={faulty}", f"--mllm-data={_data(pytester.path)}", "--reruns=1", *RUN,
    )
    outcomes = result.parseoutcomes()
    failed, passed = outcomes.get("failed", 0), outcomes.get("passed", 0)
    assert failed >= 1 and outcomes.get("rerun", 0) == failed, outcomes
    result.stdout.fnmatch_lines([f"  {failed + passed} probe tests ran, {failed} failed*"])
    assert _text(result).count("extracted 150/150") == 1  # reruns reuse the session's features


def test_output_paths_are_checked_before_the_run(pytester: pytest.Pytester) -> None:
    (pytester.path / "taken").write_text("a file")
    result = pytester.runpytest_subprocess(*_demo_args(pytester.path), f"--mllm-report={pytester.path / 'taken'}",
                                           *RUN)
    assert _ret(result) == 4 and "collected" not in result.stdout.str(), _text(result)
    result = pytester.runpytest_subprocess(*_demo_args(pytester.path),
                                           f"--mllm-save-baseline={pytester.path / 'taken' / 'b.json'}", *RUN)
    assert _ret(result) == 4 and "is a file" in _text(result), _text(result)


def test_a_folder_of_other_files_is_never_replaced_by_the_report(pytester: pytest.Pytester) -> None:
    precious = pytester.mkdir("src")
    (precious / "main.py").write_text("print('mine')\n")
    result = pytester.runpytest_subprocess(*_demo_args(pytester.path), f"--mllm-report={precious}", *RUN)
    assert _ret(result) == 4, _text(result)
    assert (precious / "main.py").read_text() == "print('mine')\n"
    assert os.listdir(precious) == ["main.py"]
