"""``P_final``: the model's own answer, by closed-set scoring of the class names.

Each class name is scored as the continuation of the prompt: the sum of the log-probabilities
of its tokens, divided by its number of tokens (length-normalised, so a long name is not
penalised for having more tokens). The class with the highest score is the model's answer.
Single-token names are scored from the logits of the extraction forward itself; multi-token
names need one extra forward per class and batch.
"""

from __future__ import annotations

from typing import Any

from .errors import ConfigError
from .inputs import no_cache, prepare_inputs

def class_continuations(tokenizer: Any, prompt: str, class_names: list[str]) -> list[list[int]]:
    """Token ids of each class name as it would continue ``prompt``."""
    prefix = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    result: list[list[int]] = []
    for name in class_names:
        full = tokenizer(prompt + name, add_special_tokens=False)["input_ids"]
        if full[: len(prefix)] == prefix and len(full) > len(prefix):
            tokens = list(full[len(prefix):])
        else:  # the name merged with the end of the prompt: score it on its own
            tokens = list(tokenizer(name, add_special_tokens=False)["input_ids"])
        if not tokens:
            raise ConfigError(f"class name {name!r} tokenizes to nothing; rename the class folder")
        result.append(tokens)
    seen: dict[tuple[int, ...], str] = {}
    unk = getattr(tokenizer, "unk_token_id", None)
    for name, tokens in zip(class_names, result):
        if unk is not None and tokens == [unk]:
            raise ConfigError(
                f"class name {name!r} is unknown to the tokenizer (it becomes the unknown token); "
                "the model cannot say it: rename the class or use the model's vocabulary"
            )
        key = tuple(tokens)
        if key in seen:
            raise ConfigError(
                f"class names {seen[key]!r} and {name!r} tokenize to the same tokens; "
                "the model's answer could not tell them apart: rename one of them"
            )
        seen[key] = name
    return result


def single_token(continuations: list[list[int]]) -> bool:
    return all(len(c) == 1 for c in continuations)


def scores_from_last_logits(last_logits: Any, continuations: list[list[int]]) -> Any:
    """``[B, K]`` scores from the last prompt position's logits (single-token names)."""
    import torch

    logp = torch.log_softmax(last_logits.float(), dim=-1)
    ids = torch.tensor([c[0] for c in continuations], device=logp.device)
    return logp[:, ids]


#: per-token inputs that continue the last prompt position for appended tokens, as
#: ``generate`` extends them (Mllama's ``cross_attention_mask``: which tiles a token attends to)
REPEAT_LAST_POSITION = ("cross_attention_mask",)


def scores_by_continuation(
    model: Any, inputs: dict[str, Any], continuations: list[list[int]], extra: dict[str, Any]
) -> Any:
    """``[B, K]`` length-normalised scores, one forward per class (left-padded inputs)."""
    import torch

    input_ids = inputs["input_ids"]
    mask = inputs["attention_mask"]
    batch = input_ids.shape[0]
    columns = []
    for tokens in continuations:
        cont = torch.tensor(tokens, device=input_ids.device).expand(batch, -1)
        ids = torch.cat([input_ids, cont], dim=1)
        full_mask = torch.cat([mask, torch.ones_like(cont)], dim=1)
        kwargs = {}
        for key, value in inputs.items():
            if key in ("input_ids", "attention_mask"):
                continue
            if isinstance(value, torch.Tensor) and value.shape[:2] == input_ids.shape:
                if key in REPEAT_LAST_POSITION:  # the answer tokens see what the last prompt token sees
                    tail = value[:, -1:].expand(-1, len(tokens), *value.shape[2:])
                else:  # per-token side inputs (e.g. mm_token_type_ids): the answer tokens are text
                    tail = torch.zeros((batch, len(tokens), *value.shape[2:]), dtype=value.dtype,
                                       device=value.device)
                value = torch.cat([value, tail], dim=1)
            kwargs[key] = value
        kwargs.update(extra)
        if "position_ids" in extra:
            kwargs["position_ids"] = (full_mask.cumsum(-1) - 1).clamp(min=0)
        m = len(tokens)
        out = model(input_ids=ids, attention_mask=full_mask, logits_to_keep=m + 1, **no_cache(model), **kwargs)
        logits = out.logits[:, -(m + 1):-1].float()
        logp = torch.log_softmax(logits, dim=-1)
        picked = logp.gather(-1, cont.unsqueeze(-1)).squeeze(-1)
        columns.append(picked.mean(dim=1))
    return torch.stack(columns, dim=1)


