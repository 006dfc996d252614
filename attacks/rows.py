"""Fooling results as Parquet rows: one table per target from a batch of pairs, and the writers.

    >>> files = TargetFiles(out, "sign", [3, 7], "val-00000", (64, 64, 3))
    >>> files.add(pair_tables(columns, [3, 7], keep_images=True))   # buffered into row groups
    >>> listing = files.close()              # [{path, rows, bytes}] for the part's marker

Columns and types come from common/schema.py (``PAIRS_FILE_SCHEMA``: the method and the target
live in the folder names, and in each file's metadata, with the image column's shape).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from attacks import parts
from common import schema, storage

ROW_GROUP_ROWS = 1024  # ~12 MB row groups with images: readers stream without loading a file
# The stored images are mostly noise-like to a general-purpose compressor: compressing them costs
# CPU for little space, so only the small columns are compressed.
COMPRESSION = {f.name: ("none" if f.name == schema.IMAGE else "zstd")
               for f in schema.PAIRS_FILE_SCHEMA}


def binary_column(images: np.ndarray) -> pa.Array:
    """(P, D) uint8 -> a binary array of P values of D bytes each, without a copy per value."""
    P, D = images.shape
    data = np.ascontiguousarray(images)
    offsets = np.arange(P + 1, dtype=np.int32) * D
    return pa.Array.from_buffers(pa.binary(), P, [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def pair_tables(cols: dict[str, np.ndarray], targets: list[int], keep_images: bool) -> dict:
    """Split image-major pair columns (each (N*T,)) into one Arrow table per target."""
    T = len(targets)
    out = {}
    for j, target in enumerate(targets):
        arrays = []
        for f in schema.PAIRS_FILE_SCHEMA:
            if f.name == schema.IMAGE:
                arr = (binary_column(cols[f.name][j::T]) if keep_images
                       else pa.nulls(len(cols[schema.LABEL][j::T]), pa.binary()))
            else:
                arr = pa.array(np.ascontiguousarray(cols[f.name][j::T]), f.type)
            arrays.append(arr)
        out[target] = pa.Table.from_arrays(arrays, schema=schema.PAIRS_FILE_SCHEMA)
    return out


class TargetFiles:
    """One Parquet file per target of a part, written row group by row group."""

    def __init__(self, output: str, method: str, targets: list[int], chunk: str,
                 shape: tuple[int, ...]):
        self.output, self.method, self.shape = output, method, shape
        self.rel = {t: parts.pair_file(method, t, chunk) for t in targets}
        self.buffers: dict[int, list[pa.Table]] = {t: [] for t in targets}
        self.writers: dict[int, pq.ParquetWriter] = {}
        self.rows = dict.fromkeys(targets, 0)

    def add(self, tables: dict[int, pa.Table]) -> None:
        for t, table in tables.items():
            self.buffers[t].append(table)
            self.rows[t] += table.num_rows
            if sum(b.num_rows for b in self.buffers[t]) >= ROW_GROUP_ROWS:
                self._flush(t)

    def _flush(self, t: int) -> None:
        if not self.buffers[t]:
            return
        if t not in self.writers:
            fs, path = storage.filesystem(storage.join(self.output, self.rel[t]))
            fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            self.writers[t] = pq.ParquetWriter(
                path, schema.pair_file_schema(self.method, t, self.shape), filesystem=fs,
                compression=COMPRESSION)
        table = pa.concat_tables(self.buffers[t])
        self.writers[t].write_table(table, row_group_size=ROW_GROUP_ROWS)
        self.buffers[t] = []

    def close(self) -> list[dict]:
        """Flush and close every file; returns [{path, rows, bytes}] relative to the output."""
        out = []
        for t in self.rel:
            if t not in self.writers and not self.buffers[t]:
                self.buffers[t] = [schema.PAIRS_FILE_SCHEMA.empty_table()]
            self._flush(t)
            self.writers.pop(t).close()
            fs, path = storage.filesystem(storage.join(self.output, self.rel[t]))
            out.append({"path": self.rel[t], "rows": self.rows[t],
                        "bytes": fs.get_file_info(path).size})
        return out
