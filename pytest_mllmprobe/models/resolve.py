"""Which adapter reads a ``--mllm-model``: the user's ``module:function`` or the built-in that fits."""

from __future__ import annotations

import importlib

from ..errors import ConfigError
from .adapter import ModelAdapter
from .llava_original import LlavaOriginalAdapter, is_llava_original, raw_config
from .load import ModelSpec
from .remote import RemoteCausalLMAdapter, is_remote_causal_lm


def adapter_for(spec: ModelSpec, *, trust_remote_code: bool = False) -> ModelAdapter:
    """The adapter of ``--mllm-model``: a user's ``module:function``, or the built-in that fits the
    checkpoint (LLaVA-original layout, causal-LM remote code, else transformers' classes)."""
    if spec.entry_point:
        return entry_point_adapter(spec.source)
    raw = raw_config(spec.source)
    if is_llava_original(raw):
        return LlavaOriginalAdapter(spec.source)
    if is_remote_causal_lm(raw):
        return RemoteCausalLMAdapter(spec.source, trust_remote_code=trust_remote_code)
    return ModelAdapter(spec.source, trust_remote_code=trust_remote_code)


def entry_point_adapter(name: str) -> ModelAdapter:
    """Import ``module:function`` and call it; it must return a :class:`ModelAdapter`."""
    module_name, _, function_name = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"--mllm-model {name!r}: cannot import module {module_name!r}: {exc}; put it on sys.path "
            "(e.g. a conftest.py folder or an installed package)"
        ) from exc
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigError(f"--mllm-model {name!r}: module {module_name!r} has no function {function_name!r}")
    try:
        adapter = function()
    except ConfigError:
        raise
    except Exception as exc:  # the user's code: its error, named, not a traceback of ours
        raise ConfigError(f"--mllm-model {name!r}: {function_name}() raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(adapter, ModelAdapter):
        raise ConfigError(
            f"--mllm-model {name!r}: {function_name}() returned {type(adapter).__name__}, not a "
            "pytest_mllmprobe.ModelAdapter (see docs/architectures.md, 'Your own adapter')"
        )
    unknown = sorted(set(adapter.stages) - {"vision", "connector", "llm"})
    if unknown:
        raise ConfigError(
            f"--mllm-model {name!r}: the adapter's stages name {', '.join(map(repr, unknown))}; valid stages: "
            "vision, connector, llm"
        )
    return adapter
