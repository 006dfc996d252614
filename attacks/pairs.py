"""The attack's ``pairs/``, written and read in one place: its paths, partitioning, writers and
readers, and its files checked against the listing that names them.

    pairs/method=<method>/target=<t>/<chunk>.parquet     e.g. .../target=17/val-00003.parquet

Written by the attack's workers, one file per (method, target, chunk), row group by row group:

    >>> files = TargetFiles(out, "sign", [3, 7], "val-00000", (64, 64, 3))
    >>> files.add(pair_tables(columns, [3, 7], names, keep_images=True))  # buffered, row groups
    >>> listing = files.close()              # [{path, rows, bytes}] for the part's marker

Read through ``Pairs``, which knows the files from a listing, never from a folder's contents: a
finished output's manifest (``Pairs.open``, which first checks that every listed file is there
with its size and that no other file sits under ``pairs/``) or, inside the job, its parts'
markers. A missing, damaged or extra file is one ConfigError naming it.

    >>> pairs = Pairs.open("s3://bucket/fooling")
    >>> pairs.read("exact", 7, [schema.LINF])                  # one partition, these columns
    >>> pairs.take("exact", 7, ["ILSVRC2012_val_00000001"])    # rows by image id
    >>> for batch in pairs.batches([schema.IMAGE, schema.TARGET], 4096): ...

Columns and types come from common/schema.py (``PAIRS_FILE_SCHEMA``: the method and the target
live in the folder names, and in each file's metadata, with the image column's shape). Besides
the measurements, the writer adds the target's and the source's class names and whether the pair
had to move (``schema.PAIRS_NAMED``). Files written before those columns read as before; a read
that asks them of such a file is one ConfigError naming it.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from attacks.methods.noise import noise_ids
from common import dataset, schema, storage
from common.errors import ConfigError

if TYPE_CHECKING:
    import pyarrow.dataset as ds

ROW_GROUP_ROWS = 1024  # ~12 MB row groups with images: readers stream without loading a file
# The stored images are mostly noise-like to a general-purpose compressor: compressing them costs
# CPU for little space, so only the small columns are compressed.
COMPRESSION = {f.name: ("none" if f.name == schema.IMAGE else "zstd")
               for f in schema.PAIRS_FILE_SCHEMA}


@functools.cache
def _verified():
    """Parquet as a pyarrow dataset format that checks every page's CRC when it reads it.

    Every page is written with its CRC-32 and checked when read: a flipped bit is an error naming
    the file, never a changed pair (its cost: benchmarks/verify.py). Made on first use: importing
    pyarrow.dataset imports pandas (0.6 s), which ``report.show`` does without.
    """
    import pyarrow.dataset as ds

    return ds.ParquetFileFormat(default_fragment_scan_options=ds.ParquetFragmentScanOptions(
        page_checksum_verification=True))


def pair_file(method: str, target: int, chunk: str) -> str:
    """The file of one (method, target, chunk), relative to the output."""
    return f"{schema.PAIRS_DIR}/{schema.METHOD}={method}/{schema.TARGET}={target}/{chunk}.parquet"


# --- writing ------------------------------------------------------------------------------------


def binary_column(images: np.ndarray, keep: np.ndarray | None = None) -> pa.Array:
    """(P, D) uint8 -> a binary array of P values of D bytes each, without a copy per value;
    null where ``keep`` (P,) bool is False."""
    P, D = images.shape
    if keep is None or keep.all():
        data = np.ascontiguousarray(images)
        offsets = np.arange(P + 1, dtype=np.int32) * D
        return pa.Array.from_buffers(pa.binary(), P,
                                     [None, pa.py_buffer(offsets), pa.py_buffer(data)])
    data = np.ascontiguousarray(images[keep])
    offsets = np.concatenate([[0], np.cumsum(keep, dtype=np.int32) * D]).astype(np.int32)
    validity = pa.array(keep, pa.bool_()).buffers()[1]  # the same bits as a validity bitmap
    buffers = [validity, pa.py_buffer(offsets), pa.py_buffer(data)]
    return pa.Array.from_buffers(pa.binary(), P, buffers, null_count=int(P - keep.sum()))


def names_column(index: np.ndarray, names: Sequence[str]) -> pa.DictionaryArray:
    """Class indices (-1: none) -> their ``names`` as a ``schema.CLASS_NAME`` array (null for -1)
    whose dictionary holds only the classes that occur."""
    index = np.asarray(index)
    used = np.unique(index[index >= 0])
    codes = pa.array(np.searchsorted(used, index).astype(np.int16), mask=index < 0)
    return pa.DictionaryArray.from_arrays(codes, pa.array([names[k] for k in used], pa.string()))


def pair_tables(cols: dict[str, np.ndarray], targets: list[int], names: Sequence[str],
                keep_images: bool | np.ndarray) -> dict:
    """Split image-major pair columns (each (N*T,)) into one Arrow table per target, with the
    target's and the source's class names (``names``: one per class, ``schema.class_names``)
    and whether each pair had to move (``schema.had_to_move``); the fooling images of the pairs
    ``keep_images`` says (all, none, or an (N*T,) bool mask), the others null."""
    T = len(targets)
    out = {}
    for j, target in enumerate(targets):
        label = cols[schema.LABEL][j::T]
        named = {schema.TARGET_NAME: names_column(np.full(len(label), target), names),
                 schema.SOURCE_NAME: names_column(label, names),
                 schema.HAD_TO_MOVE: pa.array(schema.had_to_move(cols[schema.PRED][j::T],
                                                                 target), pa.bool_())}
        arrays = []
        for f in schema.PAIRS_FILE_SCHEMA:
            if f.name in named:
                arr = named[f.name]
            elif f.name == schema.IMAGE:
                keep = keep_images if isinstance(keep_images, bool) else keep_images[j::T]
                arr = (pa.nulls(len(label), pa.binary()) if not np.any(keep)
                       else binary_column(cols[f.name][j::T], None if keep is True else keep))
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
        self.rel = {t: pair_file(method, t, chunk) for t in targets}
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
                compression=COMPRESSION, write_page_checksum=True)
        # one dictionary per column of a row group: the names are written once in it
        table = pa.concat_tables(self.buffers[t]).unify_dictionaries()
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


# --- reading ------------------------------------------------------------------------------------


COUNTS = ("pairs", "val_images", "noise_images", "targets")  # the manifest's counts, and methods


def open_attack(results: str, needs: tuple[str, ...] = ()) -> dict:
    """The manifest of a finished attack output. Refused in one line without one, of another
    kind, without a key of ``needs``, or with a key the readers use of the wrong type: counts
    that are not non-negative integers, files not listed as {path, rows, bytes}, classes and
    image shape not as the ingest's, source, config, identity or timings not objects."""
    m = storage.read_manifest(results, "attack output")
    if m.get(schema.M_KIND) != "attack":
        raise ConfigError(f"{results} is not an attack output (kind: {m.get(schema.M_KIND)!r})")
    where = storage.join(results, storage.MANIFEST)
    missing = [k for k in needs if k not in m]
    if missing:
        raise ConfigError(f"{where}: no {', '.join(map(repr, missing))}: not a complete attack "
                          "output")
    _check_manifest(where, m)
    return m


