"""Synthetic data of ImageNet's shape, written straight into the ingest's output format.

    >>> write(Data(output="/tmp/imagenet64", train_rows=1_281_167, val_rows=50_000, classes=1000))

Every class has a smooth random template (8 x 8 x 3 random levels, bilinearly upsampled to
64 x 64); an image is its class's template plus uniform per-pixel noise, so a linear classifier
learns it (the classes differ by far more than the noise). Levels: template 0..191, noise
0..63, the sum 0..254, all in uint8 (no clipping, no wider temporaries).

The files are the ingest's own: each is written by ``pipelines.sink.ImagesDatasink.write`` (its
row groups, dictionaries, statistics and page checksums) from a block of the columns the decode
tasks hand it, with the pixel sums of ``pipelines.ingest.pixel_sums``; the manifest holds every key
``pipelines.ingest`` writes, through the same output lifecycle (identity record, lease, manifest
last). Training rows come in class order, as the ingest of class folders writes them; validation
labels are random. One file's worth of rows (10,922, 128 MiB) is made at a time, vectorised:
memory stays near 1 GB whatever the size.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import torch

from common import lifecycle, schema
from pipelines import decoded, ingest
from pipelines.sink import ImagesDatasink

SIZE = 64
SHAPE = (SIZE, SIZE, 3)
D = SIZE * SIZE * 3
ROWS_PER_FILE = ingest.Settings.file_size_mb * 2**20 // D  # as the ingest sizes its files
COARSE = 8  # the templates' resolution before upsampling: smooth, like a blurred photograph
TEMPLATE_MAX, NOISE_SHIFT = 191, 2  # template 0..191 + (random byte >> 2) 0..63 <= 254


@dataclass(frozen=True)
class Data:
    output: str
    train_rows: int
    val_rows: int
    classes: int
    seed: int = 0
    overwrite: bool = False


def wnid(k: int) -> str:
    return f"n{k:08d}"


def val_id(i: int) -> str:
    """The id of validation image i (0-based), ImageNet's way."""
    return f"ILSVRC2012_val_{i + 1:08d}"


def templates(classes: int, rng: np.random.Generator) -> np.ndarray:
    """(C, D) uint8 HWC templates in 0..TEMPLATE_MAX: coarse random levels, upsampled."""
    coarse = torch.from_numpy(rng.uniform(0, TEMPLATE_MAX, (classes, 3, COARSE, COARSE)))
    fine = torch.nn.functional.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear",
                                           align_corners=False)
    return fine.round().clamp(0, TEMPLATE_MAX).to(torch.uint8).permute(0, 2, 3, 1).reshape(
        classes, D).numpy()


def images(T: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N, D) uint8: each row its class's template plus noise 0..63."""
    X = np.frombuffer(rng.bytes(len(y) * D), np.uint8).reshape(len(y), D) >> NOISE_SHIFT
    X += T[y]
    return X


def block(split: str, start: int, y: np.ndarray, X: np.ndarray) -> pa.Table:
    """Rows [start, start + N) of a split as the decode tasks hand them to the sink."""
    n = len(y)
    if split == "train":
        ids = [f"{wnid(k)}_{start + i}" for i, k in enumerate(y.tolist())]
        sources = [f"train/{wnid(k)}/{i}.JPEG" for k, i in zip(y.tolist(), ids)]
    else:
        ids = [val_id(start + i) for i in range(n)]
        sources = [f"val/{i}.JPEG" for i in ids]
    sums, squares = ingest.pixel_sums(X.reshape(n, SIZE * SIZE, 3))
    now, size = time.time(), pa.array(np.full(n, SIZE, np.int32))
    cols = {schema.IMAGE_ID: pa.array(ids), schema.LABEL: pa.array(y.astype(np.int16)),
            schema.WNID: pa.array([wnid(k) for k in y.tolist()]),
            schema.IMAGE: ingest.image_array(X, np.ones(n, bool)),
            schema.SOURCE: pa.array(sources), schema.ORIG_WIDTH: size, schema.ORIG_HEIGHT: size,
            schema.REASON: pa.nulls(n, pa.string()),
            decoded.PX_SUM: pa.FixedSizeListArray.from_arrays(sums.ravel(), 3),
            decoded.PX_SUMSQ: pa.FixedSizeListArray.from_arrays(squares.ravel(), 3),
            decoded.DECODE_START: pa.array(np.full(n, now)),
            decoded.DECODE_END: pa.array(np.full(n, now)),
            decoded.DECODE_CPU: pa.array(np.zeros(n))}
    return pa.table([cols[f.name] for f in decoded.DECODED_SCHEMA],
                    names=decoded.DECODED_SCHEMA.names)


def write_split(cfg: Data, split: str, T: np.ndarray, rng: np.random.Generator) -> list[dict]:
    """One split, file by file through the ingest's sink; returns the sink's results."""
    rows = cfg.train_rows if split == "train" else cfg.val_rows
    sink = ImagesDatasink(cfg.output, split, ROWS_PER_FILE, SIZE)
    results = []
    for k, start in enumerate(range(0, rows, ROWS_PER_FILE)):
        stop = min(start + ROWS_PER_FILE, rows)
        if split == "train":  # class order, as the ingest of class folders writes it
            y = (np.arange(start, stop, dtype=np.int64) * cfg.classes) // rows
        else:
            y = rng.integers(0, cfg.classes, stop - start)
        table = block(split, start, y, images(T, y, rng))
        results.append(sink.write([table], SimpleNamespace(task_idx=k)))
    return results


def output(cfg: Data) -> lifecycle.Output:
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("output", "overwrite")}
    return lifecycle.Output(cfg.output, "ingest", owns=(*schema.SPLITS, schema.QUARANTINE_DIR),
                            identity={"inputs": {"source": "synthetic"}, "settings": settings})


def write(cfg: Data) -> dict:
    """Write the dataset; returns its manifest (the keys pipelines.ingest writes)."""
    t0 = time.perf_counter()
    if min(cfg.train_rows, cfg.val_rows) < 1 or not 2 <= cfg.classes <= 32767:
        raise ValueError("--train-rows and --val-rows must be positive, --classes 2..32767")
    out = output(cfg)
    out.prepare(cfg.overwrite, resumable=False)
    rng = np.random.default_rng(cfg.seed)
    T = templates(cfg.classes, rng)
    results = {split: write_split(cfg, split, T, rng) for split in schema.SPLITS}
    files = [{"path": r["file"], "rows": r["rows"], "bytes": r["bytes"]}
             for split in schema.SPLITS for r in results[split]]
    files.append(ingest._write_quarantine(cfg.output, []))  # noqa: SLF001 - the ingest's file
    mean, std = ingest._pixel_stats(results["train"], SIZE)  # noqa: SLF001 - its statistics
    counts = {s: {"seen": n, "written": n, "quarantined": 0}
              for s, n in (("train", cfg.train_rows), ("val", cfg.val_rows))}
    return out.finish({
        schema.M_KIND: "ingest", schema.M_SOURCE: "synthetic",
        schema.M_CLASSES: [wnid(k) for k in range(cfg.classes)],
        schema.M_CLASS_NAMES: [f"synthetic class {k}" for k in range(cfg.classes)],
        schema.M_IMAGE_SHAPE: list(SHAPE), schema.M_COUNTS: counts,
        schema.M_PIXEL_MEAN: mean, schema.M_PIXEL_STD: std,
        schema.M_RESIZE: {"mode": "synthetic"}, schema.M_FILES: files,
        **schema.stamp(asdict(cfg), {"total_s": round(time.perf_counter() - t0, 3)})})
