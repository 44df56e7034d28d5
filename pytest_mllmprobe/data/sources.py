"""Sources on disk: :func:`load_dataset` (the one entry point), image/DICOM folders, manifests.

``.npz`` archives and ``module:function`` entries live in :mod:`.arrays`; Hugging Face formats
in :mod:`.hub`; the dataset YAML in :mod:`.config`. Every source becomes :class:`~.dataset.Samples`, then a :class:`Dataset` through
:func:`~.dataset.build_dataset`, which applies the class names and the shared checks.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError, close_matches
from .arrays import read_entry, read_npz
from .config import Columns, DatasetConfig, is_entry, read_config
from .dataset import Dataset, Samples, build_dataset, subsample
from .hub import read_hub
from .images import DICOM_SUFFIXES, IMAGE_SUFFIXES, file_problem, is_image_file
from .rows import cell, csv_rows, jsonl_rows, natural, split_side, split_value
from .tables import TABLE_SUFFIXES

MANIFEST_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson")
KINDS = (
    "a folder laid out as data/<class>/<image> (images or DICOM), a .csv/.tsv/.jsonl manifest, "
    "a MedMNIST-style .npz, a .parquet/.arrow file, a Hugging Face save_to_disk or imagefolder "
    "folder, a dataset .yaml, or module:function"
)


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
        prompts=config.prompts if config else (),
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
        if path.is_dir() or suffix in TABLE_SUFFIXES:
            hub = read_hub(path, columns, skip)
            if hub is not None:
                return hub
            samples = read_folder(path, skip)
        elif suffix in MANIFEST_SUFFIXES:
            if "image_column" in columns.explicit:
                raise ConfigError(
                    f"dataset file {config_file!r}: image_column applies to parquet/arrow tables; "
                    "a manifest names its image files in path_column"
                )
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
            f"and Hugging Face tables and metadata only, and source {source!r} is none of them; "
            "remove it"
        )
    return samples


# --- folders -------------------------------------------------------------------------------

def read_folder(root: Path, skip: bool) -> Samples:
    """``root/<class>/<file>``: every image or DICOM file below a class folder is a sample.

    Split folders above the class folders (``root/train/<class>/<file>``, ``root/test/...``, as
    Hugging Face's ``imagefolder`` lays them out) give a predefined split, not classes.
    """
    tops = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    sides = {name: split_side(name) for name in tops}
    if None not in sides.values() and {True, False} <= set(sides.values()):
        parts = [(f"{top}/", root / top, sides[top]) for top in tops]
    else:
        parts = [("", root, None)]
    samples = Samples(root=str(root), source="folder", class_word="class folder",
                      is_test=[] if parts[0][2] is not None else None)
    files_by_class: dict[tuple[str, str], list[Path]] = {}
    for prefix, folder, _ in parts:
        for name in sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            files_by_class[prefix, name] = sorted(
                p for p in (folder / name).rglob("*") if p.is_file() and is_image_file(p)
            )
    samples.classes = sorted({name for _, name in files_by_class})
    if not any(files_by_class.values()):
        loose = [p.name for p in root.iterdir() if p.is_file() and is_image_file(p)]
        hint = f" ({len(loose)} image(s) lie directly in it: move them into class folders)" if loose else ""
        raise ConfigError(
            f"--mllm-data {str(root)!r} holds no images{hint}; expected data/<class>/<image> with "
            f"image files ({', '.join(IMAGE_SUFFIXES + DICOM_SUFFIXES)}) in at least two class folders"
        )
    side = {prefix: is_test for prefix, _, is_test in parts}
    for (prefix, name), files in files_by_class.items():
        for file in files:
            rel = file.relative_to(root).as_posix()
            problem = file_problem(file, decode=skip)
            if problem:
                samples.bad(rel, f"--mllm-data {str(root)!r}", problem, skip)
                continue
            samples.add(rel, name, f"{str(root)!r}: {rel}", path=str(file), is_test=side[prefix])
    return samples


# --- manifests -----------------------------------------------------------------------------

def read_manifest(path: Path, columns: Columns, skip: bool) -> Samples:
    """A CSV/TSV/JSONL manifest: one row per image, paths relative to the manifest's folder."""
    jsonl = path.suffix.lower() in (".jsonl", ".ndjson")
    header, rows = (jsonl_rows if jsonl else csv_rows)(path)
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
        text = cell(row[columns.path], where, columns.path, numbers=False)
        label = cell(row[columns.label], where, columns.label)
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
        group = cell(row.get(columns.group), where, columns.group) if has_group else None
        is_test = split_value(row.get(columns.split), where, columns.split) if has_split else None
        labels.add(label)
        problem = file_problem(file, decode=skip)
        if problem:
            samples.bad(sample_id, where, problem, skip)
            continue
        samples.add(sample_id, label, where, path=str(file), group=group, is_test=is_test)
    samples.classes = sorted(labels, key=natural)
    return samples


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


__all__ = ["load_dataset", "load_image_folder", "read_folder", "read_manifest"]
