"""Ingest ImageNet into 64x64 Parquet with Ray Data.

    python -m pipelines.ingest --source data/imagenet --output out/imagenet64
    ray job submit --working-dir . -- python -m pipelines.ingest \\
        --source s3://bucket/imagenet --output s3://bucket/imagenet64

Writes ``<output>/train/``, ``<output>/val/`` (Parquet files of about --file-size-mb each, one
row per image: image_id, label, wnid, image (the pixels: --size x --size x 3 bytes, RGB, row by
row), source, orig_width, orig_height), ``<output>/quarantine/`` (one row per unusable input:
source, split and its reason) and, last, ``<output>/manifest.json``. Every file listed is
accounted for: seen = written + quarantined.

The work: the driver lists the files, or the images inside ImageNet's tarballs with their byte
ranges; Ray Data tasks fetch them --images-per-task at a time (a batch of tar members with one
ranged read) and decode them; write tasks gather about a file's worth of rows, write it, and send
back only small things: counts, pixel sums, and the quarantine rows.
"""
# The code: pipelines/sources.py and tars.py list, images.py decodes, sink.py writes the files.

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from common import cli, lifecycle, progress, schema, storage
from common.errors import ConfigError
from pipelines import images, sources
from pipelines.decoded import (
    DECODE_CPU,
    DECODE_END,
    DECODE_START,
    DECODED_SCHEMA,
    PX_SUM,
    PX_SUMSQ,
)

log = logging.getLogger(__name__)

FETCH_THREADS = 16  # concurrent reads per decode task: hides object-store latency
TAR_GAP = 8 * 2**20  # a batch's tarball members are read at once unless this much lies between
# Write tasks mostly wait on storage. Asking for less CPU than the decoders also keeps Ray Data
# from fusing decode into write, which would make each write task decode a whole file's worth of
# images alone, one core per output file.
WRITE_CPUS = 0.5