def kept_ids(m: dict) -> set[str] | None:
    """The image ids whose pairs hold their fooling image in an attack output written with
    ``--keep-images sample`` (the first ``sample_images`` validation images, in the data's order,
    and every noise start); None when it kept all of them or none."""
    settings = m[schema.M_IDENTITY]["settings"]
    if settings.get("keep_images") != "sample":
        return None
    counts, data = m[schema.M_COUNTS], m[schema.M_SOURCE]["data"]
    n = min(settings["sample_images"], counts["val_images"])
    ids = set(noise_ids(counts["noise_images"]))
    if n:
        im = dataset.open_ingest(data, splits=("val",))
        D = dataset.num_features(im)
        for t in dataset.read_rows(dataset.split_files(data, im, "val"),
                                   dataset.split_counts(im, "val"), 0, n, n, D):
            ids.update(t.column(schema.IMAGE_ID).to_pylist())
    return ids


def _check_manifest(where: str, m: dict) -> None:
    if schema.M_FILES in m:
        dataset.listed_files(where, m[schema.M_FILES], required=("path", "rows", "bytes"))
    if any(k in m for k in (schema.M_CLASSES, schema.M_CLASS_NAMES, schema.M_IMAGE_SHAPE)):
        dataset.check_classes(where, m)
    for key in (schema.M_SOURCE, schema.M_CONFIG, schema.M_IDENTITY, schema.M_TIMINGS):
        if key in m and not isinstance(m[key], dict):
            raise ConfigError(f"{where}: {key!r} must be an object, got {m[key]!r:.60}")
    source, timings = m.get(schema.M_SOURCE), m.get(schema.M_TIMINGS, {})
    if source is not None and not all(isinstance(source.get(k), str)
                                      for k in ("data", "model", "model_sha256")):
        raise ConfigError(f"{where}: the source's data, model and model_sha256 must be strings")
    total = timings.get("total_s") if schema.M_TIMINGS in m else 0
    if not isinstance(total, int | float) or isinstance(total, bool) or total < 0:
        raise ConfigError(f"{where}: timings' total_s must be seconds, got {total!r:.60}")
    if schema.M_COUNTS in m:
        c = m[schema.M_COUNTS]
        if not (isinstance(c, dict) and all(dataset.is_count(c.get(k)) for k in COUNTS)
                and isinstance(c.get("methods"), list) and c["methods"]
                and all(method in schema.METHODS for method in c["methods"])):
            raise ConfigError(f"{where}: 'counts' must hold {', '.join(COUNTS)} (integers >= 0) "
                              f"and the methods run, got {c!r:.100}")
        pairs = [f["rows"] for f in m.get(schema.M_FILES, [])
                 if f["path"].startswith(schema.PAIRS_DIR + "/")]
        every = (c["val_images"] + c["noise_images"]) * c["targets"] * len(c["methods"])
        if c["pairs"] != every or (schema.M_FILES in m and sum(pairs) != every):
            raise ConfigError(f"{where}: counts {c['pairs']} pairs of {every} (images x targets "
                              f"x methods), its files hold {sum(pairs)}")


