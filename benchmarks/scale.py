"""An ImageNet-size rehearsal on one machine, through the real jobs.

    python -m benchmarks.scale                   # ImageNet's size: 28 GB, 75 minutes
    python -m benchmarks.scale --train-rows 128000 --val-rows 5000 --classes 1000 \\
        --attack-images 100 --pairs-rows 5000000 --object-store-mb 600 \\
        --json scale.json                        # a tenth of it, 16 min
    python -m benchmarks.scale --train-rows 2000 --val-rows 200 --classes 10 \\
        --attack-images 20 --pairs-rows 2000     # tests/test_scale.py's, about a minute

In one run, in a work folder (--work, else a temporary one removed at the end unless --keep):
1. synthetic data of ImageNet's shape written as the ingest writes it (benchmarks/scale_data.py:
   a smooth template per class plus noise, 64x64x3 uint8, learnable);
2. ``training.train`` for one epoch with its defaults (streaming, global shuffle), in this
   process on a local Ray of --cpus CPUs, its processes' RSS sampled (Ray's included) and what
   Ray's object store spilled read from Ray; then the plain PyTorch loop of benchmarks/train.py
   on the same rows (at most --plain-rows of them, in memory), with every CPU's thread;
3. ``attacks.fool`` with its defaults on the first --attack-images validation images x every
   target (the slice); each method's pairs per second from its parts' markers;
4. an attack output of --pairs-rows rows per method built from the slice's rows under further
   images' ids, in the attack's layout, with its summary tables (benchmarks/scale_pairs.py, a
   subprocess);
5. ``attacks.summary``, ``python -m report``, ``attacks.transfer`` (the trained model) and
   ``report.show`` (the last image, the last target) as subprocesses, each timed with its own
   peak RSS, on the built output and on the slice (the two sizes show how time grows with rows).
Prints the figures beside the goals (benchmarks/scale_goals.py) and a linear projection to
ImageNet's size; --json PATH writes them. Refuses, before writing, a run the disk cannot hold.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from attacks import fool, parts
from benchmarks import scale_data, scale_goals, scale_watch
from benchmarks.scale_pairs import kept
from benchmarks.train import plain
from common import cli, dataset, schema, storage
from common.errors import ConfigError
from training import train

ATTACK = fool.Settings(data="", model="", output="")  # the attack's defaults
METHODS = ATTACK.methods
PLAIN_WARMUP = 256 * 8  # rows benchmarks/train.py's plain() takes for its warm-up


@dataclass(frozen=True)
class Settings:
    train_rows: int = field(default=1_281_167, metadata={"help": "training images"})
    val_rows: int = field(default=50_000, metadata={"help": "validation images"})
    classes: int = field(default=1000, metadata={"help": "classes (every one a target)"})
    attack_images: int = field(default=200, metadata={
        "help": "validation images attacked for real, x every target"})
    pairs_rows: int = field(default=50_000 * 1000, metadata={
        "help": "rows per method of the built attack output (images x classes)"})
    plain_rows: int = field(default=262_144, metadata={
        "help": "at most this many rows for the plain loop, held in memory (3.2 GB)"})
    cpus: int = field(default=2, metadata={"help": "CPUs of the local Ray"})
    object_store_mb: int | None = field(default=None, metadata={
        "help": "the local Ray's object store, MiB (default: Ray's, 30%% of free memory); a "
                "smaller run with a store as much smaller puts the same pressure on it"})
    work: str | None = field(default=None, metadata={
        "help": "folder for every output (default: a temporary one)"})
    keep: bool = field(default=False, metadata={"help": "keep the temporary folder"})
    json: str | None = field(default=None, metadata={"help": "write the figures here"})


class Paths:
    """Where each output of the rehearsal goes, under the work folder."""

    def __init__(self, work: str):
        self.work = work
        self.data, self.model, self.slice, self.pairs = (
            os.path.join(work, name) for name in ("data", "model", "slice", "pairs"))


def check(cfg: Settings, work: str) -> None:
    """Sizes that fit together, and a disk that holds what the run writes."""
    if min(cfg.train_rows, cfg.val_rows, cfg.attack_images, cfg.plain_rows, cfg.cpus) < 1:
        raise ConfigError("every row count and --cpus must be positive")
    if cfg.attack_images > cfg.val_rows or cfg.pairs_rows > cfg.val_rows * cfg.classes:
        raise ConfigError(f"--attack-images and --pairs-rows / --classes must be at most "
                          f"--val-rows ({cfg.val_rows})")
    if cfg.pairs_rows % cfg.classes or cfg.pairs_rows < cfg.attack_images * cfg.classes:
        raise ConfigError("--pairs-rows must be a multiple of --classes, at least "
                          "--attack-images x --classes")
    need = (cfg.train_rows + cfg.val_rows) * scale_data.D + len(METHODS) * sum(
        n * cfg.classes * pair_bytes(asdict(ATTACK), n)
        for n in (cfg.attack_images, cfg.pairs_rows // cfg.classes))
    free = shutil.disk_usage(work).free
    if need * 1.05 > free:
        raise ConfigError(f"the run writes about {need / 1e9:,.1f} GB (the attack's "
                          f"--keep-images {ATTACK.keep_images}); {work} has "
                          f"{free / 1e9:,.1f} GB free")


def pair_bytes(settings: dict, images: int) -> float:
    """The mean bytes of a stored pair of an attack on ``images`` images with ``settings``."""
    share = kept(settings, np.arange(images)).mean()
    return fool.ROW_OVERHEAD + share * scale_data.D


def train_job(cfg: Settings, p: Paths) -> dict:
    """One epoch of training.train with its defaults, in this process on the running Ray."""
    before = scale_watch.spilled_mb()
    with scale_watch.Peak(os.getpid()) as peak:
        t = time.perf_counter()
        m = train.run(train.Settings(data=p.data, output=p.model, epochs=1, overwrite=True))
        wall = time.perf_counter() - t
    epoch = storage.read_json(os.path.join(p.model, schema.METRICS_FILE))["history"][-1]
    return {"train_samples_per_s": round(epoch["samples_per_s"], 1),
            "train_wall_s": round(wall, 1), "train_epoch_s": round(epoch["train_s"], 1),
            "train_peak_rss_mb": round(peak.max_rss_mb, 1), "train_peak_process": peak.process,
            "train_peak_private_mb": round(peak.max_private_mb, 1),
            "train_total_rss_mb": round(peak.total_mb, 1),
            "object_store_spilled_mb": round(scale_watch.spilled_mb() - before, 1),
            "train_val_top1": m[schema.M_FINAL]["val_top1"]}


def attack_slice(cfg: Settings, p: Paths) -> dict:
    """attacks.fool with its defaults on the first images; each method's pairs per second with
    the job's workers, from the seconds its parts took (markers) over the workers."""
    import ray

    with scale_watch.Peak(os.getpid()) as peak:
        m = fool.run(fool.Settings(data=p.data, model=p.model, output=p.slice,
                                   limit_images=cfg.attack_images, overwrite=True))
    workers = int(ray.cluster_resources().get("CPU", 1))
    markers = parts.read_markers(p.slice, parts.done_keys(p.slice))
    rates = {}
    for method in m[schema.M_COUNTS]["methods"]:
        mine = [mk for mk in markers if mk.key.startswith(method + "/")]
        rates[method] = round(sum(mk.rows for mk in mine) * workers
                              / sum(mk.seconds for mk in mine), 1)
    return {"attack_s": m[schema.M_TIMINGS]["total_s"], "attack_pairs_per_s": rates,
            "attack_peak_rss_mb": round(peak.max_rss_mb, 1), "attack_workers": workers}


