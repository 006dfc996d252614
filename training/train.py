"""Train the linear softmax classifier on an ingested dataset with Ray Train (data-parallel DDP).

    python -m training.train --data out/imagenet64 --output out/model
    ray job submit --working-dir . -- python -m training.train \\
        --data s3://bucket/imagenet64 --output s3://bucket/model --num-workers 4 --use-gpu

One linear layer (D pixel values in, C class scores out) on the pixels normalized with the ingest
manifest's per-channel mean and std; loss = cross-entropy + 0.5 * reg * ||W||^2; with
--robust-eps E the cross-entropy is its certified worst case over every image within E pixel
levels (L-inf). Workers are Ray Train's TorchTrainer (DDP over gloo on CPU, NCCL on GPU). Rows
stream from the Parquet files through Ray Data every epoch: Ray Data shuffles the training split
with a fixed seed (ingest writes its files in class order; ``--shuffle local`` skips this) and
each worker's buffer reshuffles it with a per-epoch seed. With ``--cache`` (the default on GPU)
each worker instead reads its shard once into device memory, when it fits, and draws a fresh
permutation every epoch.

Writes, under --output: ``checkpoints/epoch-NNNN/model.pt`` (one per epoch, kept by Ray Train
under --output), ``weights.npz`` (normalization folded in: scores = x @ W.T + b on raw
0..255 HWC pixels), ``metrics.json``, ``templates.png`` and, last, ``manifest.json``. A worker that
dies is replaced and training resumes from the latest checkpoint (--max-failures); rerunning an
unfinished run with the same --output resumes it too. Same seed, data and number of workers give
the same weights on CPU.
"""
# The code: the loss in training/softmax.py, the workers' loop in training/worker.py.

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import asdict

from common import cli, dataset, lifecycle, progress, schema, storage
from common.errors import ConfigError, find_config_error
from training.settings import DEFAULT_LR, PATH, Settings

# Ray, torch and the worker code are imported where they are used: --help answers without them.
log = logging.getLogger(__name__)

# Settings that may change when an unfinished run is resumed: they do not change the model.
RESUMABLE = {"output", "num_workers", "use_gpu", "cpus_per_worker", "threads", "cache",
             "max_failures", "overwrite"}
# Ray Data 2.60's Parquet reader lists the files of every read (each split, each epoch) through a
# pool of footer-reading actors, 32 by default: 32 worker processes started per listing. One actor
# reads 128 footers at a time, enough for ImageNet's few hundred files, while starting 32
# processes per listing costs a small node seconds of every epoch.
FOOTER_READERS = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1"
# What the job writes under --output besides manifest.json (what --overwrite may remove).
OWNS = (schema.WEIGHTS_FILE, schema.METRICS_FILE, schema.TEMPLATES_FILE, schema.CHECKPOINTS_DIR)


# --- on the driver -----------------------------------------------------------------------------


def check(cfg: Settings) -> dict:
    """Fail fast, before Ray starts; returns the ingest manifest."""
    if (cfg.optimizer not in DEFAULT_LR or cfg.schedule not in ("cosine", "constant")
            or cfg.shuffle not in ("global", "local")):
        raise ConfigError(f"unknown --optimizer {cfg.optimizer!r}, --schedule {cfg.schedule!r} "
                          f"or --shuffle {cfg.shuffle!r}")
    positive = {"epochs": cfg.epochs, "batch_size": cfg.batch_size, "num_workers": cfg.num_workers,
                "cpus_per_worker": cfg.cpus_per_worker, "lr": cfg.peak_lr,
                "threads": cfg.threads or 1}
    for name, value in positive.items():
        if not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")
    numbers = {"reg": cfg.reg, "init_std": cfg.init_std, "momentum": cfg.momentum,
               "robust_eps": cfg.robust_eps}
    if (not all(v >= 0 and math.isfinite(v) for v in numbers.values()) or cfg.momentum >= 1
            or cfg.robust_eps > 255):
        raise ConfigError(f"--reg and --init-std must be >= 0, --momentum in [0, 1) and "
                          f"--robust-eps in [0, 255], got {numbers}")
    if cfg.batch_size % cfg.num_workers:
        raise ConfigError(f"--batch-size {cfg.batch_size} must be a multiple of --num-workers "
                          f"{cfg.num_workers} (it is split evenly across them)")
    if cfg.shuffle_buffer < 0 or cfg.max_failures < -1:
        raise ConfigError("--shuffle-buffer must be >= 0 and --max-failures >= -1")
    manifest = dataset.open_ingest(cfg.data, splits=schema.SPLITS)
    if not manifest.get(schema.M_PIXEL_MEAN) or not manifest.get(schema.M_PIXEL_STD):
        raise ConfigError(f"{cfg.data}'s manifest has no pixel mean and std to normalize with")
    return manifest


