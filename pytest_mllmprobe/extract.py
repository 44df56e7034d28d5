"""Pooled features at every locus from ONE forward pass per batch.

Forward hooks sit on every vision block, the connector and every decoder layer. Each hook
pools its output on the fly (float32 accumulation), so memory stays
O(loci x images x hidden): no layer's full token sequence outlives its hook.

Readouts:
  vision.<i>    mean over patch tokens (the class token, where there is one, is left out)
  connector     mean over the projected visual tokens
  llm.<i>.image mean over the image-token positions of the prompt
  llm.<i>.last  the last prompt token (found from the attention mask: left or right padding)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .answer import (
    CACHE_FALLBACK_NOTE, CacheRoom, cache_of, continues_cache, scores_by_continuation, scores_from_cache,
    scores_from_last_logits, single_token,
)
from .errors import ConfigError
from .inputs import first_tensor, last_prompt_index, no_cache
from .lens import LensHead
from .models.adapter import ModelAdapter
from .models.families import Segments
from .models.stages import StageMap
from .selection import NO_STOP_NOTE, Need, stop_after


@dataclass
class Features:
    """Pooled features per locus (``[N, D]`` float32) and the answer scores (``[N, K]``)."""

    loci: dict[str, np.ndarray]
    #: ``None`` when the selection needed no answer (the forward may have stopped before the logits)
    answer_scores: np.ndarray | None
    #: the batch size the extraction finished with (smaller than asked after out-of-memory)
    batch_size: int | None = None
    #: ``[N, K]`` the model's own logits of each class name's first token at the last prompt
    #: position: what the logit lens must reproduce at the last layer (:func:`.lens.verify`)
    first_logits: np.ndarray | None = None
    #: the final norm and class-name head rows the lens reads through, or why there is none
    lens: LensHead | None = None
    lens_note: str | None = None
    #: ``[N, K]`` answer scores under other option orders and prompt wordings
    #: (``order.<r>``, ``prompt.<j>``; ``--mllm-answer-orders``, the dataset's ``prompts``)
    variant_scores: dict[str, np.ndarray] = field(default_factory=dict)
    #: how the extraction ran where it differs from the plan (the forward could not stop early)
    notes: list[str] = field(default_factory=list)

    @property
    def n_images(self) -> int:
        if self.answer_scores is not None:
            return int(self.answer_scores.shape[0])
        return int(next(iter(self.loci.values())).shape[0]) if self.loci else 0

    def has(self, need: Need) -> bool:
        """Whether these features hold everything ``need`` asks for."""
        return need.missing_from(self.loci, self.answer_scores is not None).empty

    def merged(self, other: Features) -> Features:
        """These features with ``other``'s loci (and answer, lens, variants where it has them) added."""
        from dataclasses import replace

        answer = other.answer_scores is not None
        return replace(
            self, loci={**self.loci, **other.loci},
            answer_scores=other.answer_scores if answer else self.answer_scores,
            first_logits=other.first_logits if answer else self.first_logits,
            variant_scores=other.variant_scores if answer else self.variant_scores,
            lens=other.lens if other.lens is not None else self.lens,
            lens_note=other.lens_note if other.lens is not None else self.lens_note,
            notes=[*self.notes, *other.notes],
            batch_size=other.batch_size if other.batch_size is not None else self.batch_size,
        )

    def only(self, need: Need) -> Features:
        """These features restricted to ``need``'s loci (the answer dropped when not needed)."""
        from dataclasses import replace

        loci = {n: X for n, X in self.loci.items() if n in need.loci}
        if need.answer:
            return replace(self, loci=loci)
        return replace(self, loci=loci, answer_scores=None, first_logits=None, variant_scores={})


class AnswerScoringWarning(UserWarning):
    """The answer is scored the slow way (one more full forward per multi-token class)."""


class ExtractionError(RuntimeError):
    """A hook did not fire, fired twice, or saw a shape it cannot pool."""


class _StopForward(BaseException):
    """Raised by the hook of the last needed locus and caught in :func:`_one_batch`: the rest of
    the forward (the language model, for a vision-only selection) never runs (baukit's
    ``StopForward``). A ``BaseException``, so model code that catches ``Exception`` for a
    fallback of its own does not swallow it. Private: it never leaves this module."""


def _first_tensor(output: Any) -> Any:
    tensor = first_tensor(output)
    if tensor is not None:
        return tensor
    raise ExtractionError(f"cannot read a tensor from a module output of type {type(output).__name__}")


