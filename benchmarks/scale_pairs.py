"""An attack output of any size, built from a real one: the slice's rows repeated under the ids
of further validation images, written as the attack writes them.

    python -m benchmarks.scale_pairs --slice out/fooling-slice --output out/fooling-big \\
        --pairs-rows 50000000          # replaces an earlier output of its own there

The slice is a finished ``attacks.fool`` output over the first n validation images and every
target. The built output is what ``attacks.fool`` with the slice's settings would write for the
first ``--pairs-rows / targets`` validation images of the same data: the same identity record,
chunks (``rows_per_chunk`` images a file), files (``attacks.pairs.TargetFiles``: one per method
x target x chunk, the attack's row groups), summary tables (``attacks.outputs.write_summary``,
reading every stored pair back) and manifest (the attack's own, written last through the output
lifecycle); the contact sheets are the slice's (its first images are the output's first).

The row of image i and target t, for each method, is the slice's row of image i mod n and
target t (every column as stored) under image i's id: the first n images' rows are the slice's
own. The fooling image is stored where the attack's --keep-images would store it (all, none, or
the first --sample-images), with one change: in the k-th copy of a row (k >= 1) byte k of the
image is one level off, so that no two stored images are the same (up to 12,288 copies). Copies
alike would let Parquet's dictionary encoding store a file's few distinct images once (the
attack's writer leaves the dictionary on; its images never repeat), and the files would be ten
times smaller than the attack's. Prints one JSON line: the seconds of the writing and of the
summary tables, the rows, files and bytes.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from attacks import fool, outputs, parts
from attacks.pairs import Pairs, TargetFiles, binary_column, open_attack
from common import dataset, schema, storage
from common.errors import ConfigError
from common.model import read_model

THREADS = 2  # writers at once: Arrow's copies and writes release the GIL


def val_ids(data: str, m: dict, n: int) -> list[str]:
    """The ids of the first ``n`` validation images, in the order the attack reads them."""
    ids: list[str] = []
    for uri in dataset.split_files(data, m, "val"):
        if len(ids) >= n:
            break
        with dataset.parquet_file(uri) as pf:
            ids += pf.read(columns=[schema.IMAGE_ID]).column(0).to_pylist()
    if len(ids) < n:
        raise ConfigError(f"{data} has {len(ids)} validation images, fewer than the {n} asked")
    return ids[:n]


def kept(settings: dict, i: np.ndarray) -> np.ndarray:
    """Which validation images (rows i of the split) store their fooling images, by the rule of
    the attack's workers (attacks/worker.py) for its --keep-images: all, none, or sample (the
    first --sample-images)."""
    keep = settings.get("keep_images", "all")
    if keep == "sample":
        return i < settings["sample_images"]
    return np.full(len(i), keep == "all")


def repeated(slice_rows: pa.Table, ids: list[str], chunk: parts.Chunk, keep: np.ndarray,
             D: int) -> pa.Table:
    """A chunk's rows for one (method, target): slice row i mod n under image i's id, its
    image where ``keep`` (one per row) says, null elsewhere; in copy k = i // n >= 1 of a row,
    byte k mod D of its image is one level off."""
    n, i = slice_rows.num_rows, np.arange(chunk.start, chunk.stop)
    table = slice_rows.take(pa.array(i % n))
    col = table.schema.get_field_index(schema.IMAGE_ID)
    table = table.set_column(col, table.schema.field(col), pa.array(ids[chunk.start:chunk.stop]))
    col = table.schema.get_field_index(schema.IMAGE)
    return table.set_column(col, table.schema.field(col), images(table.column(col), i // n,
                                                                 keep, D))


def images(stored: pa.ChunkedArray, copy: np.ndarray, keep: np.ndarray, D: int) -> pa.Array:
    """The image column (the attack's ``binary_column``): the stored images where ``keep``,
    null elsewhere; byte k mod D of an image of copy k >= 1 one level off."""
    k = np.flatnonzero(keep)
    X = np.zeros((len(keep), D), np.uint8)  # calloc'd: only the kept rows' pages are touched
    X[k] = dataset.pixels(stored.take(pa.array(k)), D)
    again = k[copy[k] > 0]
    X[again, copy[again] % D] ^= 1
    return binary_column(X, keep)


def write_partition(out: str, src: Pairs, method: str, target: int, ids: list[str],
                    chunks: list[parts.Chunk], settings: dict, shape) -> list[dict]:
    """Every chunk's file of one (method, target); returns their listing."""
    rows = src.read(method, target, schema.PAIRS_FILE_SCHEMA.names).sort_by(schema.IMAGE_ID)
    listing = []
    for chunk in chunks:
        keep = kept(settings, np.arange(chunk.start, chunk.stop))
        files = TargetFiles(out, method, [target], chunk.name, shape)
        files.add({target: repeated(rows, ids, chunk, keep, int(np.prod(shape)))})
        listing += files.close()
    return listing


def attack(m: dict, out: str, n_images: int, targets: list[int]) -> tuple:
    """(settings, inputs) of an attack run like the slice's on the first ``n_images`` images:
    what ``attacks.fool`` would identify, chunk and list for that run."""
    fields = fool.Settings.__dataclass_fields__
    config = {k: v for k, v in m[schema.M_CONFIG].items() if k in fields}
    cfg = fool.Settings(**{**config, "output": out, "limit_images": n_images, "overwrite": True})
    data = dataset.open_ingest(cfg.data, splits=("val",))
    model = read_model(cfg.model, dataset.num_features(data))
    return cfg, fool.Inputs(data, model, tuple(targets), n_images)


def plan(m: dict, rows: int) -> tuple[int, list[int], list[str]]:
    """(images, targets, methods) of the built output; refuses rows it cannot hold."""
    settings = m[schema.M_IDENTITY]["settings"]
    if m[schema.M_COUNTS]["noise_images"]:
        raise ConfigError("the slice must start from validation images only (no noise)")
    targets, methods = [int(t) for t in settings["targets"]], list(settings["methods"])
    if rows < len(targets) or rows % len(targets):
        raise ConfigError(f"--pairs-rows {rows} must be a positive multiple of the slice's "
                          f"{len(targets)} targets (images x targets)")
    return rows // len(targets), targets, methods


def build(slice_: str, out: str, rows: int) -> dict:
    """Write the built output; returns its figures (seconds, rows, files, bytes)."""
    t0 = time.perf_counter()
    m = open_attack(slice_, needs=(schema.M_FILES, schema.M_IDENTITY, schema.M_COUNTS))
    n_images, targets, methods = plan(m, rows)
    cfg, inputs = attack(m, out, n_images, targets)
    lc = fool.output(cfg, inputs)
    lc.prepare(overwrite=True, resumable=False)
    settings, shape = lc.identity["settings"], tuple(m[schema.M_IMAGE_SHAPE])
    ids, src = val_ids(cfg.data, inputs.manifest, n_images), Pairs.open(slice_, m)
    chunks = parts.val_chunks(n_images, settings["rows_per_chunk"])
    with ThreadPoolExecutor(THREADS) as pool:
        jobs = [pool.submit(write_partition, out, src, method, t, ids, chunks, settings, shape)
                for method in methods for t in targets]
        files = [f for job in jobs for f in job.result()]
    write_s = time.perf_counter() - t0
    t = time.perf_counter()
    files += outputs.write_summary(Pairs(out, files), methods, targets, schema.class_names(m))
    summary_s = time.perf_counter() - t
    for f in m[schema.M_FILES]:  # the contact sheets: of the first images, the slice's own
        if f["path"].startswith(schema.FIGURES_DIR + "/"):
            storage.write_bytes(storage.join(out, f["path"]),
                                storage.read_bytes(storage.join(slice_, f["path"])))
            files.append(f)
    timings = {"total_s": round(time.perf_counter() - t0, 3)}
    lc.finish(fool._manifest(cfg, inputs, files, timings))  # noqa: SLF001 - the attack's own
    pair_files = [f for f in files if f["path"].startswith(schema.PAIRS_DIR + "/")]
    return {"write_s": round(write_s, 3), "summary_tables_s": round(summary_s, 3),
            "rows_per_method": rows, "images": n_images, "files": len(files),
            "pairs_files": len(pair_files), "pairs_bytes": sum(f["bytes"] for f in pair_files)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--slice", required=True, help="a finished attack output (every target)")
    p.add_argument("--output", required=True, help="where to write the built output")
    p.add_argument("--pairs-rows", type=int, required=True, help="rows per method")
    args = p.parse_args(argv)
    print(json.dumps(build(args.slice, args.output, args.pairs_rows)))


if __name__ == "__main__":
    main()