def output(cfg: Settings) -> lifecycle.Output:
    """The model output's lifecycle: it owns its files and checkpoints, reads --data, and is
    identified by the data's manifest and the settings that change the model."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in RESUMABLE | {"data"}}
    return lifecycle.Output(cfg.output, "train", owns=OWNS, inputs={"data": cfg.data},
                            identity={"inputs": {"data": lifecycle.input_identity(cfg.data)},
                                      "settings": settings})


def _datasets(cfg: Settings, manifest: dict) -> dict:
    """Lazy Ray Data reads of both splits (image, label, and what names a row: id and file).

    With --shuffle global the training rows are shuffled by Ray Data with a fixed seed: ingest
    writes its files in class order, and a local buffer alone would give batches of a few
    classes. The price: each epoch waits for the split to be read before its first batch.
    """
    import ray

    fs, _ = storage.filesystem(cfg.data)
    out = {}
    for split in schema.SPLITS:
        uris = dataset.split_files(cfg.data, manifest, split)
        with _env_default(*FOOTER_READERS):  # read when the reader is made, here
            ds = ray.data.read_parquet([storage.filesystem(u)[1] for u in uris], filesystem=fs,
                                       include_paths=True)
        # ids and file paths ride along so that a bad row can be named where it is decoded
        ds = ds.select_columns([schema.IMAGE, schema.LABEL, schema.IMAGE_ID, PATH])
        ds.context.enable_progress_bars = False  # one line per epoch from rank 0 instead
        out[split] = ds
    if cfg.shuffle == "global":
        out["train"] = out["train"].random_shuffle(seed=cfg.seed)
    return out


@contextlib.contextmanager
def _env_default(name: str, value: str):
    """The environment variable ``name`` set to ``value`` for a while, unless the user set it."""
    if name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        del os.environ[name]


def _connect(cfg: Settings) -> None:
    """Ray, once the output passed its checks; the workers fit, and leave Ray Data a CPU to read
    with."""
    import ray

    cli.connect_ray()
    total = ray.cluster_resources()
    if cfg.use_gpu and total.get("GPU", 0) < cfg.num_workers:
        raise ConfigError(f"--use-gpu needs {cfg.num_workers} GPU"
                          f"{'s' if cfg.num_workers > 1 else ''}, one per worker; the cluster "
                          f"has {total.get('GPU', 0):g}")
    spare = total.get("CPU", 0) - cfg.num_workers * cfg.cpus_per_worker
    if spare < 1:
        message = (f"{cfg.num_workers} workers x {cfg.cpus_per_worker:g} CPUs leave "
                   f"{max(spare, 0):g} of the cluster's {total.get('CPU', 0):g} CPUs to read data "
                   "with; lower --cpus-per-worker (and raise --threads) or --num-workers")
        if len(ray.nodes()) == 1:  # a local cluster does not grow: it would wait forever
            raise ConfigError(message)
        log.warning("%s, unless the cluster grows", message)


def build_trainer(cfg: Settings, manifest: dict, fail_at_epoch: int | None = None,
                  counter=None):
    """The TorchTrainer: workers, datasets, and checkpoints under ``<output>/checkpoints``.

    ``counter``: the progress actor the workers report samples and epoch lines to.
    ``fail_at_epoch`` (tests only): rank 0 raises midway through that epoch of a fresh run.
    """
    import ray.data
    import ray.train
    import ray.train.torch

    from training.worker import train_loop_per_worker

    fs, path = storage.filesystem(cfg.output)
    counts = manifest[schema.M_COUNTS]
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}
    # the same rows in the same order: reproducible runs. (Built here rather than from
    # DataConfig.default_ingest_options(), which warns that a field it copies is deprecated.)
    ingest_options = ray.data.ExecutionOptions(preserve_order=True, verbose_progress=False)
    return ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "settings": asdict(cfg), "D": dataset.num_features(manifest),
            "C": len(manifest[schema.M_CLASSES]), "mean": manifest[schema.M_PIXEL_MEAN],
            "std": manifest[schema.M_PIXEL_STD], "train_rows": counts["train"]["written"],
            "val_rows": counts["val"]["written"], "fail_at_epoch": fail_at_epoch,
            "progress": counter},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=schema.CHECKPOINTS_DIR, storage_path=path,
            storage_filesystem=fs if storage.is_s3(cfg.output) else None,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures)),
        datasets=_datasets(cfg, manifest),
        # validation is not split: it runs whole on rank 0 (see _shards)
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"],
                                            execution_options=ingest_options,
                                            enable_shard_locality=False),
    )


def _final_state(cfg: Settings, result) -> dict:
    """The last checkpoint's state; a run that stopped early diverged (training/worker.py)."""
    from training import weights
    state = None
    if result.checkpoint is not None:
        ckpt = result.checkpoint
        with ckpt.filesystem.open_input_stream(f"{ckpt.path}/{schema.CHECKPOINT_FILE}") as f:
            state = weights.read_checkpoint(f.read())
    done = state["epoch"] if state else 0
    if done < cfg.epochs:
        raise ConfigError(f"training diverged in epoch {done + 1}: the loss or the weights "
                          f"stopped being finite (lr {cfg.peak_lr:g}, schedule {cfg.schedule}); "
                          "lower --lr. No model was written")
    return state