def _pool_per_image(
    name: str, hidden: Any, rows: Sequence[int] | None, *, flat: bool = False, drop_cls: bool = False,
    mask: Any = None,
) -> Any:
    """One pooled row per image from a stage output.

    ``[rows, tokens, hidden]`` (or ``[rows, h, w, hidden]``): mean over tokens (the class token
    left out when ``drop_cls``), then over the rows (tiles) of each image when ``rows`` counts
    them. ``flat``: the whole batch is one token sequence (``[tokens, hidden]`` as in Qwen2-VL,
    or ``[1, tokens, hidden]`` as in Pixtral); ``rows`` counts the tokens of each image and each
    image's tokens are averaged. ``mask`` (bool ``[rows, tokens]``) keeps only the real tokens
    (it decides about class tokens itself): each image is the mean over the real tokens of its rows.
    """
    import torch

    if flat and rows is not None and (hidden.dim() == 2 or (hidden.dim() == 3 and hidden.shape[0] == 1)):
        pooled = hidden.reshape(-1, hidden.shape[-1]).float()
        what = "tokens"
    elif hidden.dim() >= 3 and not flat:
        tokens = hidden.flatten(1, -2)  # [rows, h, w, hidden] (Aya Vision's connector) -> [rows, h*w, hidden]
        if mask is not None:  # the mask marks the real tokens itself (class tokens included or not)
            return _masked_pool(name, tokens, rows, mask)
        tokens = tokens[:, 1:] if drop_cls else tokens
        pooled = tokens.float().mean(dim=1)
        if rows is None:
            return pooled
        what = "tiles"
    else:
        raise ExtractionError(
            f"{name}: expected [batch, tokens, hidden], got {tuple(hidden.shape)} (a batch flattened "
            "into one token sequence needs the family's per-image token counts in models/families.py)"
        )
    if sum(rows) != pooled.shape[0]:
        raise ExtractionError(
            f"{name}: the output has {pooled.shape[0]} rows but the batch's images have {sum(rows)} {what}"
        )
    return torch.stack([chunk.mean(0) for chunk in torch.split(pooled, list(rows))])


def _masked_pool(name: str, tokens: Any, rows: Sequence[int] | None, mask: Any) -> Any:
    """Mean over the real tokens (``mask``) of each image's rows of ``tokens [rows, T, hidden]``."""
    import torch

    if tuple(mask.shape) != tuple(tokens.shape[:2]):
        raise ExtractionError(
            f"{name}: the output has {tuple(tokens.shape[:2])} rows x tokens but the padding mask "
            f"{tuple(mask.shape)}"
        )
    weights = mask.to(device=tokens.device, dtype=torch.float32)
    sums = torch.einsum("rt,rth->rh", weights, tokens.float())
    counts = weights.sum(dim=1)
    if rows is not None:
        if sum(rows) != sums.shape[0]:
            raise ExtractionError(f"{name}: the output has {sums.shape[0]} rows but the batch's images have {sum(rows)}")
        sums = torch.stack([chunk.sum(0) for chunk in torch.split(sums, list(rows))])
        counts = torch.stack([chunk.sum() for chunk in torch.split(counts, list(rows))])
    if bool((counts == 0).any()):
        raise ExtractionError(f"{name}: an image of the batch has no real (unpadded) token")
    return sums / counts.unsqueeze(1)


