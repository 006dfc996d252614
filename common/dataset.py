"""The ingested dataset's contract, read in one place: its manifest, its files, its pixels.

    >>> m = open_ingest("s3://bucket/imagenet64", splits=("val",))  # manifest checked vs the data
    >>> paths = split_files("s3://bucket/imagenet64", m, "val")      # URIs of the val Parquet files
    >>> X = pixels(table.column("image"), 12288, ids, where)         # (N, D) uint8, width checked
    >>> for table in read_rows(paths, split_counts(m, "val"), 0, 5000, 1024, 12288): ...

``open_ingest`` checks, before any cluster work starts, what can be checked cheaply against the
data itself: every listed file's footer (row count, columns and types, label range from the
statistics), and each split's first row (image byte length = H*W*3, its WNID = classes[label]).
A row of the wrong length further in is named by ``pixels`` where it is decoded.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from common import schema, storage
from common.errors import ConfigError

FOOTER_THREADS = 16  # footers are small reads: latency-bound on object storage


def open_ingest(data: str, splits: tuple[str, ...] = ()) -> dict:
    """The manifest of a complete ingest output, checked against the files of ``splits``."""
    m = storage.read_manifest(data, "ingest output")
    if m.get(schema.M_KIND) != "ingest":
        raise ConfigError(f"{data} is not an ingest output (its manifest says {m.get('kind')!r})")
    classes, shape = m.get(schema.M_CLASSES), m.get(schema.M_IMAGE_SHAPE)
    if not classes or not all(isinstance(c, str) for c in classes) or len(set(classes)) != len(
            classes):
        raise ConfigError(f"{data}/manifest.json: 'classes' must list distinct WNIDs")
    if (not isinstance(shape, list) or len(shape) != 3 or shape[2] != 3
            or not all(isinstance(v, int) and v > 0 for v in shape)):
        raise ConfigError(f"{data}/manifest.json: image_shape must be [H, W, 3], got {shape}")
    for split in splits:
        _check_split(data, m, split)
    return m


def _entries(manifest: dict, split: str) -> list[dict]:
    """The manifest's file entries ({path, rows, bytes}) of one split, in its order."""
    return [f for f in manifest[schema.M_FILES] if f["path"].startswith(f"{split}/")]


def split_counts(manifest: dict, split: str) -> list[int]:
    """Rows of each Parquet file of one split, in the order of ``split_files``."""
    return [f["rows"] for f in _entries(manifest, split)]


def split_files(data: str, manifest: dict, split: str) -> list[str]:
    """URIs of the Parquet files of one split, as the manifest lists them."""
    files = [storage.join(data, f["path"]) for f in _entries(manifest, split)]
    if not files:
        raise ConfigError(f"{data} has no {split!r} images (ingested splits: "
                          f"{', '.join(manifest[schema.M_COUNTS])})")
    return files


def num_features(manifest: dict) -> int:
    """D = H * W * 3 of the ingested images."""
    h, w, c = manifest[schema.M_IMAGE_SHAPE]
    return h * w * c


def _footer(uri: str) -> pq.FileMetaData:
    fs, path = storage.filesystem(uri)
    try:
        with fs.open_input_file(path) as f:
            return pq.ParquetFile(f).metadata
    except FileNotFoundError:
        raise ConfigError(f"{uri} is listed in the manifest but missing") from None
    except (OSError, pa.ArrowInvalid) as e:
        raise ConfigError(f"cannot read {uri}: {str(e).splitlines()[0]}") from None


def _check_split(data: str, m: dict, split: str) -> None:
    """Footers of every file of the split, and its first row, against the manifest."""
    uris = split_files(data, m, split)
    rows = [f.get("rows") for f in _entries(m, split)]
    with ThreadPoolExecutor(FOOTER_THREADS) as pool:
        footers = list(pool.map(_footer, uris))
    C, want = len(m[schema.M_CLASSES]), schema.IMAGES_SCHEMA
    for uri, meta, n in zip(uris, footers, rows):
        got = meta.schema.to_arrow_schema()
        for f in want:
            if got.get_field_index(f.name) < 0 or not got.field(f.name).type.equals(f.type):
                raise ConfigError(f"{uri}: column {f.name!r} is missing or not {f.type}, as the "
                                  "ingest contract needs")
        if n is not None and meta.num_rows != n:
            raise ConfigError(f"{uri} holds {meta.num_rows} rows, its manifest says {n}")
        col = got.get_field_index(schema.LABEL)
        for g in range(meta.num_row_groups):
            st = meta.row_group(g).column(col).statistics
            if st is not None and st.has_min_max and not 0 <= st.min <= st.max < C:
                raise ConfigError(f"{uri} has labels {st.min}..{st.max}, but the manifest lists "
                                  f"{C} classes")
    _check_first_row(uris[0], m)