def _fit(cfg: Settings, data: dict, fail_at_epoch: int | None):
    """Run the trainer, showing samples trained; a bad-data error raised in a worker comes back
    as its one line."""
    import ray.train

    samples = cfg.epochs * data[schema.M_COUNTS]["train"]["written"]
    try:
        with progress.watch(log, "train", samples, "samples") as counter:
            return build_trainer(cfg, data, fail_at_epoch, counter).fit()
    except ray.train.TrainingFailedError as e:
        cause = find_config_error(e)
        if cause is None:
            raise
        raise cause from None


def run(cfg: Settings, *, fail_at_epoch: int | None = None) -> dict:
    """Train on ``cfg.data`` into ``cfg.output``; returns the manifest that was written.

    ``fail_at_epoch`` (tests only): inject a worker failure midway through that epoch.
    """
    from training import weights
    t0 = time.perf_counter()
    data = check(cfg)
    out = output(cfg)
    out.prepare(cfg.overwrite, ready=lambda: _connect(cfg))
    t = time.perf_counter()
    result = _fit(cfg, data, fail_at_epoch)
    fit_s = time.perf_counter() - t
    state = _final_state(cfg, result)
    epochs_s = sum(row["train_s"] for row in state["history"])
    timings = {"fit_s": round(fit_s, 3), "train_s": round(epochs_s, 3)}
    config = {**asdict(cfg), "lr": cfg.peak_lr, "data": lifecycle.absolute(cfg.data),
              "output": lifecycle.absolute(cfg.output)}
    manifest = weights.write_model(out, data, state, config,
                                   {**timings, "total_s": round(time.perf_counter() - t0, 3)})
    final = manifest[schema.M_FINAL]
    log.info("val top-1 %.1f%%, top-5 %.1f%% (chance %.1f%%) after %d epochs, in %.1f s; "
             "templates: %s", 100 * final["val_top1"], 100 * final["val_top5"],
             100 / len(data[schema.M_CLASSES]), final["epoch"],
             manifest[schema.M_TIMINGS]["total_s"], storage.join(cfg.output, schema.TEMPLATES_FILE))
    return manifest


def main(argv=None) -> None:
    cli.main(Settings, run, argv, __doc__)


if __name__ == "__main__":
    main()
