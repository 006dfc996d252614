"""The regularization sweep of "Breaking Linear Classifiers on ImageNet", as Ray Tune trials.

    python -m training.sweep --data out/imagenet64 --output out/sweep --reg 1e-4,1e-2,0.1,1,100
    python -m training.sweep --data DATA --output OUT --reg 0.1 --robust-eps 0,2,8,16

Ray Tune runs one training (training.train, the same job and flags) per (--reg, --robust-eps)
pair of the grid, as many at once as the cluster's CPUs or GPUs allow, each into
``<output>/reg=<value>/`` (``reg=<value>_eps=<E>/`` when robust) with its own checkpoints,
weights.npz and templates.png. Then it writes ``sweep.parquet`` and ``sweep.md``: one row per
setting with the validation top-1 and top-5, the losses, the weight norms and the median sign
strength that fools it, and last ``manifest.json``. Stronger regularization gives smoother
templates and a less accurate model; so does a larger robust radius.
Rerunning on the same --output keeps the finished trainings and resumes the unfinished ones.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields

from common import cli, dataset, lifecycle, progress, schema, storage
from common.errors import ConfigError, find_config_error
from common.model import read_model
from common.sweep import TABLE, SweepRow, markdown, write_sweep
from training import train

log = logging.getLogger(__name__)

TRIAL_MEMORY = 256 * 2**20  # bytes reserved for each trial's driver process
SWEEP_IMAGES = 64  # validation images x every target: each model's median sign strength


@dataclass(frozen=True)
class Settings:
    data: str = field(metadata={"help": "ingest output to train on: local path or s3://"})
    output: str = field(metadata={"help": "where to write the models and table: local or s3://"})
    reg: tuple[float, ...] = field(default=(1e-4, 1e-2, 0.1, 1.0, 100.0), metadata={
        "help": "L2 strengths to train with, one training each (0.1: training's default)"})
    robust_eps: tuple[float, ...] = field(default=(0.0,), metadata={
        "help": "robust radii (pixel levels, training.train --robust-eps): one training per "
                "(reg, radius) pair"})
    epochs: int = field(default=10, metadata={"help": "passes over the training split"})
    batch_size: int = field(default=256, metadata={"help": "global batch of each training"})
    lr: float | None = field(default=None, metadata={
        "help": "peak learning rate (default: 3e-3 sgd, 3e-4 adam)"})
    optimizer: str = field(default="sgd", metadata={"help": "sgd or adam",
                                                     "choices": ("sgd", "adam")})
    init_std: float = field(default=1e-3, metadata={"help": "std of the initial weights"})
    seed: int = field(default=0, metadata={"help": "the same for every training"})
    num_workers: int = field(default=1, metadata={"help": "Ray Train workers per training"})
    use_gpu: bool = field(default=False, metadata={"help": "one GPU per worker"})
    cpus_per_worker: float = field(default=1.0, metadata={"help": "CPUs each worker reserves"})
    threads: int | None = field(default=None, metadata={
        "help": "torch threads per worker (default: its reserved CPUs, at least 1)"})
    cache: bool | None = field(default=None, metadata={
        "help": "hold shards in memory when they fit (default: on GPU only)"})
    max_concurrent: int | None = field(default=None, metadata={
        "help": "trainings at once (default: as many as the CPUs or GPUs allow)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing sweep"})


def trial_name(reg: float, robust_eps: float = 0.0) -> str:
    return f"reg={reg:g}" + (f"_eps={robust_eps:g}" if robust_eps else "")


def trial_output(output: str, reg: float, robust_eps: float = 0.0) -> str:
    """``<output>/reg=<value>[_eps=<E>]``: where the training with that setting writes."""
    return storage.join(output, trial_name(reg, robust_eps))


def grid(cfg: Settings) -> list[tuple[float, float]]:
    """Every (reg, robust_eps) pair to train, in the table's order."""
    return sorted((reg, eps) for reg in cfg.reg for eps in cfg.robust_eps)


def _absolute(uri: str) -> str:
    """Tune runs trials in folders of their own: local paths must not be relative."""
    return uri if "://" in uri else os.path.abspath(uri)


