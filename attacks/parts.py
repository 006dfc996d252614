"""How the attack job splits its work into parts with deterministic names, and finds finished ones.

A *chunk* is a run of validation images (global rows [start, stop) over the split's files in the
manifest's order) or the noise images; a *part* is one chunk x one method x a group of targets.
A part writes one Parquet file per target (attacks/pairs.py names them) and, last, its marker
``_parts/<method>/<chunk>-t<first target>.json`` listing those files. A part is complete exactly
when its marker exists: a rerun skips it, and redoes any other part from scratch under the same
file names, so nothing is ever written twice.

    >>> chunks = val_chunks(50_000, rows_per_chunk=10_900)      # val-00000 .. val-00004
    >>> todo = [p for p in plan_parts(chunks, methods, targets, 8) if p.key not in done]
    >>> Part.from_json(p.to_json()) == p                         # how a part travels to a worker
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import pyarrow.fs as pafs

from common import storage
from common.errors import ConfigError

PARTS_DIR = "_parts"  # markers of completed parts: outside pairs/, so no reader ever sees them
MARKER_THREADS = 16


@dataclass(frozen=True)
class Chunk:
    name: str  # val-00000, ..., or noise-00000: the name of its files
    origin: str  # "val" or "noise"
    start: int  # rows [start, stop) of the validation split, or of the noise images
    stop: int

    @property
    def images(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Part:
    key: str  # <method>/<chunk>-t<first target>: its marker's name
    chunk: Chunk
    method: str
    targets: tuple[int, ...]

    @property
    def pairs(self) -> int:
        return self.chunk.images * len(self.targets)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Part:
        d = json.loads(text)
        return cls(d["key"], Chunk(**d["chunk"]), d["method"], tuple(d["targets"]))


@dataclass(frozen=True)
class Marker:
    """A finished part: the files it wrote ([{path, rows, bytes}], relative to the output)."""

    key: str
    files: tuple[dict, ...]
    rows: int
    seconds: float

    @classmethod
    def from_dict(cls, d: dict, where: str) -> Marker:
        try:
            files = tuple({"path": str(f["path"]), "rows": int(f["rows"]),
                           "bytes": int(f["bytes"])} for f in d["files"])
            return cls(str(d["key"]), files, int(d["rows"]), float(d["seconds"]))
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"{where}: not a part's marker; delete it and rerun to redo "
                              "that part") from None


def val_chunks(n_rows: int, rows_per_chunk: int) -> list[Chunk]:
    """Validation rows [0, n_rows) in runs of at most rows_per_chunk, named val-00000, ..."""
    return [Chunk(f"val-{i:05d}", "val", s, min(s + rows_per_chunk, n_rows))
            for i, s in enumerate(range(0, n_rows, rows_per_chunk))]


def noise_chunk(count: int) -> list[Chunk]:
    return [Chunk("noise-00000", "noise", 0, count)] if count else []


def plan_parts(chunks: list[Chunk], methods, targets, targets_per_part: int) -> list[Part]:
    """Every part: chunk x method x group of consecutive targets."""
    out = []
    for chunk in chunks:
        for method in methods:
            for i in range(0, len(targets), targets_per_part):
                group = tuple(int(t) for t in targets[i:i + targets_per_part])
                out.append(Part(f"{method}/{chunk.name}-t{group[0]:04d}", chunk, method, group))
    return out


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


def read_markers(output: str, keys) -> list[Marker]:
    """The markers of finished parts (read in parallel: small objects, latency-bound)."""
    def one(key):
        uri = storage.join(output, marker_file(key))
        return Marker.from_dict(storage.read_json(uri), uri)

    with ThreadPoolExecutor(MARKER_THREADS) as pool:
        return list(pool.map(one, sorted(keys)))


def write_marker(output: str, marker: Marker) -> None:
    storage.write_json_atomic(storage.join(output, marker_file(marker.key)), asdict(marker))
