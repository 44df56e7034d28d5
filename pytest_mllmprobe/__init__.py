"""pytest-mllmprobe: find where a multimodal LLM loses image-classification signal.

The engine is plain Python::

    from pytest_mllmprobe import run
    results = run("demo")
    print(results["demo"].profile)

The pytest plugin (``pytest --mllm-model ...``) asserts the same numbers as tests.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["ConfigError", "ModelAdapter", "Results", "Segments", "Settings", "run", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy: importing the package (as pytest does for the plugin) must not import torch.
    if name == "run":
        from .engine import run

        return run
    if name == "Results":
        from .results import Results

        return Results
    if name == "Settings":
        from .settings import Settings

        return Settings
    if name == "ModelAdapter":
        from .models.adapter import ModelAdapter

        return ModelAdapter
    if name == "Segments":
        from .models.families import Segments

        return Segments
    if name == "ConfigError":
        from .errors import ConfigError

        return ConfigError
    raise AttributeError(f"module 'pytest_mllmprobe' has no attribute {name!r}")