def plain_loop(cfg: Settings, p: Paths) -> dict:
    """benchmarks/train.py's plain loop on the first rows of the training split, in memory."""
    rows = min(cfg.train_rows, cfg.plain_rows)
    m = dataset.open_ingest(p.data)
    X, y, at = np.empty((rows, scale_data.D), np.uint8), np.empty(rows, np.int64), 0
    for t in dataset.read_rows(dataset.split_files(p.data, m, "train"),
                               dataset.split_counts(m, "train"), 0, rows, 8192, scale_data.D):
        X[at:at + t.num_rows] = dataset.pixels(t.column(schema.IMAGE), scale_data.D)
        y[at:at + t.num_rows] = t.column(schema.LABEL).to_numpy()
        at += t.num_rows
    if rows < PLAIN_WARMUP:  # plain() warms up on its first PLAIN_WARMUP rows: repeat a few
        X, y = np.resize(X, (PLAIN_WARMUP, scale_data.D)), np.resize(y, PLAIN_WARMUP)
    t = time.perf_counter()
    rate = plain(torch.from_numpy(X), torch.from_numpy(y), cfg.classes, "cpu", cfg.cpus)
    return {"plain_samples_per_s": round(rate, 1), "plain_rows": rows,
            "plain_s": round(time.perf_counter() - t, 1)}


def build_pairs(cfg: Settings, p: Paths) -> dict:
    """The built output, in a subprocess of its own (its time and memory)."""
    r = scale_watch.timed([sys.executable, "-m", "benchmarks.scale_pairs", "--slice", p.slice,
                           "--output", p.pairs, "--pairs-rows", str(cfg.pairs_rows)])
    built = json.loads(r["stdout"].strip().splitlines()[-1])
    settings = storage.read_json(os.path.join(p.pairs, storage.MANIFEST))[schema.M_IDENTITY][
        "settings"]
    share = kept(settings, np.arange(built["images"])).mean()
    return {"build_s": r["seconds"], "build_peak_rss_mb": r["peak_rss_mb"],
            "build_write_s": built["write_s"], "summary_tables_s": built["summary_tables_s"],
            "pairs_files": built["pairs_files"], "pairs_bytes": built["pairs_bytes"],
            "pairs_bytes_per_row": bytes_per_row(p.pairs),
            "attack_keep": {k: settings.get(k) for k in ("keep_images", "sample_images")},
            "pairs_image_share": round(float(share), 6)}


