"""The :class:`Dataset` every source produces, and :func:`build_dataset`, the checks they share."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, close_matches
from .images import SKIP_HINT, StoredImage, file_hash, load_image, memory_hash, quick_file_hash, to_rgb


class DataWarning(UserWarning):
    """Something in the data that makes scores look better than they are (e.g. duplicates)."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """Images with integer labels into ``class_names``.

    A sample is a file (``paths[i]``) or, for ``.npz`` and Python sources, an in-memory image
    (``in_memory[i]``: a PIL image or numpy array, with ``paths[i] == ""``), or, for parquet and
    arrow tables, a :class:`~.images.StoredImage` read from its table on demand. :meth:`image`
    reads any of them as RGB. ``ids`` are stable sample ids used in results and baselines: paths relative
    to the folder or manifest, ``npz:test:12``, ``entry:5``.

    ``groups`` (patient ids) keep a patient's images on one side of every split;
    ``predefined_split`` (``True`` = test) fixes the split; ``display_names`` are the class
    names used in prompts, ``prompt`` a question template with ``{options}``; ``skipped`` lists
    the ``(id, reason)`` of unreadable images left out with ``skip_bad_images``.
    """

    root: str
    paths: tuple[str, ...]
    labels: np.ndarray
    class_names: tuple[str, ...]
    groups: np.ndarray | None = None
    predefined_split: np.ndarray | None = None
    display_names: tuple[str, ...] = ()
    prompt: str | None = None
    skipped: tuple[tuple[str, str], ...] = ()
    #: other wordings of the question (the dataset YAML's ``prompts``), for the answer's invariance
    prompts: tuple[str, ...] = ()
    in_memory: tuple[Any, ...] | None = None
    sample_ids: tuple[str, ...] = ()
    source: str = "folder"

    def __post_init__(self) -> None:
        if not self.display_names:
            object.__setattr__(self, "display_names", tuple(self.class_names))

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, index: int):
        """Sample ``index`` as an RGB PIL image."""
        if self.in_memory is not None and self.in_memory[index] is not None:
            if isinstance(self.in_memory[index], StoredImage):
                return self.in_memory[index].load(f"sample {self.ids[index]!r} of {self.root!r}")
            try:
                return to_rgb(self.in_memory[index])
            except ValueError as exc:
                raise ConfigError(f"sample {self.ids[index]!r} of {self.root!r}: {exc}") from exc
        return load_image(self.paths[index])

    @cached_property
    def ids(self) -> tuple[str, ...]:
        if self.sample_ids:
            return self.sample_ids
        return tuple(Path(p).relative_to(self.root).as_posix() for p in self.paths)

    @cached_property
    def content_hashes(self) -> tuple[str, ...]:
        """One hash per sample of its full content (file bytes or pixels): equal for duplicates."""
        return tuple(
            memory_hash(self.in_memory[i]) if self._in_memory(i) else file_hash(self.paths[i])
            for i in range(len(self))
        )

    @cached_property
    def fingerprint(self) -> str:
        """Hash of ids, labels, class names, groups, split and each sample's size and content.

        Files contribute their size and first/last 8 KiB (cheap); in-memory images their pixels.
        """
        digest = hashlib.sha256()
        digest.update("\0".join(self.class_names).encode() + b"\n")
        for i, sample_id in enumerate(self.ids):
            content = memory_hash(self.in_memory[i]) if self._in_memory(i) else quick_file_hash(self.paths[i])
            group = "" if self.groups is None else str(self.groups[i])
            split = "" if self.predefined_split is None else str(int(self.predefined_split[i]))
            digest.update(f"{sample_id}\0{int(self.labels[i])}\0{group}\0{split}\0{content}\n".encode())
        return digest.hexdigest()[:16]

    def _in_memory(self, index: int) -> bool:
        return self.in_memory is not None and self.in_memory[index] is not None

    def subset(self, indices: Sequence[int] | np.ndarray) -> Dataset:
        """The samples at ``indices`` (in that order), everything else kept."""
        keep = np.asarray(indices, dtype=np.int64)
        return Dataset(
            root=self.root,
            paths=tuple(self.paths[i] for i in keep),
            labels=self.labels[keep],
            class_names=self.class_names,
            groups=None if self.groups is None else self.groups[keep],
            predefined_split=None if self.predefined_split is None else self.predefined_split[keep],
            display_names=self.display_names,
            prompt=self.prompt,
            prompts=self.prompts,
            skipped=self.skipped,
            in_memory=None if self.in_memory is None else tuple(self.in_memory[i] for i in keep),
            sample_ids=tuple(self.ids[i] for i in keep),
            source=self.source,
        )


def subsample(dataset: Dataset, n: int, seed: int) -> Dataset:
    """A class-stratified, seeded subset of about ``n`` images (order kept)."""
    rng = np.random.default_rng(seed)
    k = len(dataset.class_names)
    if n < 2 * k:
        raise ConfigError(
            f"--mllm-max-samples {n} is too small for {k} classes; use at least {2 * k}"
        )
    keep: list[int] = []
    fraction = n / len(dataset)
    for c in range(k):
        idx = np.flatnonzero(dataset.labels == c)
        take = max(2, int(round(len(idx) * fraction)))
        keep.extend(rng.choice(idx, size=min(take, len(idx)), replace=False).tolist())
    keep.sort()
    return dataset.subset(keep)


@dataclass
class Samples:
    """What a source read, before classes are fixed: one entry per sample in every list.

    ``names`` are the samples' labels as the source spells them (folder names, manifest labels,
    or named integer labels); ``classes`` the source's own class order. ``where[i]`` says where
    sample i came from, for messages ("labels.csv line 7").
    """

    root: str
    source: str
    ids: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    in_memory: list[Any] | None = None
    names: list[str] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    groups: list[str] | None = None
    is_test: list[bool] | None = None
    where: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    class_word: str = "class"

    def add(
        self, sample_id: str, name: str, where: str, *, path: str = "", image: Any = None,
        group: str | None = None, is_test: bool | None = None,
    ) -> None:
        """Append one good sample."""
        self.ids.append(sample_id)
        self.names.append(name)
        self.where.append(where)
        self.paths.append(path)
        if self.in_memory is not None:
            self.in_memory.append(image)
        if self.groups is not None:
            self.groups.append("" if group is None else group)
        if self.is_test is not None:
            self.is_test.append(bool(is_test))

    def bad(self, sample_id: str, where: str, problem: str, skip: bool) -> None:
        """An unreadable image: recorded in ``skipped`` when ``skip``, else a :class:`ConfigError`."""
        if skip:
            self.skipped.append((sample_id, problem))
            return
        raise ConfigError(
            f"{where}: cannot read image {sample_id!r}: {problem}; remove or replace it, or skip "
            f"unreadable images with {SKIP_HINT}"
        )


def build_dataset(
    samples: Samples,
    *,
    class_names: Sequence[str] | dict[str, str] | None = None,
    display_names: dict[str, str] | None = None,
    prompt: str | None = None,
    origin: str = "",
    prompts: Sequence[str] = (),
) -> Dataset:
    """Fix the classes (``class_names`` selects and orders; a dict also renames), then check.

    ``origin`` names the file that gave ``class_names``/``display_names``, for messages.
    """
    what = origin or samples.root
    if not samples.ids:
        raise ConfigError(
            f"--mllm-data {samples.root!r} holds no images"
            + (f" ({len(samples.skipped)} unreadable image(s) skipped)" if samples.skipped else "")
            + "; a probe needs images of at least two classes"
        )
    native = list(samples.classes)
    chosen, renamed = _choose_classes(native, class_names, what)
    keep = [i for i, name in enumerate(samples.names) if name in renamed]
    if class_names is not None:
        _refuse_near_misses(samples, keep, chosen, what)
    final = [renamed[name] for name in chosen]
    index = {name: k for k, name in enumerate(chosen)}
    labels = np.asarray([index[samples.names[i]] for i in keep], dtype=np.int64)
    counts = np.bincount(labels, minlength=len(final)) if len(labels) else np.zeros(len(final), int)
    present = [final[k] for k in range(len(final)) if counts[k] > 0]
    if not present:
        raise ConfigError(
            f"--mllm-data {samples.root!r} holds no images of the classes {final}; "
            "a probe needs images of at least two classes"
        )
    if len(present) < 2:
        raise ConfigError(
            f"--mllm-data {samples.root!r} has only one class with images ({present[0]!r}); a probe "
            f"needs at least two classes: add images of another {samples.class_word}"
        )
    empty = [final[k] for k in range(len(final)) if counts[k] == 0]
    if empty:
        raise ConfigError(
            f"--mllm-data {samples.root!r}: {samples.class_word}(es) {', '.join(map(repr, empty))} "
            "hold no images; remove them (or leave them out of class_names) or add images"
        )
    display = _display_names(final, display_names, what)
    if prompt is not None:
        from ..prompts import question_text

        question_text(list(display), prompt)
    return Dataset(
        root=samples.root,
        paths=tuple(samples.paths[i] for i in keep),
        labels=labels,
        class_names=tuple(final),
        groups=_pick(samples.groups, keep, object),
        predefined_split=_pick(samples.is_test, keep, bool),
        display_names=display,
        prompt=prompt,
        prompts=tuple(prompts),
        skipped=tuple(samples.skipped),
        in_memory=None if samples.in_memory is None else tuple(samples.in_memory[i] for i in keep),
        sample_ids=tuple(samples.ids[i] for i in keep),
        source=samples.source,
    )


def _pick(values: list[Any] | None, keep: list[int], dtype: Any) -> np.ndarray | None:
    return None if values is None else np.asarray([values[i] for i in keep], dtype=dtype)


def _choose_classes(
    native: list[str], class_names: Sequence[str] | dict[str, str] | None, what: str
) -> tuple[list[str], dict[str, str]]:
    """The native classes kept (in order) and their final names."""
    if class_names is None:
        return native, {n: n for n in native}
    if isinstance(class_names, dict):
        pairs = [(str(k), str(v)) for k, v in class_names.items()]
    else:
        pairs = [(str(n), str(n)) for n in class_names]
        if _are_index_names(native, pairs):
            # integer labels with no names of their own: the list names labels 0, 1, 2 ... in order
            pairs = [(native[k], name) for k, (name, _) in enumerate(pairs)]
    unknown = [k for k, _ in pairs if k not in native]
    if unknown:
        numbered = native == [str(k) for k in range(len(native))]
        hint = (
            " (the labels are unnamed numbers: list one name per label 0, 1, ... in order, or map "
            "them, e.g. {0: benign, 1: malignant})" if numbered else ""
        )
        raise ConfigError(
            f"{what}: class_names entry {unknown[0]!r} is not a label in the data"
            f"{close_matches(unknown[0], native)}; the labels are {native}{hint}: fix the entry "
            "or the data"
        )
    for key in ("source", "final"):
        seen: set[str] = set()
        for k, v in pairs:
            item = k if key == "source" else v
            if item in seen:
                raise ConfigError(f"{what}: class_names lists {item!r} twice; list each class once")
            seen.add(item)
    return [k for k, _ in pairs], dict(pairs)


def _are_index_names(native: list[str], pairs: list[tuple[str, str]]) -> bool:
    defaults = [str(k) for k in range(len(native))]
    names = [k for k, _ in pairs]
    return native == defaults and len(names) == len(native) and not set(names) <= set(native)


def _refuse_near_misses(samples: Samples, keep: list[int], chosen: list[str], what: str) -> None:
    """A label left out by ``class_names`` that looks like a typo of a kept class is refused.

    A typo: the same name but for case, spaces or punctuation, or one edit away and on only a
    few rows (at most 10 % of the class it resembles); a whole class such as ``grade2`` beside a
    kept ``grade1`` is a deliberate subset, not a typo.
    """
    import difflib
    from collections import Counter

    kept = set(keep)
    counts = Counter(samples.names)
    squashed = {_squash(c): c for c in chosen}
    first: dict[str, int] = {}
    for i, name in enumerate(samples.names):
        if i not in kept:
            first.setdefault(name, i)
    for name, i in first.items():
        near = squashed.get(_squash(name))
        if near is None:
            close = difflib.get_close_matches(name, chosen, n=1, cutoff=0.8)
            if close and counts[name] <= max(2, 0.1 * counts[close[0]]):
                near = close[0]
        if near is not None:
            raise ConfigError(
                f"{samples.where[i] if samples.where else samples.ids[i]}: label {name!r} is not in "
                f"class_names (did you mean {near!r}?); fix the label, or add {name!r} to "
                f"class_names in {what}"
            )


def _squash(name: str) -> str:
    return "".join(ch for ch in name.casefold() if ch.isalnum())


def _display_names(final: list[str], display_names: dict[str, str] | None, what: str) -> tuple[str, ...]:
    display = dict(zip(final, final))
    for key, value in (display_names or {}).items():
        key = str(key)
        if key not in display:
            raise ConfigError(
                f"{what}: display_names key {key!r} is not a class{close_matches(key, final)}; "
                f"the classes are {final}"
            )
        display[key] = str(value)
    names = tuple(display[c] for c in final)
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(
            f"{what}: two classes share the display name {dupes[0]!r}; the model's answer could not "
            "tell them apart: give each class its own display name"
        )
    return names
