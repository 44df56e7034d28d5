"""Train/test splits and k folds: predefined, stratified, or grouped by patient; leak warnings.

Rules, in order (``docs/data.md``):

1. A dataset with a predefined split (manifest ``split`` column, ``.npz`` test arrays) uses it;
   ``test_size`` and ``seed`` are then ignored.
2. With groups (patient ids) the split is grouped: every group lies wholly on one side, and the
   groups are assigned so that each class's test share comes close to ``test_size``.
3. Otherwise a seeded stratified split (scikit-learn's ``train_test_split``).

Index arrays are sorted. A :class:`DataWarning` is given when the same content (byte-identical
file or pixels) lies on both sides, or a patient straddles a predefined split.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import ConfigError
from .dataset import Dataset, DataWarning

Split = tuple[np.ndarray, np.ndarray]
_GROUPED_TRIES = 50


def split_indices(
    data: Dataset | np.ndarray | Sequence[int], test_size: float, seed: int,
    groups: np.ndarray | Sequence[Any] | None = None, *, check_leaks: bool = True,
) -> Split:
    """Sorted ``(train, test)`` sample indices of a :class:`Dataset` or of a label array."""
    labels, groups, predefined, names = _parts(data, groups)
    if predefined is not None:
        train, test = np.flatnonzero(~predefined), np.flatnonzero(predefined)
        _check_sides(labels, train, test, names, "the predefined split (split column / npz test arrays)")
        if groups is not None:
            _warn_straddling(groups, train, test)
    elif groups is not None:
        train, test = _grouped_split(labels, groups, test_size, seed, names)
    else:
        train, test = _stratified_split(labels, test_size, seed, names)
    if check_leaks and isinstance(data, Dataset):
        warn_duplicates(data, [(train, test)])
    return np.sort(train), np.sort(test)


def fold_indices(
    data: Dataset | np.ndarray | Sequence[int], k: int, seed: int,
    groups: np.ndarray | Sequence[Any] | None = None, *, check_leaks: bool = True,
) -> list[Split]:
    """``k`` stratified folds (grouped when there are groups): sorted ``(train, test)`` per fold."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    labels, groups, predefined, names = _parts(data, groups)
    if not isinstance(k, (int, np.integer)) or k < 2:
        raise ConfigError(f"--mllm-folds {k!r} must be an integer of at least 2 (e.g. 5)")
    if predefined is not None:
        raise ConfigError(
            "the data has a predefined train/test split (split column or npz test arrays), and "
            f"{k}-fold cross-validation would ignore it: drop --mllm-folds, or remove the split"
        )
    counts = np.bincount(labels)
    if groups is None:
        small = [(names[c], int(counts[c])) for c in np.flatnonzero((counts > 0) & (counts < k))]
        if small:
            raise ConfigError(
                f"class {small[0][0]!r} has {small[0][1]} image(s); {k}-fold cross-validation "
                f"needs at least {k} per class: add images or use fewer folds"
            )
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        folds = list(splitter.split(np.zeros(len(labels)), labels))
    else:
        _check_groups_per_class(labels, groups, names, 2, "cross-validation")
        n_groups = len(np.unique(groups))
        if n_groups < k:
            raise ConfigError(
                f"{k}-fold cross-validation grouped by patient needs at least {k} groups, and the "
                f"data has {n_groups}: use fewer folds or add patients"
            )
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        folds = list(splitter.split(np.zeros(len(labels)), labels, groups))
    out = [(np.sort(train), np.sort(test)) for train, test in folds]
    for number, (train, test) in enumerate(out, start=1):
        missing = sorted(set(np.unique(labels)) - set(np.unique(labels[train])))
        if missing:
            raise ConfigError(
                f"fold {number} of {k} has no training image of class {names[missing[0]]!r} (its "
                "patients all fell in that fold's test part): use fewer folds or add patients"
            )
    if check_leaks and isinstance(data, Dataset):
        warn_duplicates(data, out)
    return out


def _parts(data: Any, groups: Any) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, list[str]]:
    if isinstance(data, Dataset):
        labels = np.asarray(data.labels, dtype=np.int64)
        groups = data.groups if groups is None else groups
        predefined = data.predefined_split
        names = list(data.class_names)
    else:
        labels = np.asarray(data, dtype=np.int64)
        predefined = None
        names = [f"#{c}" for c in range(int(labels.max()) + 1 if len(labels) else 0)]
    if groups is not None:
        groups = np.asarray(groups, dtype=object)
        if len(groups) != len(labels):
            raise ConfigError(f"groups has {len(groups)} entries but there are {len(labels)} labels")
    return labels, groups, None if predefined is None else np.asarray(predefined, dtype=bool), names


