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
target t under image i's id, label and source name: the first n images' rows are the slice's
own. The fooling image is stored where the attack's --keep-images would store it (all, none, or
the first --sample-images). The copies are made as distinct as real rows, or Parquet's
dictionaries would store a file's few distinct values once and the files would be far smaller
than the attack's (the images ten times, the measurements four times): in the k-th copy of a row
(k >= 1) byte k of the image is one level off (distinct up to 12,288 copies) and the
measurements that are continuous (l2, p_target and the two bounds) have their lowest 8 bits
changed (a relative 1.5e-5 at most). The rest repeats as stored (pred, strength, linf, ...), as
it largely does in real outputs. Prints one JSON line: the seconds of the writing and of the
summary tables, the rows, files and bytes.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from attacks import fool, outputs, parts
from attacks.pairs import Pairs, TargetFiles, binary_column, names_column, open_attack
from common import dataset, schema, storage
from common.errors import ConfigError
from common.model import read_model

THREADS = 2  # writers at once: Arrow's copies and writes release the GIL
# Measurements that take a different value in nearly every real pair (the others, classes,
# levels and grid steps, repeat in real outputs too)
CONTINUOUS = (schema.L2, schema.P_TARGET, schema.BOUND_LINF, schema.BOUND_L2)


@dataclass(frozen=True)
class Images:
    """The first validation images of the data, in the order the attack reads them."""

    ids: list[str]
    labels: np.ndarray  # (n,) int16
    names: tuple[str, ...]  # a name per class (schema.class_names)


def val_images(data: str, m: dict, n: int) -> Images:
    """The ids and labels of the first ``n`` validation images."""
    tables = []
    for uri in dataset.split_files(data, m, "val"):
        if sum(t.num_rows for t in tables) >= n:
            break
        with dataset.parquet_file(uri) as pf:
            tables.append(pf.read(columns=[schema.IMAGE_ID, schema.LABEL]))
    t = pa.concat_tables(tables)
    if t.num_rows < n:
        raise ConfigError(f"{data} has {t.num_rows} validation images, fewer than the {n} asked")
    return Images(t.column(0).to_pylist()[:n], t.column(1).to_numpy()[:n],
                  tuple(schema.class_names(m)))


def kept(settings: dict, i: np.ndarray) -> np.ndarray:
    """Which validation images (rows i of the split) store their fooling images, by the rule of
    the attack's workers (attacks/worker.py) for its --keep-images: all, none, or sample (the
    first --sample-images)."""
    keep = settings.get("keep_images", "all")
    if keep == "sample":
        return i < settings["sample_images"]
    return np.full(len(i), keep == "all")


def repeated(slice_rows: pa.Table, im: Images, chunk: parts.Chunk, keep: np.ndarray,
             D: int) -> pa.Table:
    """A chunk's rows for one (method, target): slice row i mod n as image i's (its id, label
    and source name), its image where ``keep`` (one per row) says, null elsewhere; in copy
    k = i // n >= 1 of a row the continuous measurements and the image differ a little."""
    n, i = slice_rows.num_rows, np.arange(chunk.start, chunk.stop)
    copy = i // n
    table = slice_rows.take(pa.array(i % n))
    labels = im.labels[chunk.start:chunk.stop]
    new = {schema.IMAGE_ID: pa.array(im.ids[chunk.start:chunk.stop]),
           schema.LABEL: pa.array(labels), schema.SOURCE_NAME: names_column(labels, im.names),
           schema.IMAGE: images(table.column(schema.IMAGE), copy, keep, D),
           **{c: nudged(table.column(c), copy) for c in CONTINUOUS}}
    for name, values in new.items():
        col = table.schema.get_field_index(name)
        table = table.set_column(col, table.schema.field(col), values)
    return table


def nudged(values: pa.ChunkedArray, copy: np.ndarray) -> pa.Array:
    """float32 values whose lowest 8 mantissa bits, in copy k >= 1, are XORed with a number
    1..255 of k: at most a relative 1.5e-5 off, never another sign or power of two."""
    bits = values.to_numpy().astype(np.float32).view(np.uint32)
    bits ^= np.where(copy > 0, (copy - 1) % 255 + 1, 0).astype(np.uint32)
    return pa.array(bits.view(np.float32))


def images(stored: pa.ChunkedArray, copy: np.ndarray, keep: np.ndarray, D: int) -> pa.Array:
    """The image column (the attack's ``binary_column``): the stored images where ``keep``,
    null elsewhere; byte k mod D of an image of copy k >= 1 one level off."""
    k = np.flatnonzero(keep)
    X = np.zeros((len(keep), D), np.uint8)  # calloc'd: only the kept rows' pages are touched
    X[k] = dataset.pixels(stored.take(pa.array(k)), D)
    again = k[copy[k] > 0]
    X[again, copy[again] % D] ^= 1
    return binary_column(X, keep)


def write_partition(out: str, src: Pairs, method: str, target: int, im: Images,
                    chunks: list[parts.Chunk], settings: dict, shape) -> list[dict]:
    """Every chunk's file of one (method, target); returns their listing."""
    rows = src.read(method, target, schema.PAIRS_FILE_SCHEMA.names).sort_by(schema.IMAGE_ID)
    listing = []
    for chunk in chunks:
        keep = kept(settings, np.arange(chunk.start, chunk.stop))
        files = TargetFiles(out, method, [target], chunk.name, shape)
        files.add({target: repeated(rows, im, chunk, keep, int(np.prod(shape)))})
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
    im, src = val_images(cfg.data, inputs.manifest, n_images), Pairs.open(slice_, m)
    chunks = parts.val_chunks(n_images, settings["rows_per_chunk"])
    with ThreadPoolExecutor(THREADS) as pool:
        jobs = [pool.submit(write_partition, out, src, method, t, im, chunks, settings, shape)
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
