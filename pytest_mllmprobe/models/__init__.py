"""Model loading and pipeline-stage detection."""

from .load import LoadedModel, ModelSpec, load_model, load_structure, resolve_model
from .stages import StageMap, detect_stages

__all__ = [
    "LoadedModel",
    "ModelSpec",
    "StageMap",
    "detect_stages",
    "load_model",
    "load_structure",
    "resolve_model",
]
