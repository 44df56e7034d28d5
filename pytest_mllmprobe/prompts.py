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
    if apply is None or not _has_chat_template(processor):
        raise ConfigError(
            f"the processor {type(processor).__name__} has no chat template; save one with the "
            "model (processor.chat_template = ...; processor.save_pretrained(path))"
        )
    return apply(messages(question), add_generation_prompt=True, tokenize=False)


def _has_chat_template(processor: Any) -> bool:
    if getattr(processor, "chat_template", None):
        return True
    tokenizer = getattr(processor, "tokenizer", None)
    return bool(getattr(tokenizer, "chat_template", None))
