"""The ingested dataset's contract, read in one place: its manifest, its files, its pixels.

    >>> m = open_ingest("s3://bucket/imagenet64", splits=("val",))  # manifest checked vs the data
    >>> paths = split_files("s3://bucket/imagenet64", m, "val")      # URIs of the val Parquet files
    >>> X = pixels(table.column("image"), 12288, ids, where)         # (N, D) uint8, width checked
    >>> for table in read_rows(paths, split_counts(m, "val"), 0, 5000, 1024, 12288): ...

``open_ingest`` checks, before any cluster work starts, the manifest's keys and types, and what
can be checked cheaply against the data itself: no Parquet file in a split's folder that the
manifest does not list, every listed file's footer (row count, columns and types, label range
from the statistics), and each split's first row (image byte length = H*W*3, its WNID =
classes[label]). A row of the wrong length further in is named by ``pixels`` where it is decoded.
Every read here checks each page against the CRC-32 the writer (pipelines/sink.py) recorded in
its header (``parquet_file``): a damaged file is one line naming it, never a changed pixel.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from common import schema, storage
from common.errors import ConfigError

FOOTER_THREADS = 16  # footers are small reads: latency-bound on object storage


def open_ingest(data: str, splits: tuple[str, ...] = ()) -> dict:
    """The manifest of a complete ingest output, its keys and types checked, and checked against
    the files of ``splits``: exactly the listed Parquet files there, with their sizes, footers
    and first row."""
    m = storage.read_manifest(data, "ingest output")
    if m.get(schema.M_KIND) != "ingest":
        raise ConfigError(f"{data} is not an ingest output (its manifest says {m.get('kind')!r})")
    _check_manifest(storage.join(data, storage.MANIFEST), m)
    for split in splits:
        _check_split(data, m, split)
    return m


def _check_manifest(where: str, m: dict) -> None:
    """The keys the readers use, with their types; the first that is wrong is one ConfigError."""
    check_classes(where, m)
    for key in (schema.M_PIXEL_MEAN, schema.M_PIXEL_STD):
        v = m.get(key)
        if v is not None and (not isinstance(v, list) or len(v) != 3 or not all(
                isinstance(x, int | float) and not isinstance(x, bool) and 0 <= x <= 255
                for x in v)):
            raise ConfigError(f"{where}: {key!r} must be null or 3 numbers in 0..255")
    counts = m.get(schema.M_COUNTS)
    if not isinstance(counts, dict) or not all(
            isinstance(c, dict) and is_count(c.get("written"))
            and all(is_count(c[k]) for k in ("seen", "quarantined") if k in c)
            for c in counts.values()):
        raise ConfigError(f"{where}: 'counts' must hold each split's written (and seen and "
                          f"quarantined) images, got {_short(counts)}")
    files = listed_files(where, m.get(schema.M_FILES))
    for f in files:
        top = f["path"].split("/", 1)[0]
        if top != schema.QUARANTINE_DIR and top not in counts:
            raise ConfigError(f"{where}: lists {f['path']} of a split without counts")
    for split, c in counts.items():
        rows = [f.get("rows") for f in _entries(m, split)]
        if ("seen" in c and c["seen"] != c["written"] + c.get("quarantined", 0)) or (
                None not in rows and sum(rows) != c["written"]):
            raise ConfigError(f"{where}: the counts of {split!r} ({_short(c)}) disagree with "
                              f"each other or with its files' {sum(r or 0 for r in rows)} rows")


def check_classes(where: str, m: dict) -> None:
    """A manifest's ``classes`` (distinct WNIDs), ``class_names`` (null, or one string per class)
    and ``image_shape`` ([H, W, 3]): the ingest's, copied by the attack."""
    classes, shape = m.get(schema.M_CLASSES), m.get(schema.M_IMAGE_SHAPE)
    if (not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes)
            or len(set(classes)) != len(classes)):
        raise ConfigError(f"{where}: 'classes' must list distinct WNIDs")
    names = m.get(schema.M_CLASS_NAMES)
    if names is not None and (not isinstance(names, list) or len(names) != len(classes)
                              or not all(isinstance(n, str) for n in names)):
        raise ConfigError(f"{where}: 'class_names' must be null or name each of the "
                          f"{len(classes)} classes")
    if (not isinstance(shape, list) or len(shape) != 3 or shape[2] != 3
            or not all(is_count(v) and v > 0 for v in shape)):
        raise ConfigError(f"{where}: image_shape must be [H, W, 3], got {_short(shape)}")


def is_count(v) -> bool:
    """A count of rows, bytes or images: an int >= 0 (JSON's true and false are not counts)."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def listed_files(where: str, files, required: tuple[str, ...] = ()) -> list[dict]:
    """A manifest's ``files``: [{path, rows, bytes, sha256}], each path relative and inside the
    output, counts that are counts, every key of ``required`` present; else one ConfigError
    naming ``where`` (the manifest) and the first entry that is wrong."""
    if not isinstance(files, list):
        raise ConfigError(f"{where}: 'files' must list the output's files, got {_short(files)}")
    for f in files:
        path = f.get("path") if isinstance(f, dict) else None
        if (not isinstance(path, str) or not path or path.startswith("/")
                or any(p in ("", ".", "..") for p in path.split("/"))
                or not all(is_count(f[k]) for k in ("rows", "bytes") if k in f)
                or not isinstance(f.get("sha256", ""), str)
                or any(k not in f for k in required)):
            keys = ", ".join(dict.fromkeys(("path", *required, "rows", "bytes")))
            raise ConfigError(f"{where}: a file entry is not {{{keys}}} of a file inside the "
                              f"output: {_short(f)}")
    return files


def _short(v, n: int = 80) -> str:
    """A value for a one-line message: its repr, cut to ``n`` characters."""
    text = repr(v)
    return text if len(text) <= n else text[:n - 3] + "..."


def _entries(manifest: dict, split: str) -> list[dict]:
    """The manifest's file entries ({path, rows, bytes}) of one split, in its order."""
    return [f for f in manifest[schema.M_FILES] if f["path"].startswith(f"{split}/")]


