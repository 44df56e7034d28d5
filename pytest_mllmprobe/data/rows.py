"""Rows of a manifest (CSV/TSV/JSONL) and the cell rules every tabular source shares.

Used by the manifests of :mod:`.sources` and the Hugging Face formats of :mod:`.hub`: reading
rows, a cell as text, a ``split`` value as train/test, and the natural order of labels.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError, close_matches

TRAIN_VALUES = ("train", "training", "val", "valid", "validation")
TEST_VALUES = ("test", "testing")
SPLIT_NAMES = TRAIN_VALUES + ("dev",) + TEST_VALUES  # names of split folders, shards and DatasetDict splits


def csv_rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    """The header and the ``(line number, row)`` pairs of a CSV (or ``.tsv``) file; blank lines skipped."""
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


def jsonl_rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    """The columns (in order of first use) and the ``(line number, row)`` pairs of a JSONL file."""
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


def cell(value: Any, where: str, column: str, *, numbers: bool = True) -> str:
    """A cell as non-empty text (numbers too, unless ``numbers`` is false); else a :class:`ConfigError`."""
    if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
        ok = False
    else:
        ok = isinstance(value, str) or (numbers and isinstance(value, (int, float)))
    text = str(value).strip() if ok else ""
    if not text:
        raise ConfigError(f"{where}: {column!r} is empty or not a string ({value!r}); fill it in")
    return text


def natural(label: str) -> tuple[int, Any]:
    """Sort key: integer labels numerically, before any other label."""
    return (0, int(label), "") if label.lstrip("-").isdigit() else (1, 0, label)  # type: ignore[return-value]


def split_value(value: Any, where: str, column: str) -> bool:
    """A ``split`` cell as ``True`` (test) or ``False`` (train; ``val`` counts as train)."""
    text = cell(value, where, column, numbers=False).lower()
    if text in TEST_VALUES:
        return True
    if text in TRAIN_VALUES:
        return False
    raise ConfigError(
        f"{where}: {column!r} is {value!r}{close_matches(text, TRAIN_VALUES + TEST_VALUES)}; use "
        "'train' or 'test' ('val' counts as train)"
    )


def split_side(name: str) -> bool | None:
    """A split's name as ``True`` (test) or ``False`` (train, val, dev); ``None`` for any other name."""
    word = name.lower()
    return True if word in TEST_VALUES else False if word in SPLIT_NAMES else None