def train_settings(cfg: Settings, reg: float, robust_eps: float = 0.0) -> train.Settings:
    """The training job's settings for one trial."""
    shared = {f.name for f in fields(train.Settings)} & {f.name for f in fields(Settings)}
    values = {k: getattr(cfg, k) for k in shared - {"output", "overwrite", "reg", "robust_eps",
                                                     "data"}}
    return train.Settings(**values, data=_absolute(cfg.data), reg=reg, robust_eps=robust_eps,
                          output=_absolute(trial_output(cfg.output, reg, robust_eps)))


def train_one(config: dict, counter=None) -> None:
    """A Tune trial: one training (or its finished model, when rerun), reported to Tune and, as
    a line and a count, to the sweep's progress (``counter``, common/progress.py)."""
    from ray import tune

    cfg = train.Settings(**config["settings"])
    try:
        manifest = storage.read_manifest(cfg.output, "model")
    except ConfigError:
        manifest = train.run(cfg)  # resumes an unfinished training in the same folder
    final = manifest[schema.M_FINAL]
    if counter is not None:
        counter.note.remote(f"{cfg.output}: val top-1 {100 * final['val_top1']:.1f}% after "
                            f"{final['epoch']} epochs")
        counter.add.remote(1)
    tune.report({k: final[k] for k in ("val_top1", "val_top5", "val_loss", "train_loss")})


def _row(cfg: Settings, reg: float, robust_eps: float, X) -> SweepRow:
    """The table's row of one finished training, from its manifest (``final``: its metrics)."""
    out = lifecycle.absolute(trial_output(cfg.output, reg, robust_eps))
    m = storage.read_manifest(out, "model")
    final, norms = m[schema.M_FINAL], m[schema.M_WEIGHT_NORMS]
    return SweepRow(reg=reg, robust_eps=robust_eps, val_top1=final["val_top1"],
                    val_top5=final["val_top5"], val_loss=final["val_loss"],
                    train_loss=final["train_loss"], train_top1=final["train_top1"],
                    w_norm=norms["W"], w_pixels_norm=norms["W_pixels"], epochs=final["epoch"],
                    median_sign_eps=_median_sign_eps(out, X), model=out)


def _median_sign_eps(model: str, X) -> float:
    from attacks.methods.strength import median_sign_eps  # torch: imported where it is used

    m = read_model(model)
    return median_sign_eps(m.W, m.b, X)


def _val_images(data: str):
    """The first SWEEP_IMAGES validation images of the data, (N, D) uint8."""
    import pyarrow.parquet as pq

    m = dataset.open_ingest(data)
    fs, path = storage.filesystem(dataset.split_files(data, m, "val")[0])
    batch = next(pq.ParquetFile(path, filesystem=fs).iter_batches(
        SWEEP_IMAGES, columns=[schema.IMAGE_ID, schema.IMAGE]))
    return dataset.pixels(batch.column(schema.IMAGE), dataset.num_features(m),
                          batch.column(schema.IMAGE_ID), path)


def _check(cfg: Settings) -> None:
    if not cfg.reg or len(set(cfg.reg)) != len(cfg.reg):
        raise ConfigError(f"--reg must list distinct values, got {cfg.reg}")
    if not cfg.robust_eps or len(set(cfg.robust_eps)) != len(cfg.robust_eps):
        raise ConfigError(f"--robust-eps must list distinct values, got {cfg.robust_eps}")
    if cfg.max_concurrent is not None and cfg.max_concurrent < 1:
        raise ConfigError(f"--max-concurrent must be positive, got {cfg.max_concurrent}")
    if any(r < 0 or not math.isfinite(r) for r in cfg.reg):
        raise ConfigError(f"--reg values must be >= 0, got {cfg.reg}")
    for reg, eps in grid(cfg):  # every training's settings and data, before Ray starts
        train.check(train_settings(cfg, reg, eps))