def _check_first_row(uri: str, m: dict) -> None:
    fs, path = storage.filesystem(uri)
    with fs.open_input_file(path) as f:
        batch = next(pq.ParquetFile(f).iter_batches(
            batch_size=1, columns=[schema.IMAGE_ID, schema.LABEL, schema.WNID, schema.IMAGE]), None)
    if batch is None or batch.num_rows == 0:
        return
    row = batch.to_pylist()[0]
    D, classes = num_features(m), m[schema.M_CLASSES]
    pixels(batch.column(schema.IMAGE), D, [row[schema.IMAGE_ID]], uri,
           m[schema.M_IMAGE_SHAPE])
    label = row[schema.LABEL]
    if not 0 <= label < len(classes) or classes[label] != row[schema.WNID]:
        raise ConfigError(f"{uri}: row {row[schema.IMAGE_ID]!r} has label {label} and WNID "
                          f"{row[schema.WNID]!r}, which disagree with the manifest's class list")


def pixels(column: pa.ChunkedArray | pa.Array, D: int, ids=None, where: str | None = None,
           shape=None) -> np.ndarray:
    """The ``image`` column (binary, exactly D bytes a row) as a (N, D) uint8 array.

    Reads the Arrow value buffers directly: no Python objects per row (a view of Arrow's memory
    where it can be: read-only). A row of another length or a null is refused with a
    ConfigError naming it (by ``ids[i]`` when given) and ``where`` it was read.
    """
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts, start = [], 0
    for chunk in chunks:
        n = len(chunk)
        if n == 0:
            continue
        _, offsets_buf, data_buf = chunk.buffers()
        width = np.int64 if pa.types.is_large_binary(chunk.type) else np.int32
        offsets = np.frombuffer(offsets_buf, width)[chunk.offset: chunk.offset + n + 1]
        lengths = np.diff(offsets)
        if chunk.null_count or np.any(lengths != D):
            bad = int(np.flatnonzero((lengths != D) | ~np.asarray(chunk.is_valid()))[0])
            name = f"number {start + bad}"
            if ids is not None:  # a list, or an Arrow column of the ids
                name = ids[start + bad]
                name = repr(name.as_py() if hasattr(name, "as_py") else name)
            size = "null" if not chunk[bad].is_valid else f"{lengths[bad]} bytes"
            raise ConfigError(f"image {name}{f' in {where}' if where else ''} is {size}, not the "
                              f"{D} bytes every image of the data has ({shape or 'H*W*3'})")
        parts.append(np.frombuffer(data_buf, np.uint8)[offsets[0]: offsets[-1]].reshape(n, D))
        start += n
    if not parts:
        return np.empty((0, D), np.uint8)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def read_rows(files, counts, start: int, stop: int, rows: int, D: int) -> Iterator[pa.Table]:
    """Rows [start, stop) of a split (global row numbers over its ``files`` in the manifest's
    order, ``counts`` rows each), ``rows`` at a time.

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
                    pixels(table.column(schema.IMAGE), D, table.column(schema.IMAGE_ID),
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


def rows_by_id(uris: list[str], ids: list[str], columns: list[str]) -> dict[str, dict]:
    """The rows with these image ids (image_id -> row) of Parquet files (a split's, or a pairs
    partition's), reading the id column of each file and then only the row groups that hold a
    wanted row; stops at the first file once every id is found."""
    out: dict[str, dict] = {}
    for uri in uris:
        fs, path = storage.filesystem(uri)
        with fs.open_input_file(path) as handle:
            pf = pq.ParquetFile(handle)
            found = pc.is_in(pf.read(columns=[schema.IMAGE_ID]).column(0),
                             value_set=pa.array(ids)).to_numpy(zero_copy_only=False)
            first = 0
            for g in range(pf.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                if found[first:first + n].any():
                    rows = pf.read_row_group(g, columns=columns).to_pylist()
                    out.update({r[schema.IMAGE_ID]: r for r in rows if r[schema.IMAGE_ID] in ids})
                first += n
        if len(out) == len(set(ids)):
            break
    return out
