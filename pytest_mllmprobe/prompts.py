"""Classification prompts built with the model's own chat template.

The same prompt is used for feature extraction and for the model's own answer (``P_final``),
so the ``last`` readout of the language model is read exactly where the answer is produced.
"""

from __future__ import annotations

from typing import Any

from .errors import ConfigError

DEFAULT_QUESTION = "Classify the image. Options: {options}. Answer with one option."


def question_text(class_names: list[str], template: str = DEFAULT_QUESTION) -> str:
    """The user's question, with ``{options}`` replaced by the comma-separated class names."""
    if "{options}" not in template:
        raise ConfigError(
            f"prompt template {template!r} has no '{{options}}' placeholder; "
            "add it where the class names should be listed"
        )
    return template.replace("{options}", ", ".join(class_names))


def messages(question: str) -> list[dict[str, Any]]:
    """One user turn holding the image and the question, in the processor's message format."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def build_prompt(processor: Any, class_names: list[str], template: str = DEFAULT_QUESTION) -> str:
    """The full prompt text: chat template applied, generation prompt appended.

    ``processor`` is a transformers processor (or tokenizer) with a chat template.
    """
    question = question_text(class_names, template)
    apply = getattr(processor, "apply_chat_template", None)
    own = getattr(processor, "chat_template", None)
    # some processors (BLIP-2, InstructBLIP) drop their template on loading; the tokenizer keeps it
    fallback = getattr(getattr(processor, "tokenizer", None), "chat_template", None)
    if apply is None or not (own or fallback):
        raise ConfigError(
            f"the processor {type(processor).__name__} has no chat template; save one with the "
            "model (processor.chat_template = ...; processor.save_pretrained(path))"
        )
    extra = {} if own else {"chat_template": fallback}
    return apply(messages(question), add_generation_prompt=True, tokenize=False, **extra)
