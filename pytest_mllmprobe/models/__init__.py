"""Model loading, adapters and pipeline-stage detection."""

from .adapter import ModelAdapter
from .load import LoadedModel, ModelSpec, load_model, load_structure, resolve_model
from .resolve import adapter_for
from .stages import StageMap, detect_stages

__all__ = [
    "LoadedModel",
    "ModelAdapter",
    "ModelSpec",
    "StageMap",
    "adapter_for",
    "detect_stages",
    "load_model",
    "load_structure",
    "resolve_model",
]
