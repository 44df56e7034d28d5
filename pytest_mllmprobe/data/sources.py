"""Sources on disk: :func:`load_dataset` (the one entry point), image/DICOM folders, manifests.

``.npz`` archives and ``module:function`` entries live in :mod:`.arrays`; the dataset YAML in
:mod:`.config`. Every source becomes :class:`~.dataset.Samples`, then a :class:`Dataset` through
:func:`~.dataset.build_dataset`, which applies the class names and the shared checks.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError, close_matches
from .arrays import read_entry, read_npz
from .config import Columns, DatasetConfig, is_entry, read_config
from .dataset import Dataset, Samples, build_dataset, subsample
from .images import DICOM_SUFFIXES, IMAGE_SUFFIXES, file_problem, is_image_file

MANIFEST_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson")
KINDS = (
    "a folder laid out as data/<class>/<image> (images or DICOM), a .csv/.tsv/.jsonl manifest, "
    "a MedMNIST-style .npz, a dataset .yaml, or module:function"
)
TRAIN_VALUES = ("train", "training", "val", "valid", "validation")
TEST_VALUES = ("test", "testing")


def load_dataset(
    spec: str | Path, *, max_samples: int | None = None, seed: int = 0, skip_bad_images: bool = False,
) -> Dataset:
    """Load any supported source (see ``docs/data.md``); :class:`ConfigError` on bad input.

    ``max_samples`` keeps a class-stratified, seeded subset; ``skip_bad_images`` leaves
    unreadable images out (listed in ``Dataset.skipped``) instead of failing.
    """
    spec = str(spec)
    config: DatasetConfig | None = None
    if is_entry(spec):
        samples = read_entry(spec, skip_bad_images)
    else:
        path = _existing(spec)
        if path.suffix.lower() in (".yaml", ".yml") and path.is_file():
            config = read_config(path)
            samples = _read_source(config.source, config.columns, skip_bad_images, config.file)
        else:
            samples = _read_source(spec, Columns(), skip_bad_images, None)
    dataset = build_dataset(
        samples,
        class_names=config.class_names if config else None,
        display_names=config.display_names if config else None,
        prompt=config.prompt if config else None,
        origin=f"dataset file {config.file!r}" if config else "",
    )
    if max_samples is not None and max_samples < len(dataset):
        dataset = subsample(dataset, max_samples, seed)
    return dataset


def load_image_folder(root: str | Path, *, max_samples: int | None = None, seed: int = 0,
                      skip_bad_images: bool = False) -> Dataset:
    """Read ``root/<class>/<image>`` (images or DICOM); classes sorted by folder name."""
    path = _existing(str(root))
    if not path.is_dir():
        raise ConfigError(
            f"--mllm-data {str(root)!r} is a file; expected a folder with one sub-folder per "
            "class (data/<class>/<image>)"
        )
    dataset = build_dataset(read_folder(path, skip_bad_images))
    if max_samples is not None and max_samples < len(dataset):
        dataset = subsample(dataset, max_samples, seed)
    return dataset


def _existing(spec: str, what: str | None = None) -> Path:
    path = Path(spec).expanduser()
    if path.exists():
        return path
    siblings = [p.name for p in path.parent.iterdir()] if path.parent.is_dir() else []
    what = what or f"--mllm-data {spec!r}"
    raise ConfigError(f"{what} does not exist{close_matches(path.name, siblings)}; expected {KINDS}")


def _read_source(source: str, columns: Columns, skip: bool, config_file: str | None) -> Samples:
    if is_entry(source):
        samples = read_entry(source, skip)
    else:
        shown = Path(source).name if config_file else source
        path = _existing(source, f"dataset file {config_file!r}: source {shown!r}" if config_file else None)
        suffix = path.suffix.lower()
        if path.is_dir():
            samples = read_folder(path, skip)
        elif suffix in MANIFEST_SUFFIXES:
            return read_manifest(path, columns, skip)
        elif suffix == ".npz":
            samples = read_npz(path, skip)
        elif suffix in (".yaml", ".yml"):
            raise ConfigError(f"{source!r} is a dataset YAML inside a dataset YAML; point source at the data")
        else:
            raise ConfigError(
                f"--mllm-data {source!r}: cannot tell what kind of data a {suffix or 'suffix-less'} "
                f"file is; expected {KINDS}"
            )
    if columns.explicit:
        raise ConfigError(
            f"dataset file {config_file!r}: {columns.explicit[0]} applies to .csv/.jsonl manifests "
            f"only, and source {source!r} is not one; remove it"
        )
    return samples


# --- folders -------------------------------------------------------------------------------

def read_folder(root: Path, skip: bool) -> Samples:
    """``root/<class>/<file>``: every image or DICOM file below a class folder is a sample."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    samples = Samples(root=str(root), source="folder", classes=classes, class_word="class folder")
    files_by_class = {
        name: sorted(p for p in (root / name).rglob("*") if p.is_file() and is_image_file(p))
        for name in classes
    }
    if not any(files_by_class.values()):
        loose = [p.name for p in root.iterdir() if p.is_file() and is_image_file(p)]
        hint = f" ({len(loose)} image(s) lie directly in it: move them into class folders)" if loose else ""
        raise ConfigError(
            f"--mllm-data {str(root)!r} holds no images{hint}; expected data/<class>/<image> with "
            f"image files ({', '.join(IMAGE_SUFFIXES + DICOM_SUFFIXES)}) in at least two class folders"
        )
    for name, files in files_by_class.items():
        for file in files:
            rel = file.relative_to(root).as_posix()
            problem = file_problem(file, decode=skip)
            if problem:
                samples.bad(rel, f"--mllm-data {str(root)!r}", problem, skip)
                continue
            samples.add(rel, name, f"{str(root)!r}: {rel}", path=str(file))
    return samples