@dataclass(frozen=True)
class PairFile:
    """One listed file of pairs/: its path relative to the output, rows and bytes."""

    path: str
    rows: int
    bytes: int

    @property
    def partition(self) -> tuple[str, int]:
        """(method, target), from the path's Hive folders."""
        found = re.fullmatch(rf"{schema.PAIRS_DIR}/{schema.METHOD}=([^/]+)/{schema.TARGET}="
                             r"(\d+)/[^/]+\.parquet", self.path)
        if found is None:
            raise ValueError(f"{self.path} is not a {pair_file('<m>', '<t>', '<chunk>')} file")
        return found[1], int(found[2])


class Pairs:
    """The pairs of one attack output, as the listing ``files`` ([{path, rows, bytes}], paths
    relative to ``results``; entries outside pairs/ are ignored) names them."""

    def __init__(self, results: str, files: list[dict]):
        self.results = results
        self.files: dict[tuple[str, int], list[PairFile]] = {}
        for f in files:
            if f["path"].startswith(schema.PAIRS_DIR + "/"):
                pf = PairFile(f["path"], int(f["rows"]), int(f["bytes"]))
                try:
                    key = pf.partition
                except ValueError as e:
                    raise ConfigError(f"{results} lists {e}") from None
                self.files.setdefault(key, []).append(pf)
        for listed in self.files.values():
            listed.sort(key=lambda f: f.path)

    @classmethod
    def open(cls, results: str, manifest: dict | None = None) -> Pairs:
        """A finished output's pairs (``manifest``: its manifest, from ``open_attack``), its files
        checked against the manifest."""
        m = manifest if manifest is not None else open_attack(results, needs=(schema.M_FILES,))
        if schema.M_FILES not in m:
            raise ConfigError(f"{storage.join(results, storage.MANIFEST)}: no 'files': not a "
                              "complete attack output")
        pairs = cls(results, m[schema.M_FILES])
        pairs.check()
        return pairs

    @property
    def rows(self) -> int:
        return sum(f.rows for listed in self.files.values() for f in listed)

    def uris(self, method: str, target: int) -> list[str]:
        return [storage.join(self.results, f.path) for f in self.files.get((method, target), [])]

    def check(self) -> None:
        """Every listed file is under pairs/ with its size, and nothing else is (one listing)."""
        fs, root = storage.filesystem(storage.join(self.results, schema.PAIRS_DIR))
        try:
            infos = fs.get_file_info(pafs.FileSelector(root, recursive=True,
                                                       allow_not_found=True))
        except OSError as e:
            raise ConfigError(f"cannot list {self.results}/{schema.PAIRS_DIR}: "
                              f"{str(e).splitlines()[0]}") from None
        found = {f"{schema.PAIRS_DIR}/{i.path[len(root) + 1:]}": i.size for i in infos
                 if i.type == pafs.FileType.File}
        listed = {f.path: f for files in self.files.values() for f in files}
        for path, f in sorted(listed.items()):
            if path not in found:
                raise ConfigError(f"{storage.join(self.results, path)} is missing: the attack "
                                  "output is damaged (its manifest lists it)")
            if found[path] != f.bytes:
                raise ConfigError(f"{storage.join(self.results, path)} has {found[path]} bytes, "
                                  f"its manifest says {f.bytes}: the file is damaged")
        extra = sorted(set(found) - set(listed))
        if extra:
            raise ConfigError(f"{storage.join(self.results, extra[0])} is not listed in the "
                              f"manifest ({len(extra)} such files): another run wrote here")

    def _dataset(self, uri: str, columns: list[str]) -> ds.Dataset:
        """One listed file, its partition columns typed, each page checked against its CRC when
        read; its columns are the contract's (a damaged footer can say otherwise), or those of a
        file written before the names when ``columns`` asks none of them."""
        import pyarrow.dataset as ds  # on first use, as _verified

        fs, root = storage.filesystem(storage.join(self.results, schema.PAIRS_DIR))
        pairs = self._read(lambda: ds.dataset(
            [storage.filesystem(uri)[1]], filesystem=fs, format=_verified(),
            partitioning=schema.pairs_partitioning(), partition_base_dir=root), uri)
        got = pairs.schema
        wrong = [c.name for c in schema.PAIRS_FILE_SCHEMA
                 if got.get_field_index(c.name) < 0 or not got.field(c.name).type.equals(c.type)]
        if set(wrong) == set(schema.PAIRS_NAMED) and not any(c in got.names for c in wrong):
            _unnamed(uri, columns)  # written before the names
        elif wrong:
            raise ConfigError(f"{uri}: damaged, or not a pairs file (its {', '.join(wrong)} "
                              "missing or of another type)")
        return pairs

    def _listed(self, method: str, target: int) -> list[tuple[str, PairFile]]:
        """(URI, listing) of the files of one partition, in name order."""
        return [(storage.join(self.results, f.path), f)
                for f in self.files.get((method, target), [])]

    @staticmethod
    def _counted(uri: str, f: PairFile, rows: int) -> None:
        if rows != f.rows:  # a damaged footer can drop rows that its pages still hold
            raise ConfigError(f"{uri}: damaged: it reads as {rows} rows, its listing says "
                              f"{f.rows}")

    def read(self, method: str, target: int, columns: list[str]) -> pa.Table:
        """The ``columns`` of one (method, target) partition, its files in name order."""
        listed = self._listed(method, target)
        if not listed:
            raise ConfigError(f"{self.results} holds no pairs of method {method!r} and target "
                              f"{target}")
        tables = []
        for uri, f in listed:
            table = self._read(lambda u=uri: self._dataset(u, columns).to_table(columns=columns),
                               uri)
            self._counted(uri, f, table.num_rows)
            tables.append(table)
        return pa.concat_tables(tables)

    def take(self, method: str, target: int, ids: list[str],
             columns: list[str] | None = None) -> dict[str, dict]:
        """The rows of these image ids in one partition (image_id -> row; absent: not there),
        reading only the row groups that hold them; ``columns`` None: every column of its file
        (a file written before the names has none)."""
        listed = self._listed(method, target)
        if columns and any(c in schema.PAIRS_NAMED for c in columns):
            for uri, _ in listed:
                self._dataset(uri, columns)
        return dataset.rows_by_id([u for u, _ in listed], ids,
                                  columns or schema.PAIRS_FILE_SCHEMA.names,
                                  counts=[f.rows for _, f in listed])

    def batches(self, columns: list[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
        """Every pair, ``columns`` of them (``method`` and ``target`` from the folders, typed),
        ``batch_rows`` at a time, file by file (a file whose rows are not its listing's stops
        the reader at its end)."""
        for uri, f in (pair for key in sorted(self.files) for pair in self._listed(*key)):
            batches = self._read(lambda u=uri: self._dataset(u, columns).to_batches(
                columns=columns, batch_size=batch_rows, batch_readahead=1), uri)
            rows = 0
            while (batch := self._read(lambda b=batches: next(b, None), uri)) is not None:
                rows += batch.num_rows
                yield batch
            self._counted(uri, f, rows)

    @staticmethod
    def _read(read, uri: str):
        """``read()`` of one file; a damaged file is one ConfigError naming it."""
        try:
            return read()
        except (OSError, pa.ArrowException, UnicodeDecodeError) as e:
            raise dataset.damaged(uri, e) from None


def _unnamed(uri: str, columns: list[str]) -> None:
    """A file written before pairs carried their names reads, unless ``columns`` asks them."""
    asked = [c for c in columns if c in schema.PAIRS_NAMED]
    if asked:
        raise ConfigError(f"{uri} was written before pairs files carried {', '.join(asked)}: "
                          "rerun the attack with --overwrite, or join the manifest's class_names "
                          "by index (had to move: pred != target)")