def _stratified_split(labels: np.ndarray, test_size: float, seed: int, names: list[str]) -> Split:
    from sklearn.model_selection import train_test_split

    counts = np.bincount(labels)
    small = [names[c] for c in np.flatnonzero((counts > 0) & (counts < 2))]
    if small:
        raise ConfigError(
            f"class(es) {small} have fewer than 2 images; a stratified train/test split needs at "
            "least 2 per class (add images or remove the class)"
        )
    n_classes = int((counts > 0).sum())
    n_test = int(np.ceil(test_size * len(labels)))
    if n_test < n_classes or len(labels) - n_test < n_classes:
        raise ConfigError(
            f"--mllm-test-size {test_size} with {len(labels)} images leaves {n_test} test and "
            f"{len(labels) - n_test} train images for {n_classes} classes; each side needs at "
            "least one image per class: add images or change --mllm-test-size"
        )
    train, test = train_test_split(
        np.arange(len(labels)), test_size=test_size, stratify=labels, random_state=seed, shuffle=True
    )
    return train, test


def _check_groups_per_class(labels: np.ndarray, groups: np.ndarray, names: list[str], need: int, what: str) -> None:
    for c in np.unique(labels):
        owners = np.unique(groups[labels == c])
        if len(owners) < need:
            raise ConfigError(
                f"class {names[c]!r} has images from only {len(owners)} patient(s) "
                f"({', '.join(map(repr, owners[:3].tolist()))}); a {what} grouped by patient needs "
                f"at least {need} per class so both sides see the class: add patients or remove the class"
            )


def _grouped_split(labels: np.ndarray, groups: np.ndarray, test_size: float, seed: int, names: list[str]) -> Split:
    """Whole groups to test, greedily, until each class's test count nears ``test_size`` of it.

    Groups are visited in a seeded random order; a group goes to test when that brings the
    per-class test counts closer to their targets (relative squared error). Retried with a new
    order when a class would be missing from one side.
    """
    _check_groups_per_class(labels, groups, names, 2, "train/test split")
    keys, inverse = np.unique(groups.astype(str), return_inverse=True)
    n_classes = int(labels.max()) + 1
    per_group = np.zeros((len(keys), n_classes))
    np.add.at(per_group, (inverse, labels), 1)
    total = per_group.sum(axis=0)
    target = test_size * total
    weight = 1.0 / np.maximum(target, 1.0) ** 2
    present = total > 0
    rng = np.random.default_rng(seed)
    for _ in range(_GROUPED_TRIES):
        in_test = np.zeros(len(keys), dtype=bool)
        counts = np.zeros(n_classes)
        for g in rng.permutation(len(keys)):
            now = ((counts - target) ** 2 * weight).sum()
            after = ((counts + per_group[g] - target) ** 2 * weight).sum()
            if after < now:
                in_test[g] = True
                counts += per_group[g]
        train_counts = total - counts
        if (counts[present] > 0).all() and (train_counts[present] > 0).all():
            test_mask = in_test[inverse]
            return np.flatnonzero(~test_mask), np.flatnonzero(test_mask)
    raise ConfigError(
        f"no split grouped by patient puts every class on both sides with --mllm-test-size "
        f"{test_size} ({len(keys)} patients); add patients, or change --mllm-test-size"
    )


def _check_sides(labels: np.ndarray, train: np.ndarray, test: np.ndarray, names: list[str], what: str) -> None:
    for side, index in (("train", train), ("test", test)):
        missing = sorted(set(np.unique(labels)) - set(np.unique(labels[index])))
        if not len(index):
            raise ConfigError(f"{what} has no {side} images; mark some rows {side!r}")
        if missing:
            raise ConfigError(
                f"{what} has no {side} image of class {names[missing[0]]!r}; each side needs at "
                f"least one image per class: move some to {side}"
            )


def _warn_straddling(groups: np.ndarray, train: np.ndarray, test: np.ndarray) -> None:
    both = sorted(set(groups[train].tolist()) & set(groups[test].tolist()), key=str)
    if both:
        warnings.warn(
            f"{len(both)} patient group(s) have images on both sides of the predefined split "
            f"(e.g. {both[0]!r}); probe accuracy will be inflated: put each patient on one side",
            DataWarning, stacklevel=3,
        )


LEAK_WARNING = "image(s) in a test set have byte-identical copies in its training set"


def warn_duplicates(dataset: Dataset, splits: Sequence[Split]) -> int:
    """Warn once when any test sample's content also lies in its train set; returns how many."""
    hashes = np.asarray(dataset.content_hashes, dtype=object)
    leaked = 0
    example = ""
    for train, test in splits:
        train_hashes = set(hashes[train].tolist())
        for i in test:
            if hashes[i] in train_hashes:
                leaked += 1
                if not example:
                    twin = next(j for j in train if hashes[j] == hashes[i])
                    example = f"{dataset.ids[i]!r} = {dataset.ids[twin]!r}"
    if leaked:
        warnings.warn(
            f"{leaked} {LEAK_WARNING} (e.g. {example}); probe accuracy is inflated: remove the "
            "duplicates, or give copies the same group (patient id) so they stay on one side",
            DataWarning, stacklevel=3,
        )
    return leaked
