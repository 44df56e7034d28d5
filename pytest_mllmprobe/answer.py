"""``P_final``: the model's own answer, by closed-set scoring of the class names.

Each class name is scored as the continuation of the prompt: the sum of the log-probabilities
of its tokens, divided by its number of tokens (length-normalised, so a long name is not
penalised for having more tokens). The class with the highest score is the model's answer.
Single-token names are scored from the logits of the extraction forward itself. Multi-token
names continue that forward's KV cache (:func:`scores_from_cache`): each name's remaining tokens
go through the language model after the prompt's keys and values, one name at a time, and the
cache is rewound to the prompt's after each, so the image and the prompt are never run again.
A family that cannot continue a cache (:data:`NO_CACHE_CONTINUATION`) runs one more full forward
per class (:func:`scores_by_continuation`).
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


#: per-token side inputs whose appended answer tokens take a value of their own, by model type:
#: PaliGemma's ``token_type_ids`` are 0 for the bidirectional prefix (image and prompt) and 1
#: for the causal suffix, which the answer is (``generate`` appends ones)
APPENDED_VALUE = {("paligemma", "token_type_ids"): 1}


def _tail(model: Any, key: str, value: Any, length: int) -> Any:
    """``[B, length, ...]`` values of the per-token input ``key`` for ``length`` appended answer tokens."""
    import torch

    if key in REPEAT_LAST_POSITION:  # the answer tokens see what the last prompt token sees
        return value[:, -1:].expand(-1, length, *value.shape[2:])
    # other per-token side inputs (e.g. mm_token_type_ids): the answer tokens are text
    fill = APPENDED_VALUE.get((getattr(getattr(model, "config", None), "model_type", None), key), 0)
    return torch.full((value.shape[0], length, *value.shape[2:]), fill, dtype=value.dtype, device=value.device)


#: families whose forward cannot continue a KV cache without the image inputs, scored by
#: :func:`scores_by_continuation` instead (found by ``tests/test_architectures.py``)
NO_CACHE_CONTINUATION: frozenset[str] = frozenset({
    # pixel_values is a required argument of the forward: the image would be encoded again anyway
    "blip-2", "instructblip",
})

CACHE_FALLBACK_NOTE = (
    "multi-token class names of the {family!r} model are scored by one more full forward per class "
    "(its forward is not known to continue the prompt's KV cache without the image)"
)


def continues_cache(family_name: str, model: Any = None) -> bool:
    """Whether multi-token names of ``family_name`` are scored through the prompt's KV cache:
    transformers' own model classes (remote code and wrapped models are not known to continue a
    cache without their image inputs) outside :data:`NO_CACHE_CONTINUATION`."""
    if family_name in NO_CACHE_CONTINUATION:
        return False
    return model is None or type(model).__module__.startswith("transformers.")


def cache_of(output: Any) -> Any:
    """The KV cache a forward returned (``cache`` in transformers 5, ``past_key_values`` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


_CACHE_KWARG: dict[type, str] = {}


def _cache_kwarg(model: Any) -> str:
    import inspect

    kind = type(model)
    if kind not in _CACHE_KWARG:
        try:
            names = set(inspect.signature(kind.forward).parameters)
        except (TypeError, ValueError):
            names = set()
        _CACHE_KWARG[kind] = "cache" if "cache" in names else "past_key_values"
    return _CACHE_KWARG[kind]


class _Arena:
    """The keys and values of one batch's full-attention layers, rooms included, in one allocation.

    The block is sized at the first layer's update for every such layer alike (keys and values
    of the first layer's shape): one allocation that large is mapped on its own and handed back
    whole when the batch ends, where a cache grown tensor by tensor through the forward pins the
    heap among the forward's temporaries. A layer of another shape, dtype or device, or one past
    the block, gets a tensor of its own.
    """

    def __init__(self, layers: int) -> None:
        self.slots, self.block, self.size, self.taken = 2 * layers, None, 0, 0

    def take(self, states: Any, room: int) -> Any:
        """An empty ``[..., length + room, dim]`` tensor for ``states`` of ``[..., length, dim]``."""
        import math

        shape = (*states.shape[:-2], states.shape[-2] + room, states.shape[-1])
        need = math.prod(shape)
        if self.block is None:
            self.size = need
            self.block = states.new_empty(self.slots * need)
        fits = (self.taken < self.slots and need <= self.size and states.dtype == self.block.dtype
                and states.device == self.block.device)
        if not fits:
            return states.new_empty(shape)
        start, self.taken = self.taken * self.size, self.taken + 1
        return self.block[start:start + need].view(shape)


class _Slots:
    """One full-attention layer's keys and values with room for a class name after the prompt's.

    The layer's ``update`` (an instance attribute: ``Cache.update`` calls it for this layer) writes
    the name's keys and values into the room and returns views of the prompt's plus the name's;
    :meth:`rewind` goes back to the prompt's. ``DynamicLayer.update`` would ``torch.cat`` the
    layer's whole cache for every name instead. Installed before the prompt's forward (with an
    :class:`_Arena`), the prompt's own update writes into the buffers; installed after it, the
    first name moves the prompt's keys and values there.
    """

    def __init__(self, layer: Any, room: int, arena: _Arena | None = None) -> None:
        self.layer, self.room, self.arena = layer, room, arena
        self.prompt = layer.keys.shape[-2] if arena is None else -1
        self.buffers: tuple[Any, ...] = ()
        layer.update = self.update

    def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        import torch

        layer = self.layer
        if self.prompt < 0:  # the prompt's forward: its keys and values go straight into the buffers
            self.prompt = key_states.shape[-2]
            self.buffers = tuple(self.arena.take(states, self.room) for states in (key_states, value_states))
            self._write(0, key_states, value_states)
            layer.device, layer.is_initialized = key_states.device, True
            self.rewind()
            return key_states, value_states  # the same values, contiguous, for the prompt's attention
        end = self.prompt + key_states.shape[-2]
        if layer.keys.shape[-2] != self.prompt or end > self.prompt + self.room:
            raise RuntimeError("a class name's continuation must start at the end of the prompt's cache")
        if not self.buffers:  # the first name: the prompt's keys and values move into the buffers, once
            self.buffers = tuple(
                torch.cat([held, held.new_empty((*held.shape[:-2], self.room, held.shape[-1]))], dim=-2)
                for held in (layer.keys, layer.values)
            )
        self._write(self.prompt, key_states, value_states)
        layer.keys, layer.values = (buffer[..., :end, :] for buffer in self.buffers)
        return layer.keys, layer.values

    def _write(self, start: int, key_states: Any, value_states: Any) -> None:
        """Keys and values into the buffers from position ``start`` on."""
        end = start + key_states.shape[-2]
        for buffer, states in zip(self.buffers, (key_states, value_states)):
            buffer[..., start:end, :].copy_(states)

    def rewind(self) -> None:
        if self.buffers:
            self.layer.keys, self.layer.values = (buffer[..., :self.prompt, :] for buffer in self.buffers)

    def close(self) -> None:
        self.layer.__dict__.pop("update", None)  # the class's update again, and no reference cycle
        self.arena = None


class _Rewind:
    """A prompt's KV cache that class names continue one at a time, rewound after each.

    Full-attention layers (transformers' ``DynamicLayer``) get :class:`_Slots`; sliding-window
    layers, whose ``update`` rebinds their attributes, get those attributes back; and a layer
    that a continuation only reads (Mllama's cross-attention) is left as it is either way.
    Built on an empty cache before the prompt's forward (``before``), the full-attention layers
    fill one :class:`_Arena` and :meth:`prompt_done` takes the others' state after the forward.
    """

    def __init__(self, cache: Any, room: int, *, before: bool = False) -> None:
        from transformers.cache_utils import DynamicLayer

        self.cache = cache
        self.slots: list[_Slots] = []
        self.saved: list[tuple[Any, dict[str, Any]]] = []
        full = [layer for layer in cache.layers if type(layer) is DynamicLayer]
        if before:
            arena = _Arena(len(full))
            self.slots = [_Slots(layer, room, arena) for layer in full]
            return
        for layer in full:
            keys = getattr(layer, "keys", None)
            if keys is not None and keys.dim() == 4 and keys.shape[-2] > 0:
                self.slots.append(_Slots(layer, room))
        self.prompt_done()

    def prompt_done(self) -> None:
        """Take the state the class names' continuations go back to (the layers without slots;
        a layer the prompt's forward never updated loses its slots and is one of them)."""
        for slots in self.slots:
            if slots.prompt < 0:
                slots.close()
        self.slots = [slots for slots in self.slots if slots.prompt >= 0]
        mine = {id(slots.layer) for slots in self.slots}
        self.saved = [(layer, dict(layer.__dict__)) for layer in self.cache.layers if id(layer) not in mine]

    def rewind(self) -> None:
        for slots in self.slots:
            slots.rewind()
        for layer, state in self.saved:
            layer.__dict__.clear()
            layer.__dict__.update(state)

    def close(self) -> None:
        for slots in self.slots:
            slots.close()
        self.slots, self.saved, self.cache = [], [], None


class CacheRoom:
    """Room for the class names in the KV cache the prompt's forward is about to build.

    A pre-hook on the first decoder layer finds the forward's cache before anything is in it and,
    when :func:`rewindable`, puts its full-attention layers in one :class:`_Arena` with room for
    the longest name (:attr:`rewind`, handed to :func:`scores_from_cache`). A forward that passes
    its decoder layers no cache leaves :attr:`rewind` ``None``: the names then continue the cache
    as the forward left it.
    """

    def __init__(self, first_layer: Any, continuations: list[list[int]]) -> None:
        self.room = name_room(continuations)
        self.rewind: _Rewind | None = None
        self.seen = False
        self.handle = first_layer.register_forward_pre_hook(self._found, with_kwargs=True)

    def _found(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self.seen:
            return
        self.seen = True
        from transformers.cache_utils import Cache

        for value in (*args, *kwargs.values()):
            if isinstance(value, Cache):
                layers = value.layers if rewindable(value) else []
                if layers and not any(getattr(layer, "is_initialized", True) for layer in layers):
                    self.rewind = _Rewind(value, self.room, before=True)
                return

    def remove(self) -> None:
        """Take the hook off (after the prompt's forward); :attr:`rewind` stays for the names."""
        self.handle.remove()

    def close(self) -> None:
        self.remove()
        if self.rewind is not None:
            self.rewind.close()
            self.rewind = None


def name_room(continuations: list[list[int]]) -> int:
    """Cache positions the longest multi-token name needs after the prompt (all but its last token)."""
    return max((len(c) - 1 for c in continuations if len(c) > 1), default=0)


def rewindable(cache: Any) -> bool:
    """Whether :func:`scores_from_cache` can continue ``cache`` and go back to the prompt's: a
    transformers cache whose layers are all ``DynamicLayer`` or ``DynamicSlidingWindowLayer``
    (their ``update`` rebinds tensors, never writes into them; static, quantised and
    linear-attention layers do)."""
    try:
        from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
    except ImportError:
        return False
    layers = getattr(cache, "layers", None)
    known = (DynamicLayer, DynamicSlidingWindowLayer)
    return isinstance(layers, list) and all(type(layer) in known for layer in layers)


def scores_from_cache(
    model: Any, inputs: dict[str, Any], continuations: list[list[int]], extra: dict[str, Any], cache: Any,
    last_logits: Any, rewind: _Rewind | None = None,
) -> Any:
    """``[B, K]`` length-normalised scores from the prompt's forward (left-padded inputs):
    its last-position logits ``last_logits`` score every name's first token; each multi-token
    name's remaining tokens continue the KV ``cache`` it returned, one name at a time and
    without the image inputs, and the cache goes back to the prompt's after each (:class:`_Rewind`:
    the prompt's keys and values are neither repeated nor copied per name). Equals
    :func:`scores_by_continuation`, which a cache that cannot be rewound (:func:`rewindable`) falls
    back to. ``rewind`` is the cache's :class:`CacheRoom` one, when the room was made before the
    prompt's forward. The cache is consumed."""
    import torch

    if not rewindable(cache):
        return scores_by_continuation(model, inputs, continuations, extra)
    input_ids = inputs["input_ids"]
    mask = inputs["attention_mask"]
    batch, prompt_len = input_ids.shape
    device = input_ids.device
    first = torch.log_softmax(last_logits.float(), dim=-1)
    sums = first[:, torch.tensor([c[0] for c in continuations], device=first.device)]
    longer = [k for k, c in enumerate(continuations) if len(c) > 1]
    deltas = getattr(getattr(model, "model", None), "rope_deltas", None)
    if rewind is not None and rewind.cache is cache:
        rewind.prompt_done()
    else:
        rewind = _Rewind(cache, name_room(continuations))
    try:
        for k in longer:
            fed, target = continuations[k][:-1], continuations[k][1:]  # tokens 1..m-1 go in, 2..m come out
            length = len(fed)
            ids = torch.tensor(fed, dtype=input_ids.dtype, device=device).expand(batch, -1)
            full_mask = torch.cat([mask, mask.new_ones((batch, length))], dim=1)
            kwargs: dict[str, Any] = {}
            for key, value in inputs.items():
                # per-token side inputs continue as in scores_by_continuation; image inputs stay out:
                # the image is in the cache
                if key in ("input_ids", "attention_mask") or not isinstance(value, torch.Tensor):
                    continue
                if value.shape[:2] == input_ids.shape:
                    kwargs[key] = _tail(model, key, value, length)
            positions = (full_mask.long().cumsum(-1) - 1).clamp(min=0)[:, prompt_len:]
            if "position_ids" in extra:
                kwargs["position_ids"] = positions
            elif isinstance(deltas, torch.Tensor):  # multimodal rotary (Qwen, GLM): text after the image
                delta = deltas.to(device).reshape(batch, -1)[:, :1]
                kwargs["position_ids"] = (positions + delta).unsqueeze(0).expand(3, batch, length)
            out = model(input_ids=ids, attention_mask=full_mask, **{_cache_kwarg(model): cache}, **kwargs)
            logp = torch.log_softmax(out.logits[:, -length:].float(), dim=-1)
            del out
            picked = logp.gather(-1, torch.tensor(target, device=logp.device).expand(batch, -1).unsqueeze(-1))
            sums[:, k] += picked.squeeze(-1).sum(dim=1).to(sums.device)
            rewind.rewind()
    finally:
        rewind.close()
    counts = torch.tensor([len(c) for c in continuations], dtype=sums.dtype, device=sums.device)
    return sums / counts


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
                value = torch.cat([value, _tail(model, key, value, len(tokens))], dim=1)
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
    forward per batch (and one continuation of its cache for multi-token names), no hooks,
    nothing else read.
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
            mask = inputs["attention_mask"]
            last = last_prompt_index(mask)
            left_padded = bool((last == mask.shape[1] - 1).all())
            continued = left_padded and not single_token(continuations) and continues_cache(family_name, model)
            if single_token(continuations) or continued:
                caching = {"use_cache": True} if continued and no_cache(model) else no_cache(model)
                out = model(**inputs, **extra, **caching, logits_to_keep=1 if left_padded else 0)
                if left_padded:
                    logits = out.logits[:, -1]
                else:
                    logits = out.logits[torch.arange(mask.shape[0], device=out.logits.device), last]
                cache = cache_of(out) if continued else None
                del out
                if single_token(continuations):
                    columns.append(scores_from_last_logits(logits, continuations).float().cpu())
                elif cache is not None:
                    columns.append(scores_from_cache(model, inputs, continuations, extra, cache, logits).float().cpu())
                else:
                    columns.append(scores_by_continuation(model, inputs, continuations, extra).float().cpu())
                del cache
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