def _concurrency(cfg: Settings) -> int:
    """Trainings at once: each needs its workers, and Ray Data a CPU to read with."""
    import ray

    if cfg.max_concurrent:
        return cfg.max_concurrent
    total = ray.cluster_resources()
    if cfg.use_gpu:
        return max(1, int(total.get("GPU", 0) // cfg.num_workers))
    return max(1, int((total.get("CPU", 0) - 1) // (cfg.num_workers * cfg.cpus_per_worker)))


# Ray Tune 2.60 copies these from the driver's environment into every trial actor's runtime_env
# (ray/tune/execution/class_cache.py, ENV_VARS_TO_PROPAGATE); Ray's runtime-env agent then logs
# that runtime_env, secret included, into the session folder, and the dashboard shows it. Ray
# offers no setting to turn it off. Trials need no such copy: Ray's workers get credentials
# from their node's environment or instance profile, as every other task of these jobs does.
CREDENTIAL_VARS = frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                             "AWS_SECURITY_TOKEN"})


@contextlib.contextmanager
def no_credentials_in_trials():
    """While Tune runs, leave credentials out of what it copies into the trials' runtime_env."""
    from ray.tune.execution import class_cache

    saved = class_cache.ENV_VARS_TO_PROPAGATE
    class_cache.ENV_VARS_TO_PROPAGATE = frozenset(saved) - CREDENTIAL_VARS
    try:
        yield
    finally:
        class_cache.ENV_VARS_TO_PROPAGATE = saved


def _tune(cfg: Settings) -> None:
    from ray import tune

    fs, path = storage.filesystem(_absolute(cfg.output))
    settings = [asdict(train_settings(cfg, reg, eps)) for reg, eps in grid(cfg)]
    with progress.watch(log, "sweep", len(settings), "models") as counter:
        tuner = tune.Tuner(
            # the trial only drives its TorchTrainer: no CPU of its own (Tune needs some resource)
            tune.with_resources(tune.with_parameters(train_one, counter=counter),
                                {"cpu": 0, "memory": TRIAL_MEMORY}),
            param_space={"settings": tune.grid_search(settings)},
            tune_config=tune.TuneConfig(max_concurrent_trials=_concurrency(cfg)),
            run_config=tune.RunConfig(name="tune", storage_path=path,
                                      storage_filesystem=fs if storage.is_s3(cfg.output) else None,
                                      verbose=0))
        with no_credentials_in_trials():
            results = tuner.fit()
    failed = [r.error for r in results if r.error]
    if failed:
        cause = find_config_error(failed[0])  # e.g. a training that diverged: its one line
        if cause is not None:
            raise ConfigError(f"{len(failed)} of {len(settings)} trainings failed; the first: "
                              f"{cause}")
        raise RuntimeError(f"{len(failed)} of {len(settings)} trainings failed: {failed[0]}")


def output(cfg: Settings) -> lifecycle.Output:
    """The sweep's lifecycle: it owns the trainings' folders, Tune's and the table; a rerun with
    the same settings keeps the finished trainings and resumes the others."""
    owns = ("tune", f"{TABLE}.parquet", f"{TABLE}.md",
            *(trial_name(reg, eps) for reg, eps in grid(cfg)))
    settings = {k: v for k, v in asdict(cfg).items()
                if k not in train.RESUMABLE | {"data", "max_concurrent"}}
    return lifecycle.Output(cfg.output, "sweep", owns=owns, inputs={"data": cfg.data},
                            identity={"inputs": {"data": lifecycle.input_identity(cfg.data)},
                                      "settings": settings})


def run(cfg: Settings) -> dict:
    """Train once per (--reg, --robust-eps) pair, then write the table; returns the manifest."""
    t0 = time.perf_counter()
    _check(cfg)
    out = output(cfg)
    out.prepare(cfg.overwrite)
    cli.connect_ray()
    _tune(cfg)
    X = _val_images(cfg.data)
    rows = [_row(cfg, reg, eps, X) for reg, eps in grid(cfg)]
    files = write_sweep(cfg.output, rows)
    manifest = {
        schema.M_KIND: "sweep", schema.M_DATA: lifecycle.absolute(cfg.data),
        "rows": [asdict(r) for r in rows], schema.M_FILES: files,
        **schema.stamp(asdict(cfg), {"total_s": round(time.perf_counter() - t0, 3)}),
    }
    manifest = out.finish(manifest)
    log.info("sweep of %d trainings written to %s:\n%s", len(rows), cfg.output, markdown(rows))
    return manifest


def main(argv=None) -> None:
    cli.main(Settings, run, argv, __doc__)


if __name__ == "__main__":
    main()