class PoolingHooks:
    """Forward hooks on every locus; use as a context manager so they are always removed."""

    def __init__(self, model: Any, stage_map: StageMap, loci: Collection[str] | None = None,
                 stop_after: str | None = None) -> None:
        self.model = model
        self.stage_map = stage_map
        #: the loci to pool (``None``: every locus); hooks sit only on their modules
        self.loci = None if loci is None else frozenset(loci)
        #: the locus whose hook ends the forward (:class:`_StopForward`); ``None``: run to the end
        self.stop_after = stop_after
        self._handles: list[Any] = []
        #: one preallocated ``[N, D]`` float32 array per locus, made when its hook first fires
        self.outputs: dict[str, np.ndarray] = {}
        self._n = 0
        self._rows = slice(0, 0)
        self._fired: set[str] = set()
        self._image_mask: Any = None
        self._last_index: Any = None
        self._segments = Segments()
        self._active = True
        #: whether this batch's stop hook raised :class:`_StopForward`, and whether the model caught it
        self.stopped = self.swallowed = False

    # -- context management -------------------------------------------------------------
    def __enter__(self) -> PoolingHooks:
        try:
            for i, path in enumerate(self.stage_map.vision_layers):
                if self._wanted(f"vision.{i}"):
                    self._register(path, self._vision_hook(f"vision.{i}"))
            if self._wanted("connector"):
                self._register(self.stage_map.connector, self._connector_hook())
            for i, path in enumerate(self.stage_map.llm_layers):
                if self._readouts(i):
                    self._register(path, self._llm_hook(i))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def _register(self, path: str, hook: Callable[..., None]) -> None:
        try:
            module = self.model.get_submodule(path)
        except AttributeError as exc:
            raise ConfigError(f"the model has no module {path!r} to hook: {exc}") from exc
        self._handles.append(module.register_forward_hook(hook))

    # -- per batch ------------------------------------------------------------------------
    def begin_batch(
        self, image_mask: Any, last_index: Any, segments: Segments | None = None, *, rows: slice, n: int
    ) -> None:
        """The next forward is images ``rows`` of ``n``: each hook writes its pooled rows there."""
        self._fired = set()
        self.stopped = self.swallowed = False
        self._rows = rows
        self._n = n
        self._image_mask = image_mask
        self._last_index = last_index
        self._segments = segments or Segments()

    def end_batch(self) -> None:
        expected = self.expected_loci()
        missing = [name for name in expected if name not in self._fired]
        if missing:
            raise ExtractionError(
                f"these hooks did not fire during the forward pass: {', '.join(missing)}; the "
                "detected stage modules are not on the model's forward path (override them with "
                "--mllm-stages)"
            )

    def expected_loci(self) -> list[str]:
        """The loci whose hooks must fire in every forward (the needed ones only)."""
        names = [f"vision.{i}" for i in range(len(self.stage_map.vision_layers))]
        names.append("connector")
        for i in range(len(self.stage_map.llm_layers)):
            names += [f"llm.{i}.{readout}" for readout in self.stage_map.llm_readouts]
        return [n for n in names if self._wanted(n)]

    def _wanted(self, name: str) -> bool:
        return self.loci is None or name in self.loci

    def _readouts(self, index: int) -> tuple[str, ...]:
        return tuple(r for r in self.stage_map.llm_readouts if self._wanted(f"llm.{index}.{r}"))

    def _maybe_stop(self, *names: str) -> None:
        if self.stop_after is not None and self.stop_after in names:
            self.stopped = True
            raise _StopForward(self.stop_after)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Ignore forwards run inside this block (the extra answer-scoring passes)."""
        self._active = False
        try:
            yield
        finally:
            self._active = True

    def _store(self, name: str, value: Any) -> None:
        """Write one batch's ``[B, D]`` pooled rows straight into the locus's ``[N, D]`` output.

        No per-batch tensor outlives its hook: many small tensors kept between the forward's
        large temporaries fragment the heap and raise the peak RSS far above what is kept.
        """
        import torch

        if name in self._fired:
            raise ExtractionError(
                f"the hook for {name} fired twice in one forward pass; this module is called more "
                "than once per image, so its output cannot be pooled per image"
            )
        self._fired.add(name)
        value = value.detach()
        expected = self._rows.stop - self._rows.start
        if value.shape[0] != expected:
            raise ExtractionError(f"{name}: the hook pooled {value.shape[0]} rows for a batch of {expected} images")
        if name not in self.outputs:
            self.outputs[name] = np.empty((self._n, value.shape[-1]), dtype=np.float32)
        torch.from_numpy(self.outputs[name][self._rows]).copy_(value)

    # -- hooks ----------------------------------------------------------------------------
    def _vision_hook(self, name: str) -> Callable[..., None]:
        def hook(module: Any, args: Any, output: Any) -> None:
            if not self._active:
                return
            hidden = _first_tensor(output)
            self._store(name, _pool_per_image(
                name, hidden, self._segments.vision, flat=self._segments.flat, drop_cls=self.stage_map.drop_cls,
                mask=self._segments.vision_mask,
            ))
            self._maybe_stop(name)

        return hook

    def _connector_hook(self) -> Callable[..., None]:
        def hook(module: Any, args: Any, output: Any) -> None:
            if not self._active:
                return
            hidden = _first_tensor(output)
            self._store("connector", _pool_per_image(
                "connector", hidden, self._segments.connector, flat=self._segments.flat,
                mask=self._segments.connector_mask,
            ))
            self._maybe_stop("connector")

        return hook

    def _llm_hook(self, index: int) -> Callable[..., None]:
        def hook(module: Any, args: Any, output: Any) -> None:
            if not self._active:
                return
            import torch

            hidden = _first_tensor(output)
            readouts = self._readouts(index)
            if "image" in readouts:
                mask = self._image_mask.to(hidden.device)
                counts = mask.sum(dim=1, keepdim=True)
                if bool((counts == 0).any()):
                    raise ExtractionError("a prompt in the batch holds no image tokens")
                # float32 accumulation of the image-token sum (bf16/fp16 forwards)
                image = torch.einsum("bt,bth->bh", mask.float(), hidden.float()) / counts
                self._store(f"llm.{index}.image", image)
            if "last" in readouts:
                rows = torch.arange(hidden.shape[0], device=hidden.device)
                self._store(f"llm.{index}.last", hidden[rows, self._last_index.to(hidden.device)].float())
            self._maybe_stop(*(f"llm.{index}.{r}" for r in readouts))

        return hook


def extract(
    model: Any,
    processor: Any,
    stage_map: StageMap,
    images: Callable[[Sequence[int]], list[Any]],
    prompts: Sequence[str],
    continuations: list[list[int]],
    *,
    batch_size: int,
    device: Any,
    dtype: Any,
    progress: Callable[[int, int], None] | None = None,
    padding_side: str = "left",
    on_oom: Callable[[int], None] | None = None,
    adapter: ModelAdapter | None = None,
    need: Need | None = None,
) -> Features:
    """Pooled features of every locus and answer scores for ``len(prompts)`` images.

    ``need`` (default: everything) names the loci to pool and whether the answer is scored;
    without the answer the forward stops after the hook of the last needed locus
    (:func:`.selection.stop_after`), unless the adapter says its model cannot stop early
    (``stops_early = False``) or the model caught the stop itself: then it runs to the end,
    only the needed loci are pooled, and ``Features.notes`` says so.

    ``images(indices)`` returns the PIL images of those sample indices, so images are read one
    batch at a time. Left padding is the default (the answer's continuation scoring needs it);
    right padding gives the same features. Out of memory halves the batch size and retries the
    same images (``on_oom(new_batch_size)`` is told); at batch size 1 it is an error.
    ``adapter`` feeds the model and splits its outputs per image (default: transformers' way).
    """
    import torch

    if stage_map.image_token_id is None and "image" in stage_map.llm_readouts:
        raise ConfigError(
            f"the {stage_map.family!r} config has no image_token_id / image_token_index: the "
            "image-token readout cannot find the image positions"
        )
    adapter = adapter if adapter is not None else ModelAdapter()
    if (need is None or need.answer) and not single_token(continuations) and not continues_cache(stage_map.family, model):
        import warnings

        warnings.warn(AnswerScoringWarning(CACHE_FALLBACK_NOTE.format(family=stage_map.family)), stacklevel=2)
    n = len(prompts)
    notes: list[str] = []
    answer = need is None or need.answer
    # the answer scores and first-token logits: one [N, K] array each, filled batch by batch as the
    # hooks fill theirs (a small tensor kept per batch would lie among the next forward's temporaries)
    scores, firsts = (np.zeros((n, len(continuations)), dtype=np.float32) for _ in range(2))
    stop = None if need is None else stop_after(stage_map, need)
    if stop is not None and not getattr(adapter, "stops_early", True):
        notes.append(NO_STOP_NOTE.format(why=f"the {type(adapter).__name__} adapter's model cannot stop early"))
        stop = None
    with PoolingHooks(model, stage_map, None if need is None else need.loci, stop) as hooks, \
            torch.inference_mode():
        start = 0
        while start < n:
            index = list(range(start, min(start + batch_size, n)))
            try:
                batch_scores, batch_firsts = _one_batch(
                    model, processor, stage_map, hooks, adapter, images(index), [prompts[i] for i in index],
                    continuations, device, dtype, padding_side, slice(index[0], index[-1] + 1), n, answer=answer,
                )
            except torch.OutOfMemoryError as exc:
                if batch_size == 1:
                    raise ExtractionError(out_of_memory_advice()) from exc
                free_accelerator_memory()
                batch_size = max(1, batch_size // 2)
                if on_oom is not None:
                    on_oom(batch_size)
                continue  # the same images again, in smaller batches
            if hooks.swallowed:  # the model caught the stop itself: run to the end from now on
                notes.append(NO_STOP_NOTE.format(why=f"the {stage_map.family} model caught the early stop"))
                hooks.stop_after = None
            if answer:
                scores[index[0]:index[-1] + 1] = batch_scores.numpy()
                firsts[index[0]:index[-1] + 1] = batch_firsts.numpy()
            start = index[-1] + 1
            if progress is not None:
                progress(start, n)
    if not answer:
        return Features(loci=hooks.outputs, answer_scores=None, batch_size=batch_size, notes=notes)
    return Features(loci=hooks.outputs, answer_scores=scores, batch_size=batch_size, first_logits=firsts, notes=notes)


def _one_batch(
    model: Any, processor: Any, stage_map: StageMap, hooks: PoolingHooks, adapter: ModelAdapter, images: list[Any],
    prompts: list[str], continuations: list[list[int]], device: Any, dtype: Any, padding_side: str,
    rows: slice, n: int, *, answer: bool = True,
) -> Any:
    """One forward with the hooks on (they write rows ``rows`` of their outputs); the answer scores
    and the class names' first-token logits (for the lens check), or ``(None, None)`` without
    ``answer`` (the forward stops at the hooks' ``stop_after`` locus when they have one)."""
    import torch

    inputs = adapter.encode(processor, images, prompts, device, dtype, padding_side, family_name=stage_map.family)
    mask = inputs["attention_mask"]
    extra = adapter.positions(inputs, family_name=stage_map.family)
    last_index = last_prompt_index(mask)
    hooks.begin_batch(
        inputs["input_ids"] == stage_map.image_token_id if "image" in stage_map.llm_readouts else None,
        last_index,
        adapter.segments(stage_map, model, inputs),
        rows=rows, n=n,
    )
    left_padded = bool((last_index == mask.shape[1] - 1).all())
    # Left padding puts every row's last prompt token at the end: only its logits are needed.
    # No KV cache unless multi-token names continue it: building one raises the peak memory.
    continued = left_padded and not single_token(continuations) and continues_cache(stage_map.family, model)
    caching = {"use_cache": True} if continued and no_cache(model) else no_cache(model)
    room = CacheRoom(model.get_submodule(stage_map.llm_layers[0]), continuations) if continued else None
    try:
        try:
            out = model(**inputs, **extra, **caching, logits_to_keep=1 if left_padded else 0)
            hooks.swallowed = hooks.stopped  # raised, yet the forward returned: the model caught it
        except _StopForward:
            out = None  # the hook of the last needed locus ended the forward
        finally:
            if room is not None:
                room.remove()
        hooks.end_batch()
        if not answer:
            return None, None
        cache = cache_of(out) if continued else None
        if left_padded:
            last_logits = out.logits[:, -1]
        else:
            rows = torch.arange(mask.shape[0], device=out.logits.device)
            last_logits = out.logits[rows, last_index.to(out.logits.device)]
        del out
        first_ids = torch.tensor([c[0] for c in continuations], device=last_logits.device)
        first_logits = last_logits.index_select(-1, first_ids).float().cpu()
        if single_token(continuations):
            batch_scores = scores_from_last_logits(last_logits, continuations)
        elif not left_padded:
            raise ExtractionError("multi-token class names are scored on left-padded prompts only")
        else:
            with hooks.paused():
                if cache is not None:  # the class names continue the prompt's cache: no second image forward
                    batch_scores = scores_from_cache(model, inputs, continuations, extra, cache, last_logits,
                                                     rewind=room.rewind if room is not None else None)
                else:
                    batch_scores = scores_by_continuation(model, inputs, continuations, extra)
            del cache  # the cache lives for this batch only
        return batch_scores.float().cpu(), first_logits
    finally:
        if room is not None:
            room.close()


def out_of_memory_advice() -> str:
    """What to do when even one image does not fit: spreading the model over GPUs
    (``--mllm-device-map``) is one process's way, refused under torchrun, where each rank holds a
    whole model on its own GPU."""
    from .distributed import current

    group = current()
    if group is None:
        return ("out of memory with batch size 1: use --mllm-dtype bfloat16, a larger GPU, "
                "several GPUs (--mllm-device-map auto) or --mllm-device cpu")
    return (f"out of memory with batch size 1 on rank {group.rank} of {group.world} (each rank holds the whole "
            "model on its own GPU): use --mllm-dtype bfloat16 or larger GPUs, or run one process without "
            "torchrun and spread the model over the GPUs with --mllm-device-map auto")


def free_accelerator_memory() -> None:
    """Collect garbage and hand the CUDA caching allocator's free blocks back."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
