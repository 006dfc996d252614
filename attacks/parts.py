"""How the attack job splits its work into parts with deterministic names, and finds finished ones.

A *chunk* is a run of validation images (global rows [start, stop) over the split's files in the
manifest's order) or the noise images; a *part* is one chunk x one method x a group of targets.
A part writes one Parquet file per target,

    pairs/method=<method>/target=<t>/<chunk>.parquet   e.g. .../target=17/val-00003.parquet

and, last, its marker ``_parts/<method>/<chunk>-t<first target>.json`` listing those files. A part
is complete exactly when its marker exists: a rerun skips it, and redoes any other part from
scratch under the same file names, so nothing is ever written twice.

    >>> chunks = val_chunks(50_000, rows_per_chunk=10_900)      # val-00000 .. val-00004
    >>> todo = [p for p in plan_parts(chunks, methods, targets, 8) if p["key"] not in done]
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from common import dataset, schema, storage

PARTS_DIR = "_parts"  # markers of completed parts: outside pairs/, so no reader ever sees them
MARKER_THREADS = 16


def val_chunks(n_rows: int, rows_per_chunk: int) -> list[dict]:
    """Validation rows [0, n_rows) in runs of at most rows_per_chunk, named val-00000, ..."""
    return [{"name": f"val-{i:05d}", "origin": "val", "start": s,
             "stop": min(s + rows_per_chunk, n_rows)}
            for i, s in enumerate(range(0, n_rows, rows_per_chunk))]


def noise_chunk(count: int) -> list[dict]:
    return [{"name": "noise-00000", "origin": "noise", "start": 0, "stop": count}] if count else []


def plan_parts(chunks: list[dict], methods, targets, targets_per_part: int) -> list[dict]:
    """Every part: chunk x method x group of consecutive targets, with its key and file names."""
    out = []
    for chunk in chunks:
        for method in methods:
            for i in range(0, len(targets), targets_per_part):
                group = [int(t) for t in targets[i:i + targets_per_part]]
                out.append({"key": f"{method}/{chunk['name']}-t{group[0]:04d}", "chunk": chunk,
                            "method": method, "targets": group})
    return out


def pair_file(method: str, target: int, chunk: str) -> str:
    return f"{schema.PAIRS_DIR}/{schema.METHOD}={method}/{schema.TARGET}={target}/{chunk}.parquet"


def marker_file(key: str) -> str:
    return f"{PARTS_DIR}/{key}.json"


def done_keys(output: str) -> set[str]:
    """Keys of the parts whose markers exist under the output (one recursive listing)."""
    fs, root = storage.filesystem(storage.join(output, PARTS_DIR))
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    except FileNotFoundError:
        return set()
    return {i.path[len(root) + 1:-len(".json")] for i in infos
            if i.type == pafs.FileType.File and i.path.endswith(".json")}


def read_markers(output: str, keys) -> list[dict]:
    """The file lists of finished parts (read in parallel: small objects, latency-bound)."""
    def one(key):
        return storage.read_json(storage.join(output, marker_file(key)))

    with ThreadPoolExecutor(MARKER_THREADS) as pool:
        return list(pool.map(one, sorted(keys)))


def write_marker(output: str, key: str, result: dict) -> None:
    storage.write_json_atomic(storage.join(output, marker_file(key)), result)


def read_images(files, counts, start: int, stop: int, rows: int, D: int) -> Iterator[pa.Table]:
    """Validation rows [start, stop) of the split's files, ``rows`` at a time.

    Reads only the row groups that hold the range, and only the columns the attack needs; an
    image that is not D bytes stops the job with one line naming it and its file.
    """
    columns = [schema.IMAGE_ID, schema.LABEL, schema.IMAGE]
    offsets = np.concatenate([[0], np.cumsum(counts)])
    pending: list[pa.Table] = []
    for f, uri in enumerate(files):
        lo, hi = max(start, offsets[f]) - offsets[f], min(stop, offsets[f + 1]) - offsets[f]
        if lo >= hi:
            continue
        fs, path = storage.filesystem(uri)
        with fs.open_input_file(path) as handle:
            pf = pq.ParquetFile(handle)
            first = 0
            for g in range(pf.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                if first < hi and first + n > lo:
                    table = pf.read_row_group(g, columns=columns)
                    begin, end = max(lo, first), min(hi, first + n)
                    table = table.slice(begin - first, end - begin)
                    dataset.pixels(table.column(schema.IMAGE), D, table.column(schema.IMAGE_ID),
                                   uri)
                    pending.append(table)
                    while sum(t.num_rows for t in pending) >= rows:
                        batch = pa.concat_tables(pending)
                        yield batch.slice(0, rows)
                        pending = [batch.slice(rows)]
                first += n
    rest = pa.concat_tables(pending) if pending else None
    if rest is not None and rest.num_rows:
        yield rest
