"""Parquet and arrow files, read a few rows at a time with pyarrow (the optional ``[datasets]`` extra).

A :class:`Table` is one file: its column names, its Hugging Face features (which column is an
``Image``, the names of a ``ClassLabel``) and its rows. :meth:`Table.rows` streams the rows in
order, only the columns asked for; :meth:`Table.cell` reads one value afterwards (the engine asks
for images in order, so a cursor moves forward through the file). The image column of a file is
never in memory at once, not even one parquet row group or arrow record batch of it
(``datasets`` makes those about 100 MB):

* parquet is read page by page (``iter_batches`` over an unbuffered, streamed file) in
  :data:`ROWS_PER_READ`-row batches;
* arrow (the IPC stream ``save_to_disk`` writes, or the IPC file format) is memory-mapped for
  :data:`ROWS_PER_READ` rows at a time and unmapped after, so no more than those rows' pages are
  resident.

Decoding happens one image at a time, when the engine asks for it.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import ConfigError, require_extra

DATASETS_EXTRA = 'pip install "pytest-mllmprobe[datasets]"'
TABLE_SUFFIXES = (".parquet", ".arrow")
ROWS_PER_READ = 16
_STREAM_BUFFER = 1 << 20
_ARROW_FILE_MAGIC = b"ARROW1"


def require_pyarrow(what: str) -> Any:
    """Import pyarrow (with the submodules this module uses) or raise a :class:`ConfigError`
    naming the optional extra."""
    message = (f"{what} is a parquet/arrow dataset, and reading it needs the optional pyarrow "
               f"package: {DATASETS_EXTRA} (or pip install pyarrow)")
    require_extra("pyarrow.ipc", message)
    return require_extra("pyarrow.parquet", message)
    return pyarrow


class Table:
    """One parquet or arrow file; ``features`` (from ``dataset_info.json``) when its schema has none."""

    def __init__(self, path: Path, *, features: dict[str, Any] | None = None) -> None:
        self.path = path
        self.parquet = path.suffix.lower() == ".parquet"
        self.name = f"{'parquet' if self.parquet else 'arrow'} file {str(path)!r}"
        self._pa = require_pyarrow(self.name)
        self._cursor: tuple[str, int, Iterator[tuple[int, list[Any], int]]] | None = None
        try:
            schema = self._open()
        except (OSError, ValueError) as exc:  # pyarrow.ArrowInvalid is a ValueError
            raise ConfigError(
                f"cannot read {self.name}: {exc}; expected a parquet file, or an arrow file as "
                "datasets' save_to_disk writes it"
            ) from None
        self.schema = schema
        self.columns: list[str] = list(schema.names)
        self.features: dict[str, Any] = _schema_features(schema) or dict(features or {})

    def _open(self) -> Any:
        pa = self._pa
        if self.parquet:
            # unbuffered reads of a whole column chunk would hold a ~100 MB row group: stream pages
            self._file = pa.parquet.ParquetFile(str(self.path), pre_buffer=False, buffer_size=_STREAM_BUFFER)
            meta = self._file.metadata
            self._starts = _starts(meta.row_group(k).num_rows for k in range(meta.num_row_groups))
            return self._file.schema_arrow
        with open(self.path, "rb") as head:
            self._file_format = head.read(len(_ARROW_FILE_MAGIC)) == _ARROW_FILE_MAGIC
        with pa.memory_map(str(self.path)) as mapped:  # headers only: the bodies are not touched
            if self._file_format:
                reader = pa.ipc.open_file(mapped)
                self._starts = _starts(reader.get_batch(k).num_rows for k in range(reader.num_record_batches))
                return reader.schema
            schema = pa.ipc.read_schema(pa.ipc.read_message(mapped))
            self._offsets: list[int] = []
            counts = []
            while True:
                offset = mapped.tell()
                try:
                    message = pa.ipc.read_message(mapped)
                except EOFError:
                    break
                if message.type != "record batch":
                    raise ConfigError(
                        f"{self.name} holds a {message.type} message (dictionary-encoded columns); "
                        "write it with datasets' save_to_disk or as parquet instead"
                    )
                self._offsets.append(offset)
                counts.append(pa.ipc.read_record_batch(message, schema).num_rows)
            self._starts = _starts(counts)
            return schema

    @property
    def num_rows(self) -> int:
        return self._starts[-1]

    def rows(self, columns: list[str], start: int = 0) -> Iterator[tuple[int, dict[str, Any]]]:
        """``(row, {column: value})`` from row ``start`` to the end, a few rows in memory at a time."""
        for row, arrays, j in self._positions(columns, start):
            yield row, {c: a[j].as_py() for c, a in zip(columns, arrays)}

    def cell(self, column: str, row: int) -> Any:
        """The value of ``column`` at ``row``: read forward from the last row asked for, else afresh."""
        chunk_start = self._starts[bisect.bisect_right(self._starts, row) - 1]
        if self._cursor is None or self._cursor[0] != column or not chunk_start <= self._cursor[1] <= row:
            self._cursor = (column, row, self._positions([column], row))
        _, _, positions = self._cursor
        for at, arrays, j in positions:
            if at == row:
                self._cursor = (column, row + 1, positions)
                return arrays[0][j].as_py()
        raise IndexError(f"{self.name} has no row {row}")  # a bug, not a user error

    def _positions(self, columns: list[str], start: int) -> Iterator[tuple[int, list[Any], int]]:
        """``(row, the columns' arrays, index into them)`` from row ``start``; nothing converted yet."""
        try:
            yield from (self._parquet_positions if self.parquet else self._arrow_positions)(columns, start)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {self.name}: {exc}; the file is damaged or cut short") from None

    def _parquet_positions(self, columns: list[str], start: int) -> Iterator[tuple[int, list[Any], int]]:
        group = bisect.bisect_right(self._starts, start) - 1
        row = self._starts[group]
        groups = list(range(group, len(self._starts) - 1))
        for batch in self._file.iter_batches(batch_size=ROWS_PER_READ, row_groups=groups, columns=columns,
                                             use_threads=False):
            arrays = [batch.column(c) for c in columns]
            for j in range(max(0, start - row), batch.num_rows):
                yield row + j, arrays, j
            row += batch.num_rows
            del batch, arrays  # before the next batch is read
            self._release()

    def _arrow_positions(self, columns: list[str], start: int) -> Iterator[tuple[int, list[Any], int]]:
        pa = self._pa
        row = start
        while row < self.num_rows:
            chunk = bisect.bisect_right(self._starts, row) - 1
            with pa.memory_map(str(self.path)) as mapped:  # unmapped once these rows are dropped
                if self._file_format:
                    batch = pa.ipc.open_file(mapped).get_batch(chunk)
                else:
                    mapped.seek(self._offsets[chunk])
                    batch = pa.ipc.read_record_batch(pa.ipc.read_message(mapped), self.schema)
            part = batch.slice(row - self._starts[chunk], ROWS_PER_READ)
            del batch
            arrays = [part.column(c) for c in columns]
            for j in range(part.num_rows):
                yield row + j, arrays, j
            row += part.num_rows
            del part, arrays
            self._release()


    def _release(self) -> None:
        """Hand freed batches back to the system: pyarrow's default allocator (mimalloc) keeps them."""
        self._pa.default_memory_pool().release_unused()


def _starts(counts: Any) -> list[int]:
    """Each chunk's first row, then the total."""
    starts = [0]
    for count in counts:
        starts.append(starts[-1] + count)
    return starts


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


__all__ = ["DATASETS_EXTRA", "ROWS_PER_READ", "TABLE_SUFFIXES", "Table", "class_label_names", "feature_type",
           "require_pyarrow"]
