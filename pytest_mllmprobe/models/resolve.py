"""Which adapter reads a ``--mllm-model``: the user's ``module:function`` or the built-in that fits."""

from __future__ import annotations

from ..entry import call_entry_point
from ..errors import ConfigError
from .adapter import ModelAdapter
from .llava_original import LlavaOriginalAdapter, is_llava_original, raw_config
from .load import ModelSpec
from .peft_adapter import PeftAdapter, find_base, is_peft_adapter, read_adapter_config
from .remote import RemoteCausalLMAdapter, is_remote_causal_lm


def adapter_for(spec: ModelSpec, *, trust_remote_code: bool = False, base_model: str | None = None) -> ModelAdapter:
    """The adapter of ``--mllm-model``: a user's ``module:function``, or the built-in that fits the
    checkpoint (a PEFT adapter over its base, LLaVA-original layout, causal-LM remote code, else
    transformers' classes). ``base_model`` (``--mllm-base-model``) replaces a PEFT adapter's base."""
    if spec.entry_point:
        return entry_point_adapter(spec.source)
    if is_peft_adapter(spec.source):
        config = read_adapter_config(spec.source)
        base = find_base(spec.source, config, base_model)
        adapter = PeftAdapter(spec.source, adapter_for(ModelSpec(base, base), trust_remote_code=trust_remote_code),
                              base, config)
        adapter.check_type()
        return adapter
    raw = raw_config(spec.source)
    if is_llava_original(raw):
        return LlavaOriginalAdapter(spec.source)
    if is_remote_causal_lm(raw):
        return RemoteCausalLMAdapter(spec.source, trust_remote_code=trust_remote_code)
    return ModelAdapter(spec.source, trust_remote_code=trust_remote_code)


def entry_point_adapter(name: str) -> ModelAdapter:
    """Import ``module:function`` and call it; it must return a :class:`ModelAdapter`."""
    adapter = call_entry_point(name, "--mllm-model")
    function_name = name.rpartition(":")[2]
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
