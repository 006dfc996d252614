"""What verified reads cost: Parquet page checksums against a sha256 of the whole file.

    python -m benchmarks.verify [--mb 100] [--repeat 7]

One Parquet file of 64x64x3 images (12,288 bytes each, about ``--mb`` MB, random pixels around a
colour per image: snappy keeps them at full size, as it does photographs at this size), written
the ingest's way (pipelines/sink.py: 1,024-row groups, no dictionary or statistics for the
images), in a temporary folder (the page cache: no disk in the figures, so the checks weigh their
most). In turns, each measured ``--repeat`` times (the median printed, wall and CPU seconds):
- write: ``pq.write_table`` without and with ``write_page_checksum`` (a CRC-32 per page), and
  the sha256 of the written bytes (what a per-file digest adds);
- read the whole file: ``pq.read_table`` without and with ``page_checksum_verification``, and
  reading its bytes + their sha256 (what a digest adds before a reader may trust the file);
- read one row group (the attack's ``common.dataset.read_rows``): without and with verification.
  A digest cannot check part of a file: it costs the whole file's hash.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from common import schema
from pipelines import decoded

SHAPE = (64, 64, 3)
D = SHAPE[0] * SHAPE[1] * SHAPE[2]


def images_table(mb: float, seed: int = 0) -> pa.Table:
    """About ``mb`` MB of rows of the ingest's schema."""
    n = max(1, round(mb * 1e6 / D))
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, 1, 3), dtype=np.int16)
    X = np.clip(base + rng.integers(-24, 25, (n, D // 3, 3), dtype=np.int16), 0, 255)
    X = X.astype(np.uint8).reshape(n, D)
    offsets = pa.py_buffer(np.arange(n + 1, dtype=np.int32) * D)
    images = pa.Array.from_buffers(pa.binary(), n, [None, offsets, pa.py_buffer(X)])
    labels = rng.integers(0, 1000, n)
    return pa.Table.from_arrays([
        pa.array([f"ILSVRC2012_val_{i + 1:08d}" for i in range(n)]),
        pa.array(labels, pa.int16()), pa.array([f"n{k:08d}" for k in labels]), images,
        pa.array([f"val/{i}.JPEG" for i in range(n)]), pa.array(np.full(n, 500), pa.int32()),
        pa.array(np.full(n, 375), pa.int32())], schema=schema.IMAGES_SCHEMA)


def write(table: pa.Table, path: str, checksum: bool) -> None:
    small = [n for n in table.column_names if n != schema.IMAGE]
    pq.write_table(table, path, row_group_size=decoded.ROW_GROUP_ROWS, use_dictionary=small,
                   write_statistics=small, write_page_checksum=checksum)


def sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def measure(cases: dict, repeat: int) -> dict[str, tuple[float, float]]:
    """name -> (median wall s, median CPU s), the cases taken in turns."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    for _ in range(repeat):
        for name, run in cases.items():
            w, c = time.perf_counter(), time.process_time()
            run()
            times[name].append((time.perf_counter() - w, time.process_time() - c))
    return {name: (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts))
            for name, ts in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mb", type=float, default=100, help="size of the file's images (MB)")
    p.add_argument("--repeat", type=int, default=7, help="runs of each case")
    args = p.parse_args()
    table = images_table(args.mb)
    with tempfile.TemporaryDirectory() as tmp:
        plain, crc = os.path.join(tmp, "plain.parquet"), os.path.join(tmp, "crc.parquet")
        write(table, plain, False)
        write(table, crc, True)
        mb, meta = os.path.getsize(crc) / 1e6, pq.ParquetFile(crc).metadata
        g = meta.num_row_groups // 2  # the row group read alone
        group_mb = meta.row_group(g).total_byte_size / 1e6
        print(f"{table.num_rows} images, {mb:.1f} MB "
              f"({os.path.getsize(crc) - os.path.getsize(plain)} bytes of page checksums), "
              f"{meta.num_row_groups} row groups; median of {args.repeat}, wall and CPU seconds")
        cases = {  # name -> (the work, MB it touches)
            "write": (lambda: write(table, os.path.join(tmp, "w.parquet"), False), mb),
            "write + page checksums": (
                lambda: write(table, os.path.join(tmp, "w.parquet"), True), mb),
            "sha256 of the file": (lambda: sha256_file(crc), mb),
            "read": (lambda: pq.read_table(crc), mb),
            "read + page checksums": (
                lambda: pq.read_table(crc, page_checksum_verification=True), mb),
            "read one row group": (lambda: pq.ParquetFile(crc).read_row_group(g), group_mb),
            "read one row group + page checksums": (lambda: pq.ParquetFile(
                crc, page_checksum_verification=True).read_row_group(g), group_mb),
        }
        results = measure({name: run for name, (run, _) in cases.items()}, args.repeat)
    for name, (wall, cpu) in results.items():
        print(f"  {name:38s} {wall:7.3f} s {cpu:7.3f} CPU s {cases[name][1] / wall:6.0f} MB/s")
    for base, checked in (("write", "write + page checksums"), ("read", "read + page checksums"),
                          ("read one row group", "read one row group + page checksums"),
                          ("read", "sha256 of the file")):
        (w0, c0), (w1, c1), size = results[base], results[checked], cases[checked][1]
        extra_w, extra_c = (w1, c1) if checked.startswith("sha256") else (w1 - w0, c1 - c0)
        label = "read + sha256 of the file" if checked.startswith("sha256") else checked
        print(f"{label}: {extra_w:+.3f} s wall ({extra_w / w0:+.0%} of {base!r}), "
              f"{extra_c:+.3f} CPU s ({extra_c / size * 1e3:.2f} CPU ms per MB checked)")


if __name__ == "__main__":
    main()
