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

# pytester puts sys.modules back as it was after every test that uses it, so a C extension first
# imported inside such a test is imported a second time by the next one, which numpy and torch
# refuse ("cannot load module more than once per process"). Import them once, up front.
import numpy  # noqa: E402,F401
import scipy.stats  # noqa: E402,F401
import sklearn.metrics  # noqa: E402,F401
import torch  # noqa: E402,F401
import transformers  # noqa: E402,F401

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
