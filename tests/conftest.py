"""Shared fixtures: tiny real models and real (synthetic) image folders, built offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Two cores and `-n 2`: each worker (and each subprocess it starts) uses one thread, or
# OpenMP spin-waiting makes small torch ops hundreds of times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

pytest_plugins = ["pytester"]

# pytester puts sys.modules back as it was after every test that uses it. A C extension, a torch
# operator library (torch._dynamo registers them on import) or a transformers lazy module first
# imported inside such a test is then imported a second time by a later test, which they refuse
# ("cannot load module more than once per process", "Only a single TORCH_LIBRARY ..."): which test
# imports them first depends on the order xdist hands out. So installed packages (site-packages,
# the standard library) stay imported across pytester's restore; what the tests write and our own
# package are restored as pytester means them to be.
import sys  # noqa: E402


def _installed(module: object) -> bool:
    path = getattr(module, "__path__", None)
    places = [getattr(module, "__file__", None), *(path if isinstance(path, (list, tuple)) else [])]
    try:  # namespace packages keep their folders in a _NamespacePath
        places += [str(p) for p in path] if path is not None and not isinstance(path, (list, tuple, str)) else []
    except TypeError:  # e.g. torch.classes: a namespace object, not a list of folders
        pass
    roots = {sys.prefix, sys.base_prefix}
    return any(isinstance(p, str) and ("site-packages" in p or any(p.startswith(r + "/lib") for r in roots))
               for p in places)


def _keep_installed_modules() -> None:
    from _pytest import pytester as _pytester

    snapshot = getattr(_pytester, "SysModulesSnapshot", None)
    if snapshot is None or getattr(snapshot.restore, "_keeps_installed", False):
        return
    restore = snapshot.restore

    def restore_keeping_installed(self) -> None:  # type: ignore[no-untyped-def]
        kept = {name: module for name, module in sys.modules.items() if _installed(module)}
        restore(self)
        sys.modules.update(kept)

    restore_keeping_installed._keeps_installed = True  # type: ignore[attr-defined]
    snapshot.restore = restore_keeping_installed


_keep_installed_modules()

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    # `pytest --mllm-model demo` from the repo root runs the probes only, not this suite.
    if config.getoption("mllm_model", None):
        return True
    return None


@pytest.fixture(autouse=True)
def _one_thread_per_subprocess(monkeypatch: pytest.MonkeyPatch) -> None:
    # Two cores: subprocess pytest runs (and xdist workers) must not oversubscribe them.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def lesion_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ImageFolder of 3 x 20 synthetic lesion images (normal / benign / malignant)."""
    from pytest_mllmprobe.demo.synth import make_images, write_image_folder

    return write_image_folder(make_images(20, seed=7), tmp_path_factory.mktemp("lesions"))


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init tiny LLaVA saved with save_pretrained (model + processor)."""
    from pytest_mllmprobe.demo.tiny import save_model, tiny_llava

    model, processor = tiny_llava("llava", seed=0)
    return save_model(model, processor, tmp_path_factory.mktemp("tiny-llava") / "tiny-llava")


@pytest.fixture(scope="session")
def junit_schema() -> Path:
    path = SHARED / "junit-10.xsd"
    if not path.is_file():
        pytest.skip(f"JUnit schema not found at {path} (it lives in ../shared beside the checkout)")
    return path


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return env