def split_counts(manifest: dict, split: str) -> list[int]:
    """Rows of each Parquet file of one split, in the order of ``split_files``."""
    rows = [f.get("rows") for f in _entries(manifest, split)]
    if None in rows:
        raise ConfigError(f"the ingest manifest lists {split!r} files without their rows")
    return rows


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


@contextlib.contextmanager
def parquet_file(uri: str) -> Iterator[pq.ParquetFile]:
    """A listed Parquet file, every page read from it checked against its checksum (the writers
    record one per page); a missing, cut short or damaged file is one ConfigError naming it."""
    fs, path = storage.filesystem(uri)
    try:
        with fs.open_input_file(path) as f:
            yield pq.ParquetFile(f, page_checksum_verification=True)
    except FileNotFoundError:
        raise ConfigError(f"{uri} is listed in the manifest but missing") from None
    except (OSError, pa.ArrowException, UnicodeDecodeError) as e:  # the last: names in a footer
        raise damaged(uri, e) from None


def damaged(uri: str, e: Exception) -> ConfigError:
    """One line for a Parquet file pyarrow could not read: its URI and pyarrow's reason (the
    last part of its first line: the parts before repeat the path)."""
    reason = str(e).splitlines()[0].rsplit("': ", 1)[-1] if str(e) else type(e).__name__
    return ConfigError(f"{uri}: damaged, or not Parquet ({reason})")


def _footer(uri: str) -> pq.FileMetaData:
    with parquet_file(uri) as pf:
        return pf.metadata


def _check_listing(data: str, m: dict, split: str) -> None:
    """No Parquet file in the split's folder that the manifest does not list (one listing)."""
    fs, root = storage.filesystem(storage.join(data, split))
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    except OSError as e:
        raise ConfigError(f"cannot list {storage.join(data, split)}: "
                          f"{str(e).splitlines()[0]}") from None
    found = {f"{split}/{i.path[len(root) + 1:]}" for i in infos if i.type == pafs.FileType.File}
    extra = sorted(p for p in found - {f["path"] for f in _entries(m, split)}
                   if p.endswith(".parquet"))
    if extra:
        raise ConfigError(f"{storage.join(data, extra[0])} is not listed in the manifest "
                          f"({len(extra)} such files): not this ingest's")


def _check_split(data: str, m: dict, split: str) -> None:
    """The split's folder, the footers of its files and its first row, against the manifest."""
    uris = split_files(data, m, split)
    _check_listing(data, m, split)
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
        groups = sum(meta.row_group(g).num_rows for g in range(meta.num_row_groups))
        if groups != meta.num_rows:
            raise ConfigError(f"{uri}: damaged footer (its row groups hold {groups} rows, "
                              f"its total says {meta.num_rows})")
        col = got.get_field_index(schema.LABEL)
        for g in range(meta.num_row_groups):
            chunk = meta.row_group(g).column(col)
            # a chunk whose type is not its schema's: pyarrow aborts the process on its
            # statistics (an uncaught C++ exception), so it is refused first
            if chunk.physical_type != meta.schema.column(col).physical_type:
                raise ConfigError(f"{uri}: damaged footer (column {schema.LABEL!r} of row group "
                                  f"{g} is {chunk.physical_type}, its schema says "
                                  f"{meta.schema.column(col).physical_type})")
            st = chunk.statistics
            if st is not None and st.has_min_max and not 0 <= st.min <= st.max < C:
                raise ConfigError(f"{uri} has labels {st.min}..{st.max}, but the manifest lists "
                                  f"{C} classes")
    _check_first_row(uris[0], m)


def _check_first_row(uri: str, m: dict) -> None:
    with parquet_file(uri) as pf:
        batch = next(pf.iter_batches(
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
        with parquet_file(uri) as pf:
            groups = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
            if sum(groups) != counts[f]:
                raise ConfigError(f"{uri}: damaged footer: its row groups hold {sum(groups)} "
                                  f"rows, the manifest says {counts[f]}")
            first = 0
            for g, n in enumerate(groups):
                if first < hi and first + n > lo:
                    table = pf.read_row_group(g, columns=columns)
                    if table.num_rows != n:
                        raise ConfigError(f"{uri}: damaged: row group {g} reads as "
                                          f"{table.num_rows} rows, its footer says {n}")
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


def rows_by_id(uris: list[str], ids: list[str], columns: list[str],
               counts: list[int] | None = None) -> dict[str, dict]:
    """The rows with these image ids (image_id -> row) of Parquet files (a split's, or a pairs
    partition's; ``counts``: their rows as listed, checked), reading the id column of each file
    and then only the row groups that hold a wanted row; stops at the first file once every id
    is found."""
    out: dict[str, dict] = {}
    for i, uri in enumerate(uris):
        with parquet_file(uri) as pf:
            every = pf.read(columns=[schema.IMAGE_ID]).column(0)
            if counts is not None and len(every) != counts[i]:
                raise ConfigError(f"{uri}: damaged: it reads as {len(every)} rows, its listing "
                                  f"says {counts[i]}")
            found = pc.is_in(every, value_set=pa.array(ids)).to_numpy(zero_copy_only=False)
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