def bytes_per_row(results: str) -> dict:
    """Per method, the bytes of its pairs files over their rows."""
    files = storage.read_json(os.path.join(results, storage.MANIFEST))[schema.M_FILES]
    out = {}
    for method in METHODS:
        mine = [f for f in files if f["path"].startswith(f"{schema.PAIRS_DIR}/method={method}/")]
        out[method] = round(sum(f["bytes"] for f in mine) / sum(f["rows"] for f in mine), 1)
    return out


def tools(cfg: Settings, p: Paths, results: str, tag: str, images: int) -> dict:
    """The four downstream tools on one attack output, each a subprocess; report.show draws
    the last target of the last image that stores its fooling image."""
    settings = storage.read_json(os.path.join(results, storage.MANIFEST))[schema.M_IDENTITY]
    shown = np.flatnonzero(kept(settings["settings"], np.arange(images)))
    py = [sys.executable, "-m"]
    cmds = {
        "summary": [*py, "attacks.summary", "--results", results],
        "report": [*py, "report", "--results", results, "--output", p.work + f"/report{tag}",
                   "--overwrite"],
        "transfer": [*py, "attacks.transfer", "--results", results, "--models", p.model,
                     "--output", p.work + f"/transfer{tag}", "--overwrite"],
        "show": [*py, "report.show", "--results", results, "--image-id",
                 scale_data.val_id(int(shown[-1]) if len(shown) else images - 1),
                 "--target", str(cfg.classes - 1),
                 "--output", p.work + f"/show{tag}.png"]}
    out = {}
    for name, cmd in cmds.items():
        r = scale_watch.timed(cmd)
        out.update({f"{name}_s": r["seconds"], f"{name}_peak_rss_mb": r["peak_rss_mb"],
                    f"{name}_read_mb": r["read_mb"]})
    return out


def stages(cfg: Settings, p: Paths) -> dict:
    """Every stage in order; the figures and each stage's seconds."""
    import ray

    f, stage = {}, {}

    def timed(name: str, fn) -> None:
        t = time.perf_counter()
        f.update(fn())
        stage[name] = round(time.perf_counter() - t, 1)

    timed("data", lambda: {"data_bytes": sum(x["bytes"] for x in scale_data.write(
        scale_data.Data(p.data, cfg.train_rows, cfg.val_rows, cfg.classes,
                        overwrite=True))[schema.M_FILES])})
    ours = not ray.is_initialized()
    if ours:
        store = cfg.object_store_mb and cfg.object_store_mb * 2**20
        ray.init(num_cpus=cfg.cpus, object_store_memory=store, include_dashboard=False,
                 logging_level="WARNING", log_to_driver=False)
    f["object_store_mb"] = round(ray.cluster_resources()["object_store_memory"] / 2**20)
    cli.connect_ray()  # Ray's console lines quieted as the jobs do
    timed("train", lambda: train_job(cfg, p))
    timed("attack", lambda: attack_slice(cfg, p))
    if ours:
        ray.shutdown()  # its processes and memory, before the plain loop and the tools
    timed("plain", lambda: plain_loop(cfg, p))
    timed("build", lambda: build_pairs(cfg, p))
    timed("tools", lambda: tools(cfg, p, p.pairs, "", cfg.pairs_rows // cfg.classes))
    timed("tools_slice", lambda: {"slice": tools(cfg, p, p.slice, "-slice",
                                                 cfg.attack_images)})
    f["slice"]["pairs_bytes_per_row"] = bytes_per_row(p.slice)
    return {**f, "stage_s": stage}


def run(cfg: Settings) -> dict:
    """The rehearsal; returns (and prints, and with --json writes) its figures."""
    t0 = time.perf_counter()
    work = cfg.work or tempfile.mkdtemp(prefix="fooling-scale-")
    os.makedirs(work, exist_ok=True)
    try:
        check(cfg, work)
        figures = {"settings": asdict(cfg), **stages(cfg, Paths(work))}
        files = [os.path.join(d, n) for d, _, names in os.walk(work) for n in names]
        figures.update(files_written=len(files),
                       bytes_written=sum(os.path.getsize(f) for f in files),
                       total_s=round(time.perf_counter() - t0, 1))
        figures["projection"] = scale_goals.project(cfg, Settings(), figures)
        figures["goals"] = scale_goals.goals(figures)
    finally:
        if cfg.work is None and not cfg.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(scale_goals.describe(figures))
    if cfg.json:
        storage.write_bytes(cfg.json, json.dumps(figures, indent=1).encode())
    return figures


def main(argv=None) -> None:
    cli.main(Settings, run, argv, __doc__)


if __name__ == "__main__":
    main()
