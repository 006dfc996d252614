"""Training throughput: the Ray Train job against a plain PyTorch loop, on the same data.

    python -m benchmarks.train [--rows 20000] [--classes 1000] [--cpus 2]
    python -m benchmarks.train --gpu      # ImageNet's size: 1,281,167 rows x 1000 classes

Synthetic 64x64 images (a template per class plus noise) are written once as an ingest output
(Parquet + manifest, in a temporary folder: in the page cache, so in memory) and kept as tensors.
In one run, each measures one epoch of the same minibatch steps (training/epochs.py, batch 256):
- plain: one process, the tensors in memory, a fresh permutation per epoch, no Ray;
- job, 1 worker: ``training.train.run`` streaming the Parquet through Ray Data, with as many
  torch threads as the plain loop (one Ray CPU is left to Ray Data);
- job, 2 workers: DDP over gloo, half the threads each;
- job, 1 worker --cache: the shard read once into memory (what a GPU does by default).
The job runs 2 epochs; its throughput is the second epoch's (once started), and its start-up is
the fit time not spent in epochs. Prints samples per second and the ratio to the plain loop
(goal on CPU: the 1-worker job at >= 70% of plain). With --gpu the plain loop and the job run on
the GPU (the job caching the whole set in device memory).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from common import schema, storage
from training import batches, epochs, softmax, train

SHAPE = (64, 64, 3)
D = SHAPE[0] * SHAPE[1] * SHAPE[2]
ROWS_PER_FILE = 10_000  # about 120 MB files, as the ingest job writes


def synthetic(out: str, rows: int, val_rows: int, classes: int, seed: int = 0
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Write an ingest output of learnable random images; returns the training tensors."""
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 216, (classes, D), dtype=np.uint8)
    X_all, y_all, files = [], [], []
    for split, n in (("train", rows), ("val", val_rows)):
        os.makedirs(os.path.join(out, split), exist_ok=True)
        for k, start in enumerate(range(0, n, ROWS_PER_FILE)):
            y = rng.integers(0, classes, min(ROWS_PER_FILE, n - start)).astype(np.int16)
            noise = rng.integers(-40, 41, (len(y), D), dtype=np.int16)
            X = np.clip(base[y].astype(np.int16) + noise, 0, 255).astype(np.uint8)
            rel = f"{split}/part-{k:05d}.parquet"
            images = pa.FixedSizeBinaryArray.from_buffers(
                pa.binary(D), len(y), [None, pa.py_buffer(X.tobytes())]).cast(pa.binary())
            ids = [f"{split}_{start + i:08d}" for i in range(len(y))]
            table = pa.table({
                schema.IMAGE_ID: ids, schema.LABEL: pa.array(y),
                schema.WNID: [f"n{k:08d}" for k in y.tolist()], schema.IMAGE: images,
                schema.SOURCE: [f"{i}.JPEG" for i in ids],
                schema.ORIG_WIDTH: pa.array(np.full(len(y), SHAPE[1], np.int32)),
                schema.ORIG_HEIGHT: pa.array(np.full(len(y), SHAPE[0], np.int32))},
                schema=schema.IMAGES_SCHEMA)  # every column of the ingest contract
            pq.write_table(table, os.path.join(out, rel), row_group_size=1024)
            files.append({"path": rel, "rows": len(y)})
            if split == "train":
                X_all.append(torch.from_numpy(X))
                y_all.append(torch.from_numpy(y.astype(np.int64)))
    X = torch.cat(X_all)
    px = X[: min(rows, 20_000)].reshape(-1, 3).double()
    storage.write_manifest(out, {
        schema.M_KIND: "ingest", schema.M_CLASSES: [f"n{k:08d}" for k in range(classes)],
        schema.M_IMAGE_SHAPE: list(SHAPE), schema.M_FILES: files,
        schema.M_COUNTS: {"train": {"written": rows}, "val": {"written": val_rows}},
        schema.M_PIXEL_MEAN: px.mean(0).tolist(), schema.M_PIXEL_STD: px.std(0).tolist()})
    return X, torch.cat(y_all)


