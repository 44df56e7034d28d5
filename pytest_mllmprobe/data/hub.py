"""Hugging Face ``datasets`` formats: parquet/arrow tables, ``save_to_disk`` folders, ``imagefolder``.

* A ``.parquet`` or ``.arrow`` file, or a folder of them (``data/train-00000-of-00002.parquet``
  ...): one row per image. The image column (``image``, else the one ``Image`` feature) holds
  ``{bytes, path}`` structs as ``datasets`` writes them, plain bytes, or paths; the label column
  (``label``, else the one ``ClassLabel``) holds integers into the ``ClassLabel``'s names, or
  strings. A shard whose path names a split (``train-*``, ``test/...``) is on that side.
* A ``save_to_disk`` folder (``state.json`` + arrow shards), or a ``DatasetDict`` one
  (``dataset_dict.json``, one folder per split).
* An ``imagefolder``: ``metadata.csv``/``metadata.jsonl`` with a ``file_name`` column, at the top
  or in each split folder; labels from a ``label`` column, else the image's class folder.

``group``/``patient_id`` and ``split`` columns are honoured as in manifests, other columns are
ignored (unless one looks like a misspelt group or split column); the dataset YAML renames them
(``image_column``, ``label_column``, ...). Table images stay in their file until the engine asks
for them (:mod:`.tables`).
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from ..errors import ConfigError, close_matches
from .config import Columns
from .dataset import Samples
from .images import StoredImage, bytes_hash, bytes_problem, file_problem, is_image_file
from .rows import SPLIT_NAMES, cell, csv_rows, jsonl_rows, natural, split_side, split_value
from .tables import TABLE_SUFFIXES, Table, class_label_names, feature_type, require_pyarrow

GROUP_DEFAULTS = ("group", "patient_id")
METADATA_FILES = ("metadata.csv", "metadata.jsonl")
_SPLIT_PART = re.compile(r"^(" + "|".join(SPLIT_NAMES) + r")(?=[-_.]|$)", re.IGNORECASE)
_YAML_HINT = "in a dataset YAML (source: <this data>)"


def hub_layout(folder: Path) -> str | None:
    """Which Hugging Face layout a folder has, or ``None`` for a plain class-folder tree."""
    if (folder / "dataset_dict.json").is_file():
        return "dataset_dict"
    if (folder / "state.json").is_file():
        return "save_to_disk"
    if _metadata_files(folder):
        return "imagefolder"
    files = [p for p in folder.rglob("*") if p.is_file()]
    tables = [p for p in files if p.suffix.lower() in TABLE_SUFFIXES]
    if not tables:
        return None
    images = [p for p in files if is_image_file(p)]
    if images:
        raise ConfigError(
            f"--mllm-data {str(folder)!r} holds both parquet/arrow tables "
            f"({str(tables[0].relative_to(folder))!r}) and image files "
            f"({str(images[0].relative_to(folder))!r}); point --mllm-data at one of them"
        )
    return "tables"


def read_hub(path: Path, columns: Columns, skip: bool) -> Samples | None:
    """Read a table file or a Hugging Face folder; ``None`` when ``path`` is neither."""
    if path.is_file():
        return _read_tables(path, [(path, None, None)], columns, skip, path.suffix.lower()[1:])
    layout = hub_layout(path)
    if layout is None:
        return None
    if layout == "imagefolder":
        return read_imagefolder(path, columns, skip)
    if layout == "dataset_dict":
        parts = _dataset_dict_parts(path)
    elif layout == "save_to_disk":
        parts = [(file, None, features) for file, features in _saved_files(path)]
    else:
        parts = _shard_parts(path)
    return _read_tables(path, parts, columns, skip, layout)


# --- where the tables are ----------------------------------------------------------------

def _saved_files(folder: Path) -> list[tuple[Path, dict[str, Any] | None]]:
    """The arrow shards of one ``save_to_disk`` folder, in order, with its dataset_info features."""
    state = _json(folder / "state.json")
    names = [f.get("filename") for f in state.get("_data_files", []) if isinstance(f, dict)]
    files = [folder / n for n in names if n] or sorted(folder.glob("*.arrow"))
    missing = [f.name for f in files if not f.is_file()]
    if not files or missing:
        lost = f"state.json lists arrow file(s) {missing} that are not there" if missing else "it holds no arrow file"
        raise ConfigError(
            f"save_to_disk folder {str(folder)!r}: {lost}; save the dataset again with save_to_disk"
        )
    info = folder / "dataset_info.json"
    features = _json(info).get("features") if info.is_file() else None
    return [(f, features if isinstance(features, dict) else None) for f in files]


def _dataset_dict_parts(folder: Path) -> list[tuple[Path, bool | None, dict[str, Any] | None]]:
    splits = _json(folder / "dataset_dict.json").get("splits")
    if not isinstance(splits, list) or not splits:
        raise ConfigError(f"{str(folder / 'dataset_dict.json')!r} lists no splits; save the DatasetDict again")
    sides = {}
    for split in map(str, splits):
        side = split_side(split)
        if side is None:
            raise ConfigError(
                f"DatasetDict folder {str(folder)!r}: split {split!r} is neither train nor test "
                f"({', '.join(SPLIT_NAMES)}); point --mllm-data at one split's folder "
                f"({str(folder / split)!r}), or rename the split"
            )
        sides[split] = side
    both = len(set(sides.values())) == 2
    return [(file, sides[s] if both else None, features)
            for s in sides for file, features in _saved_files(folder / s)]


def _shard_parts(folder: Path) -> list[tuple[Path, bool | None, None]]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in TABLE_SUFFIXES)
    sides: dict[Path, bool | None] = {}
    for file in files:
        words = [m.group(1) for part in file.relative_to(folder).parts if (m := _SPLIT_PART.match(part))]
        sides[file] = split_side(words[0]) if words else None
    named = [f for f in files if sides[f] is not None]
    if named and len(named) < len(files):
        odd = next(f for f in files if sides[f] is None)
        raise ConfigError(
            f"--mllm-data {str(folder)!r}: {str(odd.relative_to(folder))!r} names no split, but "
            f"{str(named[0].relative_to(folder))!r} does; name every shard's split (train-*, "
            "test-*) or none"
        )
    both = len({sides[f] for f in named}) == 2
    return [(f, sides[f] if both else None, None) for f in files]


def _json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {str(path)!r}: {exc}; save the dataset again") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{str(path)!r} holds {type(raw).__name__}, not a JSON object; save the dataset again")
    return raw


# --- columns ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Roles:
    """Which column holds what; ``None`` for an optional column the data lacks."""

    image: str
    label: str | None
    group: str | None
    split: str | None


def _pick(role: str, default: str, columns: list[str], typed: list[str], name: str) -> str:
    """``default`` if present, else the one column of the matching feature type; else an error."""
    if default in columns:
        return default
    if len(typed) == 1:
        return typed[0]
    raise ConfigError(
        f"{name} has no {role} column {default!r}{close_matches(default, columns)}; its columns "
        f"are {columns}: name the {role} column with {role}_column: <column> {_YAML_HINT}"
    )


def _roles(name: str, columns: list[str], features: dict[str, Any], wanted: Columns, *, image_kind: str) -> Roles:
    explicit = set(wanted.explicit)
    for key in sorted(explicit - {"ignore_columns"}):
        column = getattr(wanted, key.removesuffix("_column"))
        if key == "path_column" and image_kind == "table":
            raise ConfigError(
                f"{name}: path_column applies to manifests and imagefolder metadata; name the "
                "image column of a parquet/arrow table with image_column"
            )
        if key == "image_column" and image_kind == "file":
            raise ConfigError(f"{name}: image_column applies to parquet/arrow tables; imagefolder "
                              "metadata names its files in file_name (or path_column)")
        if column not in columns:
            raise ConfigError(
                f"{name} has no {column!r} column (set by {key}){close_matches(column, columns)}; "
                f"its columns are {columns}"
            )
    if image_kind == "table":
        typed = [c for c in columns if feature_type(features, c) == "Image"]
        image = wanted.image if "image_column" in explicit else _pick("image", wanted.image, columns, typed, name)
        typed = [c for c in columns if feature_type(features, c) == "ClassLabel"]
        label: str | None = (wanted.label if "label_column" in explicit
                             else _pick("label", wanted.label, columns, typed, name))
    else:
        image = wanted.path if "path_column" in explicit else "file_name"
        if image not in columns:
            raise ConfigError(
                f"{name} has no {image!r} column{close_matches(image, columns)}; its columns are "
                f"{columns}: imagefolder metadata names each image in file_name (or set path_column "
                f"{_YAML_HINT})"
            )
        label = wanted.label if wanted.label in columns else None
    group = wanted.group if "group_column" in explicit else next((c for c in GROUP_DEFAULTS if c in columns), None)
    split = wanted.split if wanted.split in columns else None
    roles = Roles(image, label, group, split)
    _refuse_near_misses(name, columns, roles, wanted.ignore)
    return roles


def _refuse_near_misses(name: str, columns: list[str], roles: Roles, ignore: tuple[str, ...]) -> None:
    """An unused column that looks like a misspelt group or split column is an error, not ignored."""
    used = {roles.image, roles.label, roles.group, roles.split, *ignore}
    wanted = {"group_column": GROUP_DEFAULTS if roles.group is None else (),
              "split_column": ("split",) if roles.split is None else ()}
    for column in columns:
        if column in used:
            continue
        for key, targets in wanted.items():
            if difflib.get_close_matches(column.casefold(), targets, n=1, cutoff=0.8):
                raise ConfigError(
                    f"{name}: column {column!r} looks like a {key.removesuffix('_column')} column but "
                    f"is not one; name it with {key}: {column} {_YAML_HINT}, or list it under "
                    "ignore_columns"
                )


# --- tables -------------------------------------------------------------------------------

class _LabelProblems:
    """Labels outside the class list, gathered over every split before one message names them."""

    def __init__(self) -> None:
        self.found: dict[tuple[str, Any], list[Any]] = {}

    def add(self, split: str, label: Any, where: str) -> None:
        self.found.setdefault((split, label), [0, where])[0] += 1

    def raise_if_any(self, label_column: str, names: list[str]) -> None:
        if not self.found:
            return
        by_split: dict[str, list[Any]] = {}
        for (split, label), _ in sorted(self.found.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
            by_split.setdefault(split, []).append(label)
        listed = "; ".join(f"{split or 'the data'}: {labels}" for split, labels in by_split.items())
        rows = sum(count for count, _ in self.found.values())
        first = next(iter(self.found.values()))[1]  # the first row found
        raise ConfigError(
            f"{first}: label(s) not in the class list {names} (the ClassLabel names of column "
            f"{label_column!r}, indices 0..{len(names) - 1}): {listed}, on {rows} row(s) in all; -1 "
            "means 'no label' in datasets: drop those rows (ds.filter(lambda row: row['label'] >= 0)), "
            "or fix the labels or the ClassLabel names"
        )


def _read_tables(
    root: Path, parts: list[tuple[Path, bool | None, dict[str, Any] | None]], wanted: Columns,
    skip: bool, source: str,
) -> Samples:
    tables = [(Table(file, features=features), side) for file, side, features in parts]
    first = tables[0][0]
    roles = _roles(first.name, first.columns, first.features, wanted, image_kind="table")
    names = class_label_names(first.features, roles.label) if roles.label else None
    pa = require_pyarrow(first.name)
    for table, _ in tables:
        missing = [c for c in (roles.image, roles.label, roles.group, roles.split) if c and c not in table.columns]
        if missing:
            raise ConfigError(
                f"{table.name} has no {missing[0]!r} column, which {first.name} has; its columns "
                f"are {table.columns}: every shard of one dataset needs the same columns"
            )
        own = class_label_names(table.features, roles.label) if roles.label else None
        if own != names:
            raise ConfigError(
                f"{table.name} names its classes {own} but {first.name} names them {names}; the "
                "shards and splits of one dataset need one ClassLabel (datasets: cast_column)"
            )
        _check_types(table, roles, pa)
    if roles.split and any(side is not None for _, side in tables):
        raise ConfigError(
            f"--mllm-data {str(root)!r} gives a split twice: the {roles.split!r} column and the "
            f"split names of its files; drop one (or set split_column to another column)"
        )
    predefined = roles.split is not None or any(side is not None for _, side in tables)
    samples = Samples(root=str(root), source=source, in_memory=[], groups=[] if roles.group else None,
                      is_test=[] if predefined else None, class_word="label")
    problems = _LabelProblems()
    needed = [c for c in dict.fromkeys((roles.image, roles.label, roles.group, roles.split)) if c]
    base = root if root.is_dir() else root.parent  # sample ids: the file's path below it, and the row
    for table, side in tables:
        rel = table.path.relative_to(base).as_posix()
        split = f"split {table.path.parent.name!r}" if source == "dataset_dict" else rel if len(tables) > 1 else ""
        for row, values in table.rows(needed):
            where = f"{table.name} row {row}"
            name = _label(values[roles.label], names, where, roles.label)
            if name is None:
                problems.add(split, values[roles.label], where)
            if problems.found:
                continue  # only the labels are gathered now; the images are not checked
            group = cell(values[roles.group], where, roles.group) if roles.group else None
            is_test = split_value(values[roles.split], where, roles.split) if roles.split else side
            _add(samples, table, roles.image, row, values[roles.image], f"{rel}:{row}", name, where, group,
                 is_test, skip)
    if names is not None:
        problems.raise_if_any(roles.label, names)  # type: ignore[arg-type]
    samples.classes = names if names is not None else sorted(set(samples.names), key=natural)
    return samples


def _check_types(table: Table, roles: Roles, pa: Any) -> None:
    types = pa.types
    kind = table.schema.field(roles.image).type
    images = (types.is_struct(kind) and kind.get_field_index("bytes") >= 0) or types.is_binary(kind) \
        or types.is_large_binary(kind) or types.is_string(kind) or types.is_large_string(kind)
    if not images:
        raise ConfigError(
            f"{table.name}: column {roles.image!r} holds {kind}, not images; expected an Image "
            "feature ({bytes, path}), encoded bytes or paths: name the image column with "
            f"image_column {_YAML_HINT}"
        )
    kind = table.schema.field(roles.label).type
    if not (types.is_integer(kind) or types.is_string(kind) or types.is_large_string(kind)):
        multi = " (multi-label data is not supported)" if types.is_list(kind) or types.is_large_list(kind) else ""
        raise ConfigError(
            f"{table.name}: label column {roles.label!r} holds {kind}{multi}; expected integer "
            f"class indices (a ClassLabel) or strings: name the label column with label_column {_YAML_HINT}"
        )


def _label(value: Any, names: list[str] | None, where: str, column: str) -> str | None:
    """The label's class name; ``None`` when an index lies outside the ClassLabel's names."""
    if value is None:
        raise ConfigError(f"{where}: {column!r} is empty; give every row a label, or drop the row")
    if names is None:
        return cell(value, where, column)
    return names[value] if isinstance(value, int) and 0 <= value < len(names) else None


def _encoded(table: Table, column: str, row: int) -> bytes:
    value = table.cell(column, row)
    return value["bytes"] if isinstance(value, dict) else value


def _add(samples: Samples, table: Table, column: str, row: int, image: Any, sample_id: str, name: str,
         where: str, group: str | None, is_test: bool | None, skip: bool) -> None:
    data = image.get("bytes") if isinstance(image, dict) else image if isinstance(image, bytes) else None
    path = image.get("path") if isinstance(image, dict) else image if isinstance(image, str) else None
    if data:
        problem = bytes_problem(data, decode=skip)
        if problem:
            samples.bad(sample_id, where, problem, skip)
            return
        stored = StoredImage(partial(_encoded, table, column), row, bytes_hash(data))
        samples.add(sample_id, name, where, image=stored, group=group, is_test=is_test)
        return
    if not path:
        raise ConfigError(f"{where}: {column!r} holds no image (neither bytes nor a path); fill it in or drop the row")
    file = Path(path).expanduser()
    file = file if file.is_absolute() else table.path.parent / file
    if not file.is_file():
        raise ConfigError(
            f"{where}: image {path!r} is not stored in the table and does not exist (looked for "
            f"{str(file)!r}); paths are relative to the table's folder; embed the images "
            "(datasets: save_to_disk or to_parquet after cast_column(Image())) or fix the path"
        )
    problem = file_problem(file, decode=skip)
    if problem:
        samples.bad(sample_id, where, problem, skip)
        return
    samples.add(sample_id, name, where, path=str(file), group=group, is_test=is_test)


# --- imagefolder --------------------------------------------------------------------------

def _metadata_files(folder: Path) -> list[Path]:
    """``metadata.csv``/``.jsonl`` at the top of ``folder`` or in its sub-folders (split folders)."""
    found = [folder / n for n in METADATA_FILES if (folder / n).is_file()]
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found.extend(sub / n for n in METADATA_FILES if (sub / n).is_file())
    return found


def read_imagefolder(root: Path, wanted: Columns, skip: bool) -> Samples:
    """An ``imagefolder`` with metadata files: one row per image, paths relative to the metadata file."""
    metas = _metadata_files(root)
    for meta in metas:
        if meta.suffix == ".csv" and meta.with_suffix(".jsonl").is_file():
            raise ConfigError(f"{str(meta.parent)!r} holds both metadata.csv and metadata.jsonl; keep one")
    read = [(meta, *(jsonl_rows if meta.suffix == ".jsonl" else csv_rows)(meta)) for meta in metas]
    sides = {meta: split_side(meta.parent.name) if meta.parent != root else None for meta in metas}
    roles_of = {meta: _roles(f"metadata {str(meta)!r}", header, {}, wanted, image_kind="file")
                for meta, header, _ in read}
    first = roles_of[metas[0]]
    for meta, roles in roles_of.items():
        for role in ("label", "group", "split"):
            if (getattr(roles, role) is None) != (getattr(first, role) is None):
                raise ConfigError(
                    f"metadata {str(meta)!r} and {str(metas[0])!r} differ in having a {role} "
                    "column; give every metadata file the same columns"
                )
    if first.split and any(side is not None for side in sides.values()):
        raise ConfigError(
            f"--mllm-data {str(root)!r} gives a split twice: the {first.split!r} column and the "
            "split folders; drop one"
        )
    folder_split = len({s for s in sides.values() if s is not None}) == 2
    if folder_split and None in sides.values():
        raise ConfigError(f"--mllm-data {str(root)!r}: {str(metas[0])!r} lies in no split folder, "
                          "but other metadata files do; put each in its split folder")
    samples = Samples(root=str(root), source="imagefolder", groups=[] if first.group else None,
                      is_test=[] if first.split or folder_split else None)
    seen: dict[str, str] = {}
    for meta, _, rows in read:
        roles = roles_of[meta]
        if not rows:
            raise ConfigError(f"metadata {str(meta)!r} lists no images; expected one row per image")
        for number, row in rows:
            where = f"metadata {str(meta)!r} line {number}"
            text = cell(row.get(roles.image), where, roles.image, numbers=False)
            file = meta.parent / text
            if not file.is_file():
                raise ConfigError(
                    f"{where}: file {text!r} does not exist (looked for {str(file)!r}); file_name is "
                    f"relative to the metadata file's folder: fix it or remove the row"
                )
            if roles.label:
                label = cell(row.get(roles.label), where, roles.label)
            elif len(Path(text).parts) > 1:
                label = Path(text).parent.name
            else:
                raise ConfigError(
                    f"{where}: {text!r} lies in no class folder and the metadata has no "
                    f"{wanted.label!r} column; its columns are {list(row)}: add a label column (or "
                    f"name it with label_column {_YAML_HINT}), or put images in class folders"
                )
            sample_id = file.relative_to(root).as_posix()
            if sample_id in seen:
                raise ConfigError(f"{where}: {text!r} is already listed ({seen[sample_id]}); list each image once")
            seen[sample_id] = where
            group = cell(row.get(roles.group), where, roles.group) if roles.group else None
            is_test = split_value(row.get(roles.split), where, roles.split) if roles.split else sides[meta]
            problem = file_problem(file, decode=skip)
            if problem:
                samples.bad(sample_id, where, problem, skip)
                continue
            samples.add(sample_id, label, where, path=str(file), group=group, is_test=is_test)
    samples.classes = sorted(set(samples.names), key=natural)
    return samples


__all__ = ["hub_layout", "read_hub", "read_imagefolder"]
