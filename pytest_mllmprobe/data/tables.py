"""Parquet and arrow files, read one chunk at a time with pyarrow (the optional ``[datasets]`` extra).

A :class:`Table` is one file: its column names, its Hugging Face features (which column is an
``Image``, the names of a ``ClassLabel``) and its chunks (parquet row groups, arrow record
batches). :meth:`Table.chunks` reads the chunks in order, only the columns asked for, and forgets
each one before reading the next; :meth:`Table.cell` reads one row's encoded image
afterwards, keeping only the chunk it was last asked about. So the image column of a file never
sits in memory at once: at most one chunk of it, encoded (``datasets`` writes 100 images per
chunk); decoding happens one image at a time, when the engine asks for it.
"""

from __future__ import annotations

import bisect
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .dataset import DataWarning

DATASETS_EXTRA = 'pip install "pytest-mllmprobe[datasets]"'
TABLE_SUFFIXES = (".parquet", ".arrow")
BIG_CHUNK_BYTES = 64 << 20
_ARROW_FILE_MAGIC = b"ARROW1"


def require_pyarrow(what: str) -> Any:
    """Import pyarrow or raise a :class:`ConfigError` naming the optional extra."""
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401 - the submodules this module uses
        import pyarrow.parquet  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            f"{what} is a parquet/arrow dataset, and reading it needs the optional pyarrow "
            f"package: {DATASETS_EXTRA} (or pip install pyarrow)"
        ) from exc
    return pyarrow


class Table:
    """One parquet or arrow file (arrow: the IPC stream ``save_to_disk`` writes, or the IPC file format)."""

    def __init__(self, path: Path, *, features: dict[str, Any] | None = None) -> None:
        self.path = path
        self.name = f"{'parquet' if path.suffix.lower() == '.parquet' else 'arrow'} file {str(path)!r}"
        self._pa = require_pyarrow(self.name)
        self._starts: list[int] = []
        self._offsets: list[int] = []  # arrow stream: where each record batch's message begins
        self._cached: tuple[tuple[int, str], Any] | None = None
        self._handle: Any = None
        try:
            self.kind, schema = self._open()
        except (OSError, ValueError) as exc:  # pyarrow.ArrowInvalid is a ValueError
            raise ConfigError(
                f"cannot read {self.name}: {exc}; expected a parquet file, or an arrow file as "
                "datasets' save_to_disk writes it"
            ) from None
        self.schema = schema
        self.columns: list[str] = list(schema.names)
        self.features: dict[str, Any] = _schema_features(schema) or dict(features or {})

    def _open(self) -> tuple[str, Any]:
        pa = self._pa
        if self.path.suffix.lower() == ".parquet":
            self._handle = pa.parquet.ParquetFile(str(self.path))
            return "parquet", self._handle.schema_arrow
        with open(self.path, "rb") as head:
            magic = head.read(len(_ARROW_FILE_MAGIC))
        if magic == _ARROW_FILE_MAGIC:
            self._handle = pa.ipc.open_file(pa.OSFile(str(self.path)))
            return "arrow-file", self._handle.schema
        self._handle = pa.OSFile(str(self.path))
        schema = pa.ipc.read_schema(pa.ipc.read_message(self._handle))
        return "arrow-stream", schema

    def chunks(self, columns: list[str]) -> Iterator[tuple[int, Any]]:
        """``(first row, pyarrow.Table of columns)`` per chunk, in order; records where each chunk lies."""
        self._starts, self._offsets, self._cached = [], [], None
        start = 0
        for index, table in enumerate(self._read_all(columns)):
            self._starts.append(start)
            self._warn_if_big(index, table)
            yield start, table.select(columns)
            start += table.num_rows

    def _read_all(self, columns: list[str]) -> Iterator[Any]:
        pa = self._pa
        try:
            if self.kind == "parquet":
                for k in range(self._handle.num_row_groups):
                    yield self._handle.read_row_group(k, columns=columns)
            elif self.kind == "arrow-file":
                for k in range(self._handle.num_record_batches):
                    yield pa.Table.from_batches([self._handle.get_batch(k)])
            else:
                while True:
                    offset = self._handle.tell()
                    try:
                        message = pa.ipc.read_message(self._handle)
                    except EOFError:
                        return
                    if message.type != "record batch":
                        raise ConfigError(
                            f"{self.name} holds a {message.type} message (dictionary-encoded "
                            "columns); write it with datasets' save_to_disk or as parquet instead"
                        )
                    self._offsets.append(offset)
                    yield pa.Table.from_batches([pa.ipc.read_record_batch(message, self.schema)])
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {self.name}: {exc}; the file is damaged or cut short") from None

    def _warn_if_big(self, index: int, table: Any) -> None:
        if table.nbytes > BIG_CHUNK_BYTES:
            unit = "row group" if self.kind == "parquet" else "record batch"
            warnings.warn(
                f"{self.name}: {unit} {index} holds {table.num_rows} rows in {table.nbytes >> 20} MiB; "
                f"a {unit} is the smallest part that can be read, so it sits in memory whole while "
                f"its images are read: write smaller {unit}s (datasets writes 100 images each; "
                "pyarrow: row_group_size=100)",
                DataWarning, stacklevel=2,
            )

    def cell(self, column: str, row: int) -> Any:
        """The value of ``column`` at ``row`` (after :meth:`chunks` has run); one chunk is kept."""
        if not self._starts:
            raise RuntimeError("Table.cell before Table.chunks")  # a bug, not a user error
        index = bisect.bisect_right(self._starts, row) - 1
        if self._cached is None or self._cached[0] != (index, column):
            self._cached = None  # drop the old chunk before reading the new one
            self._cached = ((index, column), self._read_chunk(index, column).column(column))
        return self._cached[1][row - self._starts[index]].as_py()

    def _read_chunk(self, index: int, column: str) -> Any:
        pa = self._pa
        if self.kind == "parquet":
            return self._handle.read_row_group(index, columns=[column])
        if self.kind == "arrow-file":
            return self._handle.get_batch(index)
        self._handle.seek(self._offsets[index])
        return pa.ipc.read_record_batch(pa.ipc.read_message(self._handle), self.schema)


def _schema_features(schema: Any) -> dict[str, Any] | None:
    """The ``datasets`` features a file carries in its schema metadata (``huggingface`` key)."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw:
        return None
    try:
        info = json.loads(raw)
    except ValueError:
        return None
    features = (info.get("info") or {}).get("features") if isinstance(info, dict) else None
    return features if isinstance(features, dict) else None


def feature_type(features: dict[str, Any], column: str) -> str | None:
    """The ``_type`` of a column's feature (``Image``, ``ClassLabel``, ``Value`` ...), if known."""
    feature = features.get(column)
    return feature.get("_type") if isinstance(feature, dict) else None


def class_label_names(features: dict[str, Any], column: str) -> list[str] | None:
    """The names of a ``ClassLabel`` column, in index order; ``None`` when it is not one."""
    feature = features.get(column)
    if not isinstance(feature, dict) or feature.get("_type") != "ClassLabel":
        return None
    names = feature.get("names")
    if isinstance(names, list) and names:
        return [str(n) for n in names]
    count = feature.get("num_classes")
    return [str(k) for k in range(int(count))] if isinstance(count, int) and count > 0 else None


__all__ = ["DATASETS_EXTRA", "TABLE_SUFFIXES", "Table", "class_label_names", "feature_type", "require_pyarrow"]
