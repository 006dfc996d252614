"""Ingest throughput: this job vs Ray's stock read_images + write_parquet vs a one-process floor.

    python -m benchmarks.ingest [--per-class 300] [--cpus 2]

On the same generated ImageNet-sized JPEGs (pipelines/sample.py, without hostile files, which the
stock reader cannot survive), in one run:
- floor: one process reading and decoding + resizing every file with this job's decoder: the
  per-core rate, times the CPUs given to Ray, is what perfect scaling would reach;
- stock: ``ray.data.read_images(size=(64, 64), mode="RGB")`` then ``write_parquet``;
- ingest: ``pipelines.ingest.run`` on the training split.
Each Ray pipeline runs once on a small subset first, so worker start-up is not counted.
Prints images per second and the ratios against the goals (>= 4x stock, >= 60% of floor x CPUs).
"""

from __future__ import annotations

import argparse
import glob
import os
import tempfile
import time

import ray

from pipelines import images, ingest, sample


def floor_rate(files: list[str], size: int) -> float:
    t = time.perf_counter()
    for path in files:
        with open(path, "rb") as f:
            images.to_pixels(f.read(), size)
    return len(files) / (time.perf_counter() - t)


def stock_rate(train: str, out: str, size: int, n: int) -> float:
    t = time.perf_counter()
    ray.data.read_images(train, size=(size, size), mode="RGB").write_parquet(out)
    return n / (time.perf_counter() - t)


def ingest_rate(src: str, out: str, n: int, limit: int | None = None) -> float:
    cfg = ingest.Settings(source=src, output=out, splits=("train",), limit_per_class=limit,
                          overwrite=True)
    t = time.perf_counter()
    ingest.run(cfg)
    return n / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--per-class", type=int, default=300,
                   help="training images per class, 10 classes")
    p.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs for local Ray")
    p.add_argument("--data", default=None, help="reuse a sample folder made without oddities")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = args.data or os.path.join(tmp, "src")
        if not args.data:
            sample.generate(sample.Settings(out=src, train_per_class=args.per_class,
                                            val_per_class=0, oddities=False))
        files = sorted(glob.glob(os.path.join(src, "train", "*", "*")))
        n = len(files)
        ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="WARNING")
        ray.data.DataContext.get_current().enable_progress_bars = False
        # warm-up: start the workers of both pipelines on a few files
        warm = glob.glob(os.path.join(src, "train", "*"))[0]
        stock_rate(warm, os.path.join(tmp, "warm-stock"), 64, 1)
        ingest_rate(src, os.path.join(tmp, "warm-ingest"), 1, limit=5)

        floor = floor_rate(files, 64)
        stock = stock_rate(os.path.join(src, "train"), os.path.join(tmp, "stock"), 64, n)
        ours = ingest_rate(src, os.path.join(tmp, "ours"), n)
        ray.shutdown()
    ideal = floor * args.cpus
    print(f"images: {n} JPEGs ({n // 10} per class), Ray CPUs: {args.cpus}")
    print(f"floor (1 process, decode+resize): {floor:8.1f} images/s; "
          f"x{args.cpus} CPUs = {ideal:.1f}")
    print(f"stock read_images+write_parquet : {stock:8.1f} images/s")
    print(f"pipelines.ingest                : {ours:8.1f} images/s")
    print(f"ingest / stock          = {ours / stock:5.2f}x  (goal >= 4x)")
    print(f"ingest / (floor x CPUs) = {ours / ideal:5.2f}   (goal >= 0.60)")


if __name__ == "__main__":
    main()