def score_answers(
    model: Any, processor: Any, adapter: Any, family_name: str, images: Any, prompts: list[str],
    continuations: list[list[int]], *, batch_size: int, device: Any, dtype: Any,
) -> Any:
    """``[N, K]`` closed-set answer scores of every image under ``prompts`` (one per image): one
    forward per batch (and one per class for multi-token names), no hooks, nothing else read.
    Used for the answer under other option orders and prompt wordings."""
    import torch

    from .inputs import last_prompt_index

    columns = []
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            index = list(range(start, min(start + batch_size, len(prompts))))
            inputs = adapter.encode(processor, images(index), [prompts[i] for i in index], device, dtype, "left",
                                    family_name=family_name)
            extra = adapter.positions(inputs, family_name=family_name)
            if single_token(continuations):
                mask = inputs["attention_mask"]
                last = last_prompt_index(mask)
                left_padded = bool((last == mask.shape[1] - 1).all())
                out = model(**inputs, **extra, **no_cache(model), logits_to_keep=1 if left_padded else 0)
                if left_padded:
                    logits = out.logits[:, -1]
                else:
                    logits = out.logits[torch.arange(mask.shape[0], device=out.logits.device), last]
                columns.append(scores_from_last_logits(logits, continuations).float().cpu())
            else:
                columns.append(scores_by_continuation(model, inputs, continuations, extra).float().cpu())
    return torch.cat(columns).numpy()


GENERATION_TOKENS = 16


def normalise(text: str) -> str:
    """Lower case, punctuation and underscores to spaces, whitespace collapsed."""
    import re

    return " ".join(re.sub(r"[\W_]+", " ", text.lower()).split())


def parse_answer(text: str, class_names: list[str]) -> int:
    """Index of the class name that occurs first in ``text`` (normalised, whole words); -1 if none.

    When names overlap at the same position (``mass`` and ``mass lesion``) the longer one wins.
    """
    words = f" {normalise(text)} "
    best: tuple[int, int, int] | None = None  # (position, -length, index)
    for index, name in enumerate(class_names):
        needle = f" {normalise(name)} "
        if needle.strip() == "":
            continue
        position = words.find(needle)
        if position >= 0:
            key = (position, -len(needle), index)
            best = key if best is None or key < best else best
    return -1 if best is None else best[2]


def generate_answers(
    model: Any,
    processor: Any,
    images: Any,
    prompts: list[str],
    *,
    batch_size: int,
    device: Any,
    dtype: Any,
    max_new_tokens: int = GENERATION_TOKENS,
    adapter: Any = None,
    family_name: str = "",
) -> list[str]:
    """Greedy generation after each prompt (left padding); the decoded new text per image.

    ``adapter`` (a :class:`~pytest_mllmprobe.models.adapter.ModelAdapter`) builds the inputs;
    by default the processor is called as transformers' processors are.
    """
    import torch

    tokenizer = getattr(processor, "tokenizer", processor)
    texts: list[str] = []
    for start in range(0, len(prompts), batch_size):
        index = list(range(start, min(start + batch_size, len(prompts))))
        batch_images, batch_prompts = images(index), [prompts[i] for i in index]
        if adapter is not None:
            inputs = adapter.encode(processor, batch_images, batch_prompts, device, dtype, family_name=family_name)
        else:
            inputs = prepare_inputs(processor, batch_images, batch_prompts, device, dtype)
        with torch.inference_mode():
            out = model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=getattr(tokenizer, "pad_token_id", None),
            )
        prompt = inputs["input_ids"]
        # most models return the prompt and the new tokens; some (Hulu-Med) the new tokens only
        echoed = out.shape[1] > prompt.shape[1] and torch.equal(out[:, :prompt.shape[1]], prompt.to(out.device))
        new = out[:, prompt.shape[1]:] if echoed else out
        texts.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    return texts