@dataclass(frozen=True)
class Settings:
    source: str = field(metadata={"help": "ImageNet root: local path or s3://bucket/prefix"})
    output: str = field(metadata={"help": "where to write the dataset: local path or s3://"})
    splits: tuple[str, ...] = field(default=schema.SPLITS, metadata={"help": "splits to ingest"})
    size: int = field(default=64, metadata={"help": "side of the square output images, pixels"})
    resize: str = field(
        default="squash",
        metadata={"help": "squash: whole image, box filter; crop: central square, box filter",
                  "choices": images.RESIZE_MODES},
    )
    draft: bool = field(
        default=True, metadata={"help": "reduced-size JPEG decoding (about twice as fast); "
                                        "--no-draft: exact full decode"}
    )
    limit_per_class: int | None = field(
        default=None,
        metadata={"help": "ingest at most N images per class and split, for quick runs "
                          "(default: all)"})
    file_size_mb: int = field(default=128, metadata={"help": "target Parquet file size, MiB"})
    images_per_task: int = field(default=512, metadata={"help": "images each decode task reads"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output"})

    RENAMED = {"batch_size": "images_per_task"}  # the old name, refused in one line


def unreadable_reason(fs, e: OSError) -> str | None:
    """The quarantine reason when a local file may not be read (permissions), else None."""
    if isinstance(fs, pafs.LocalFileSystem) and isinstance(e, (PermissionError,
                                                                IsADirectoryError)):
        return f"unreadable: {os.strerror(e.errno)}" if e.errno else "unreadable"
    return None


def _read_members(fs, root: str, archive: str, spans: list[tuple[int, int]]) -> list[bytes]:
    """Images inside one tarball by their (offset, length): one ranged read when they lie close
    together (consecutive members of a batch), else one read each."""
    first, end = min(o for o, _ in spans), max(o + n for o, n in spans)
    _, base = storage.filesystem(root)
    try:
        with fs.open_input_file(f"{base}/{archive}") as f:
            if end - first <= 2 * sum(n for _, n in spans) + TAR_GAP:
                data = memoryview(f.read_at(end - first, first))  # bytes or a pyarrow Buffer
                return [bytes(data[o - first:o - first + n]) for o, n in spans]
            with ThreadPoolExecutor(min(FETCH_THREADS, len(spans))) as pool:
                return list(pool.map(lambda s: bytes(memoryview(f.read_at(s[1], s[0]))), spans))
    except OSError as e:
        raise OSError(f"cannot read {storage.join(root, archive)}: {e}") from e


def fetch_batch(batch: pa.Table, root: str) -> list[bytes | images.BadImage]:
    """The bytes of every listed image of a batch: files with concurrent reads, tarball members
    with ranged reads. A file this process may not read is a BadImage; storage errors raise."""
    fs, base = storage.filesystem(root)

    def fetch(rel: str) -> bytes | images.BadImage:
        # Transient S3 errors are retried inside pyarrow (common/storage.py); what still fails is
        # a storage problem, not a bad image: it stops the job with the URI and the reason. A
        # local file this process may not read is a bad input: quarantined (unreadable_reason).
        try:
            with fs.open_input_stream(f"{base}/{rel}") as f:
                return f.read()
        except OSError as e:
            why = unreadable_reason(fs, e)
            if why:
                return images.BadImage(why)
            raise OSError(f"cannot read {storage.join(root, rel)}: {e}") from e

    rels = batch.column(schema.SOURCE).to_pylist()
    archives = batch.column(sources.ARCHIVE).to_pylist()
    blobs: list = [None] * len(rels)
    plain = [i for i, a in enumerate(archives) if a is None]
    with ThreadPoolExecutor(min(FETCH_THREADS, max(1, len(plain)))) as pool:
        for i, data in zip(plain, pool.map(fetch, [rels[i] for i in plain])):
            blobs[i] = data
    offsets = batch.column(sources.OFFSET).to_pylist()
    lengths = batch.column(sources.LENGTH).to_pylist()
    for archive in {a for a in archives if a is not None}:
        members = [i for i, a in enumerate(archives) if a == archive]
        spans = [(offsets[i], lengths[i]) for i in members]
        for i, data in zip(members, _read_members(fs, root, archive, spans)):
            blobs[i] = data
    return blobs


def pixel_sums(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image and channel, the sum and the sum of squares of (N, P, 3) uint8 pixels: two
    (N, 3) int64 arrays, exact. Channel-planar first: numpy sums a contiguous axis about ten
    times faster than the strided one, and 255**2 fits uint16."""
    planes = np.ascontiguousarray(pixels.transpose(0, 2, 1))  # (N, 3, P)
    sums = planes.sum(-1, dtype=np.int64)
    planes = planes.astype(np.uint16)
    planes *= planes
    return sums, planes.sum(-1, dtype=np.int64)


def image_array(pixels: np.ndarray, good: np.ndarray) -> pa.Array:
    """The binary image column from (K, B) uint8 rows of bytes, one per True in ``good`` (N,),
    null where ``good`` is False: one Arrow array over the buffer, no per-row objects."""
    n, width = len(good), pixels.shape[1]
    if pixels.nbytes >= 2**31:  # past binary's int32 offsets: Arrow splits what it must
        rows = iter(pixels)
        return pa.array([next(rows).tobytes() if g else None for g in good], pa.binary())
    offsets = np.zeros(n + 1, np.int32)
    np.cumsum(good * width, out=offsets[1:])
    validity = pa.py_buffer(np.packbits(good, bitorder="little"))
    return pa.Array.from_buffers(pa.binary(), n, [validity, pa.py_buffer(offsets),
                                                  pa.py_buffer(pixels)], n - int(good.sum()))


def decode_batch(batch: pa.Table, root: str, size: int, resize: str, draft: bool) -> pa.Table:
    """Fetch and decode a batch of listed images; failures become rows with a reason, no image."""
    start, cpu = time.time(), time.process_time()
    blobs = fetch_batch(batch, root)
    n = len(blobs)
    pixels = np.empty((n, size * size * 3), np.uint8)  # the good images' rows, in order
    good = np.zeros(n, bool)
    widths, heights, reasons = [None] * n, [None] * n, [None] * n
    k = 0  # good images so far
    for i, data in enumerate(blobs):
        try:
            if isinstance(data, images.BadImage):
                raise data
            arr, (widths[i], heights[i]) = images.to_pixels(data, size, resize, draft)
            pixels[k] = arr.reshape(-1)
            good[i], k = True, k + 1
        except images.BadImage as e:
            reasons[i] = str(e)
    pixels = pixels[:k]
    sums, squares = np.zeros((n, 3), np.int64), np.zeros((n, 3), np.int64)
    sums[good], squares[good] = pixel_sums(pixels.reshape(k, size * size, 3))
    cols = {f.name: batch.column(f.name) for f in sources.FILES_SCHEMA}
    cols[schema.IMAGE] = image_array(pixels, good)
    cols[schema.ORIG_WIDTH] = pa.array(widths, pa.int32())
    cols[schema.ORIG_HEIGHT] = pa.array(heights, pa.int32())
    cols[schema.REASON] = pa.array(reasons, pa.string())
    cols[PX_SUM] = pa.FixedSizeListArray.from_arrays(sums.ravel(), 3)
    cols[PX_SUMSQ] = pa.FixedSizeListArray.from_arrays(squares.ravel(), 3)
    cpu_s = np.zeros(n)
    cpu_s[:1] = time.process_time() - cpu
    cols[DECODE_START] = pa.array(np.full(n, start))
    cols[DECODE_END] = pa.array(np.full(n, time.time()))
    cols[DECODE_CPU] = pa.array(cpu_s)
    return pa.table([cols[f.name] for f in DECODED_SCHEMA], names=DECODED_SCHEMA.names)


def decode_counted(batch: pa.Table, counter, **kwargs) -> pa.Table:
    """decode_batch, then add the batch's files to the driver's progress (common/progress.py)."""
    out = decode_batch(batch, **kwargs)
    counter.add.remote(out.num_rows)
    return out


def _check(cfg: Settings) -> None:
    """Fail fast, before Ray starts, on settings and outputs that cannot work."""
    unknown = set(cfg.splits) - set(schema.SPLITS)
    if unknown or not cfg.splits:
        raise ConfigError(f"--splits must name some of {','.join(schema.SPLITS)}, got {cfg.splits}")
    if not 1 <= cfg.size <= 1024:
        raise ConfigError(f"--size must be between 1 and 1024 pixels, got {cfg.size}")
    if cfg.file_size_mb < 1 or cfg.images_per_task < 1:
        raise ConfigError("--file-size-mb and --images-per-task must be positive")
    if cfg.limit_per_class is not None and cfg.limit_per_class < 1:
        raise ConfigError(f"--limit-per-class must be positive, got {cfg.limit_per_class}")


# Settings that do not change the dataset's rows: a rerun with other values is the same ingest.
NOT_DEFINING = {"output", "overwrite", "images_per_task", "file_size_mb"}


def output(cfg: Settings) -> lifecycle.Output:
    """The ingest output's lifecycle: what it owns, reads and is identified by."""
    return lifecycle.Output(
        cfg.output, "ingest", owns=(*schema.SPLITS, schema.QUARANTINE_DIR),
        inputs={"source": cfg.source},
        identity={"inputs": {"source": lifecycle.absolute(cfg.source)},
                  "settings": {k: v for k, v in asdict(cfg).items() if k not in NOT_DEFINING}})


def _ingest_split(cfg: Settings, listing: sources.Listing, split: str) -> list[dict]:
    """Decode and write one split with Ray Data; returns the write tasks' results."""
    import ray

    from pipelines.sink import ImagesDatasink

    table = listing.files[split]
    if table.num_rows == 0:
        return []
    # take() copies, so each block carries its own rows and not the whole listing's buffers.
    # from_blocks, not from_arrow: from_arrow runs a remote task per block (2,600 on ImageNet)
    # for its metadata and waits for them all before the pipeline starts; in a fresh Ray they
    # wait for workers to start and import Ray Data (1,000 images, two runs each on a loaded
    # 2-core machine: 4.6 and 8.1 s from the split's start to its end, against 10.8 and 10.8 s;
    # on 100 images, one block, the difference was lost in the load's noise).
    blocks = [
        table.take(pa.array(range(i, min(i + cfg.images_per_task, table.num_rows))))
        for i in range(0, table.num_rows, cfg.images_per_task)
    ]
    row_bytes = cfg.size * cfg.size * 3
    sink = ImagesDatasink(cfg.output, split, max(1, cfg.file_size_mb * 2**20 // row_bytes),
                          cfg.size)
    ctx = ray.data.DataContext.get_current()
    reserve = ctx.op_resource_reservation_enabled
    # Reservation splits the CPUs evenly between decode and write; the writers need little, so
    # it left the decoders a fraction of the machine (measured: 1.5x slower on 2 CPUs).
    ctx.op_resource_reservation_enabled = False
    try:
        with progress.watch(log, split, table.num_rows, "images") as counter:
            ray.data.from_blocks(blocks).map_batches(
                decode_counted,
                batch_size=None,
                batch_format="pyarrow",
                fn_kwargs={"root": listing.root, "size": cfg.size, "resize": cfg.resize,
                           "draft": cfg.draft, "counter": counter},
            ).write_datasink(sink, ray_remote_args={"num_cpus": WRITE_CPUS})
    finally:
        ctx.op_resource_reservation_enabled = reserve
    return sink.results


def _decode_timings(split: str, results: list[dict]) -> dict:
    """The decode phase of a split from the write tasks' results: from the first batch's start to
    the last one's end (wall seconds) and the decode tasks' CPU seconds."""
    starts = [r["decode_start"] for r in results if r["decode_start"] is not None]
    if not starts:
        return {}
    span = max(r["decode_end"] for r in results if r["decode_end"] is not None) - min(starts)
    return {f"{split}_decode_s": round(span, 3),
            f"{split}_decode_cpu_s": round(sum(r["decode_cpu_s"] for r in results), 3)}


def _write_quarantine(output: str, rows: list[dict]) -> dict:
    rows = sorted(rows, key=lambda r: (r[schema.SPLIT], r[schema.SOURCE]))
    table = pa.Table.from_pylist(rows, schema=schema.QUARANTINE_SCHEMA)
    rel = f"{schema.QUARANTINE_DIR}/part-00000.parquet"
    fs, path = storage.filesystem(storage.join(output, rel))
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(table, path, filesystem=fs)
    return {"path": rel, "rows": table.num_rows, "bytes": fs.get_file_info(path).size}


def _pixel_stats(results: list[dict], size: int) -> tuple[list[float] | None, list[float] | None]:
    """Per-channel mean and std (pixels in 0..255) from the write tasks' exact integer sums."""
    n = sum(r["rows"] for r in results) * size * size
    if n == 0:
        return None, None
    mean = np.sum([r["sum"] for r in results], axis=0, dtype=np.float64) / n
    mean_sq = np.sum([r["sumsq"] for r in results], axis=0, dtype=np.float64) / n
    std = np.sqrt(np.maximum(mean_sq - mean**2, 0.0))
    return [round(float(v), 4) for v in mean], [round(float(v), 4) for v in std]


def run(cfg: Settings) -> dict:
    """Ingest ``cfg.source`` into ``cfg.output``; returns the manifest that was written."""
    t0 = time.perf_counter()
    _check(cfg)
    out = output(cfg)
    out.check(cfg.overwrite, resumable=False)  # before listing: refuse early, write nothing
    listing = sources.scan(cfg.source, cfg.splits, cfg.limit_per_class)
    timings = {"list_s": round(time.perf_counter() - t0, 3)}
    for split in cfg.splits:
        log.info("%s: %d files to decode, %d quarantined while listing", split,
                 listing.files[split].num_rows,
                 sum(q[schema.SPLIT] == split for q in listing.quarantine))
    out.prepare(cfg.overwrite, resumable=False)
    t = time.perf_counter()
    cli.connect_ray(dashboard=False)  # a short job: its start-up is part of the wait
    timings["ray_s"] = round(time.perf_counter() - t, 3)

    results, files, counts, quarantine = {}, [], {}, list(listing.quarantine)
    for split in cfg.splits:
        t = time.perf_counter()
        results[split] = _ingest_split(cfg, listing, split)
        timings[f"{split}_s"] = round(time.perf_counter() - t, 3)
        timings.update(_decode_timings(split, results[split]))
        for r in results[split]:
            quarantine.extend(r["quarantine"])
            if r["file"]:
                files.append({"path": r["file"], "rows": r["rows"], "bytes": r["bytes"]})
        written = sum(r["rows"] for r in results[split])
        bad = sum(q[schema.SPLIT] == split for q in quarantine)
        seen = listing.files[split].num_rows + sum(
            q[schema.SPLIT] == split for q in listing.quarantine)
        if written + bad != seen:  # a lost or doubled row is a bug, never an output
            raise RuntimeError(f"{split}: {seen} listed, {written} written + {bad} quarantined")
        counts[split] = {"seen": seen, "written": written, "quarantined": bad}
        log.info("%s: %d written, %d quarantined in %.1f s (%.0f images/s)", split, written, bad,
                 timings[f"{split}_s"], seen / max(timings[f"{split}_s"], 1e-9))
    files.append(_write_quarantine(cfg.output, quarantine))
    mean, std = _pixel_stats(results.get("train", []), cfg.size)
    timings["total_s"] = round(time.perf_counter() - t0, 3)
    manifest = {
        schema.M_KIND: "ingest",
        schema.M_SOURCE: lifecycle.absolute(cfg.source),
        schema.M_CLASSES: listing.classes,
        schema.M_CLASS_NAMES: listing.class_names,
        schema.M_IMAGE_SHAPE: [cfg.size, cfg.size, 3],
        schema.M_COUNTS: counts,
        schema.M_PIXEL_MEAN: mean,
        schema.M_PIXEL_STD: std,
        schema.M_RESIZE: {"mode": cfg.resize, "filter": "box", "draft": cfg.draft,
                          **({"draft_margin": images.DRAFT_MARGIN,
                              "draft_filter": images.DRAFT_FILTER.name.lower()}
                             if cfg.draft else {})},
        schema.M_FILES: files,
        **schema.stamp(asdict(cfg), timings),
    }
    manifest = out.finish(manifest)
    log.info("wrote %s (%d files) in %.1f s", cfg.output, len(files), timings["total_s"])
    return manifest


def main(argv=None) -> None:
    cli.main(Settings, run, argv, __doc__)


if __name__ == "__main__":
    main()