def plain(X: torch.Tensor, y: torch.Tensor, classes: int, device: str, threads: int) -> float:
    """Samples per second of one epoch of the plain loop (after a short warm-up)."""
    torch.set_num_threads(threads)
    y_rows = y
    X, y = X.to(device), y.to(device)
    model = softmax.make_model(D, classes, 1e-3, seed=0).to(device)
    opt = epochs.make_optimizer("sgd", model.parameters(), 3e-3, 0.9)
    shift, scale = (t.to(device) for t in softmax.channel_stats([128.0] * 3, [60.0] * 3, D))
    for seed in (0, 1):  # the first pass warms up; the second is timed
        rows = min(256 * 8, len(y)) if seed == 0 else len(y)
        sub = batches.Cache(X[:rows], y[:rows])
        sub.n = rows
        t = time.perf_counter()
        epochs.train_epoch(model, model, opt, sub.batches(256, seed), shift, scale, 0.1,
                           lambda i: 3e-3)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
    del X, y, model, opt
    if device == "cuda":
        torch.cuda.empty_cache()  # leave the device's memory to the job's worker
    return len(y_rows) / seconds


def job(data: str, out: str, **kw) -> tuple[float, float]:
    """(samples per second of the second epoch, start-up seconds) of one run of the job."""
    m = train.run(train.Settings(data=data, output=out, epochs=2, overwrite=True, **kw))
    rows = storage.read_json(storage.join(out, schema.METRICS_FILE))["history"]
    in_epochs = sum(r["train_s"] + r.get("val_s", 0.0) for r in rows)
    return rows[-1]["samples_per_s"], m[schema.M_TIMINGS]["fit_s"] - in_epochs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, default=None, help="training rows (default 20000; "
                   "ImageNet's 1281167 with --gpu)")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs for local Ray")
    p.add_argument("--gpu", action="store_true", help="plain loop and job on one GPU")
    args = p.parse_args()
    rows = args.rows or (1_281_167 if args.gpu else 20_000)
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        t = time.perf_counter()
        X, y = synthetic(data, rows, 1000, args.classes)
        print(f"data: {rows} x {D} uint8 rows, {args.classes} classes, written in "
              f"{time.perf_counter() - t:.0f} s", flush=True)
        device = "cuda" if args.gpu else "cpu"
        before = plain(X, y, args.classes, device, args.cpus)
        results = {}
        ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="WARNING")
        ray.data.DataContext.get_current().enable_progress_bars = False
        out = os.path.join(tmp, "model")
        if args.gpu:
            results["job, 1 GPU worker, cached"] = job(data, out, use_gpu=True)
        else:
            results["job, 1 worker"] = job(data, out, threads=args.cpus)
            results["job, 1 worker, --shuffle local"] = job(data, out, threads=args.cpus,
                                                            shuffle="local")
            results["job, 2 workers"] = job(data, out, num_workers=2, cpus_per_worker=0.5,
                                            threads=max(1, args.cpus // 2))
            results["job, 1 worker, --cache"] = job(data, out, threads=args.cpus, cache=True)
        ray.shutdown()
        after = plain(X, y, args.classes, device, args.cpus)  # the machine may be shared:
    base = (before + after) / 2  # the plain loop runs before and after the jobs
    print(f"\none epoch at 64x64 x {args.classes} classes, batch 256, {rows} rows, "
          f"{args.cpus} CPUs{' + 1 GPU' if args.gpu else ''}:")
    print(f"{'plain loop (1 process)':32s} {base:10.0f} samples/s   (before {before:.0f}, "
          f"after {after:.0f})")
    for name, (rate, startup) in results.items():
        print(f"{name:32s} {rate:10.0f} samples/s   {rate / base:5.2f} x plain   "
              f"start-up {startup:5.1f} s")


if __name__ == "__main__":
    main()