# --- manifests -----------------------------------------------------------------------------

def _csv_rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            return [], []
        header = [h.strip() for h in header]
        rows = []
        for values in reader:
            if not any(v.strip() for v in values):
                continue
            if len(values) != len(header):
                raise ConfigError(
                    f"manifest {str(path)!r} line {reader.line_num}: {len(values)} fields but the "
                    f"header has {len(header)} ({', '.join(header)}); fix the row (quote values "
                    "that hold the delimiter)"
                )
            rows.append((reader.line_num, dict(zip(header, (v.strip() for v in values)))))
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise ConfigError(f"manifest {str(path)!r}: the header names column {dupes[0]!r} twice; rename one")
    return header, rows


def _jsonl_rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    columns: dict[str, None] = {}
    rows = []
    with open(path, encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(
                    f"manifest {str(path)!r} line {number} is not valid JSON ({exc.msg}); write one "
                    'object per line, e.g. {"path": "a.png", "label": "benign"}'
                ) from None
            if not isinstance(row, dict):
                raise ConfigError(
                    f"manifest {str(path)!r} line {number}: expected a JSON object, got "
                    f"{type(row).__name__}"
                )
            columns.update(dict.fromkeys(row))
            rows.append((number, row))
    return list(columns), rows


def _cell(value: Any, where: str, column: str, *, numbers: bool = True) -> str:
    if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
        ok = False
    else:
        ok = isinstance(value, str) or (numbers and isinstance(value, (int, float)))
    text = str(value).strip() if ok else ""
    if not text:
        raise ConfigError(f"{where}: {column!r} is empty or not a string ({value!r}); fill it in")
    return text


def read_manifest(path: Path, columns: Columns, skip: bool) -> Samples:
    """A CSV/TSV/JSONL manifest: one row per image, paths relative to the manifest's folder."""
    jsonl = path.suffix.lower() in (".jsonl", ".ndjson")
    header, rows = (_jsonl_rows if jsonl else _csv_rows)(path)
    name = f"manifest {str(path)!r}"
    if not rows:
        raise ConfigError(
            f"{name} lists no images; expected one row per image with columns "
            f"{columns.path!r} and {columns.label!r}"
        )
    _check_columns(name, header, columns)
    has_group = columns.group in header
    has_split = columns.split in header
    samples = Samples(
        root=str(path), source="manifest", groups=[] if has_group else None,
        is_test=[] if has_split else None,
    )
    base = path.parent
    seen: dict[str, int] = {}
    labels: set[str] = set()
    for number, row in rows:
        where = f"{name} line {number}"
        for column in (columns.path, columns.label):
            if column not in row:
                raise ConfigError(f"{where}: no {column!r}; every row needs {columns.path!r} and {columns.label!r}")
        text = _cell(row[columns.path], where, columns.path, numbers=False)
        label = _cell(row[columns.label], where, columns.label)
        if isinstance(row[columns.label], float) and float(row[columns.label]).is_integer():
            label = str(int(row[columns.label]))
        file = Path(text).expanduser()
        file = file if file.is_absolute() else base / file
        if not file.is_file():
            raise ConfigError(
                f"{where}: file {text!r} does not exist (looked for {str(file)!r}); paths are "
                f"relative to the manifest's folder {str(base)!r}: fix the path or remove the row"
            )
        try:
            sample_id = file.resolve().relative_to(base.resolve()).as_posix()
        except ValueError:
            sample_id = Path(text).as_posix()
        if sample_id in seen:
            raise ConfigError(
                f"{where}: {text!r} is already listed on line {seen[sample_id]}; list each image once"
            )
        seen[sample_id] = number
        group = _cell(row.get(columns.group), where, columns.group) if has_group else None
        is_test = _split_value(row.get(columns.split), where, columns.split) if has_split else None
        labels.add(label)
        problem = file_problem(file, decode=skip)
        if problem:
            samples.bad(sample_id, where, problem, skip)
            continue
        samples.add(sample_id, label, where, path=str(file), group=group, is_test=is_test)
    samples.classes = sorted(labels, key=_natural)
    return samples


def _natural(label: str) -> tuple[int, Any]:
    return (0, int(label), "") if label.lstrip("-").isdigit() else (1, 0, label)  # type: ignore[return-value]


def _check_columns(name: str, header: list[str], columns: Columns) -> None:
    known = {columns.path, columns.label, columns.group, columns.split, *columns.ignore}
    for column in (columns.path, columns.label):
        if column not in header:
            raise ConfigError(
                f"{name} has no {column!r} column{close_matches(column, header)}; its columns are "
                f"{header}; rename the column, or name it with path_column/label_column in a "
                "dataset YAML"
            )
    for key in columns.explicit:
        wanted = getattr(columns, key.removesuffix("_column"), None)
        if key != "ignore_columns" and wanted not in header:
            raise ConfigError(
                f"{name} has no {wanted!r} column (set by {key}){close_matches(str(wanted), header)}; "
                f"its columns are {header}"
            )
    for column in header:
        if column not in known:
            raise ConfigError(
                f"{name}: unknown column {column!r}{close_matches(column, sorted(known))}; the "
                f"columns are {columns.path!r}, {columns.label!r} and optional {columns.group!r} "
                f"(patient id) and {columns.split!r} (train/test): rename it, or list it under "
                "ignore_columns (or name it as group_column/split_column) in a dataset YAML"
            )


def _split_value(value: Any, where: str, column: str) -> bool:
    text = _cell(value, where, column, numbers=False).lower()
    if text in TEST_VALUES:
        return True
    if text in TRAIN_VALUES:
        return False
    raise ConfigError(
        f"{where}: {column!r} is {value!r}{close_matches(text, TRAIN_VALUES + TEST_VALUES)}; use "
        "'train' or 'test' ('val' counts as train)"
    )


__all__ = ["load_dataset", "load_image_folder", "read_folder", "read_manifest"]
