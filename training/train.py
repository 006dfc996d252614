"""Train the linear softmax classifier on an ingested dataset with Ray Train (data-parallel DDP).

    python -m training.train --data out/imagenet64 --output out/model
    ray job submit --working-dir . -- python -m training.train \\
        --data s3://bucket/imagenet64 --output s3://bucket/model --num-workers 4 --use-gpu

One ``nn.Linear(D, C)`` on the pixels normalized with the ingest manifest's per-channel mean and
std; loss = cross-entropy + 0.5 * reg * ||W||^2 (training/softmax.py). Workers are a TorchTrainer
(DDP over gloo on CPU, NCCL on GPU). Rows stream from the Parquet files through Ray Data every
epoch: Ray Data shuffles the training split with a fixed seed (ingest writes its files in class
order; ``--shuffle local`` skips this) and each worker's buffer reshuffles it with a per-epoch
seed. With ``--cache`` (the default on GPU) each worker instead reads its shard once into device
memory, when it fits, and draws a fresh permutation every epoch.

Writes, under --output: ``checkpoints/epoch-NNNN/model.pt`` (one per epoch: a Ray Train run whose
storage_path is --output), ``weights.npz`` (normalization folded in: scores = x @ W.T + b on raw
0..255 HWC pixels), ``metrics.json``, ``templates.png`` and, last, ``manifest.json``. A worker that
dies is replaced and training resumes from the latest checkpoint (--max-failures); rerunning an
unfinished run with the same --output resumes it too. Same seed, data and number of workers give
the same weights on CPU.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import ray
import ray.train
import ray.train.torch
import torch
from ray.data.collate_fn import ArrowBatchCollateFn

from common import cli, dataset, schema, storage
from common.errors import ConfigError
from training import batches, epochs, softmax, weights

log = logging.getLogger(__name__)

DEFAULT_LR = {"sgd": 3e-3, "adam": 3e-4}  # measured on photos, digits and the sample: README
FILL_BATCH = 4096  # rows per batch while reading a shard into the cache
SETTINGS_FILE = "settings.json"  # in checkpoints/: what an unfinished run was started with
# Settings that may change when an unfinished run is resumed: they do not change the model.
RESUMABLE = {"output", "num_workers", "use_gpu", "cpus_per_worker", "threads", "cache",
             "max_failures", "fail_at_epoch", "overwrite"}


# The defaults follow cs231n's linear-classifier practice (normalized pixels, tiny init, SGD with
# Nesterov momentum 0.9) plus a cosine decay, and were checked on real photographs, digits and the
# generated sample (benchmarks/train_defaults.py): lr 3e-3 is the fastest stable rate there,
# reg 0.1 costs no accuracy yet bounds ||W||, init std 1e-3 starts within 0.05 of ln(C).
@dataclass(frozen=True)
class Settings:
    data: str = field(metadata={"help": "ingest output to train on: local path or s3://"})
    output: str = field(metadata={"help": "where to write the model: local path or s3://"})
    epochs: int = field(default=10, metadata={"help": "passes over the training split"})
    batch_size: int = field(default=256, metadata={"help": "global batch, split across workers"})
    lr: float | None = field(default=None, metadata={
        "help": "peak learning rate, decayed by --schedule (default: 3e-3 sgd, 3e-4 adam)"})
    reg: float = field(default=0.1, metadata={"help": "L2 strength: loss += 0.5 * reg * ||W||^2"})
    optimizer: str = field(default="sgd", metadata={
        "help": "sgd: Nesterov momentum; adam", "choices": ("sgd", "adam")})
    momentum: float = field(default=0.9, metadata={"help": "momentum of sgd"})
    schedule: str = field(default="cosine", metadata={
        "help": "learning rate over the run", "choices": ("cosine", "constant")})
    init_std: float = field(default=1e-3, metadata={
        "help": "std of the initial weights: small, so the first loss is near ln(C)"})
    seed: int = field(default=0, metadata={"help": "initial weights and shuffling"})
    num_workers: int = field(default=1, metadata={"help": "Ray Train workers (DDP ranks)"})
    use_gpu: bool = field(default=False, metadata={"help": "one GPU per worker, NCCL"})
    cpus_per_worker: float = field(default=1.0, metadata={"help": "CPUs each worker reserves"})
    threads: int | None = field(default=None, metadata={
        "help": "torch threads per worker on CPU (default: its reserved CPUs, at least 1)"})
    cache: bool | None = field(default=None, metadata={
        "help": "hold each worker's shard in memory when it fits (default: on GPU only)"})
    shuffle: str = field(default="global", metadata={
        "help": "global: Ray Data shuffles the whole split (seeded) before each epoch, as "
                "ingest writes its files in class order; local: only each worker's buffer "
                "(reading overlaps training: for pre-shuffled data)",
        "choices": ("global", "local")})
    shuffle_buffer: int = field(default=4096, metadata={
        "help": "rows in each worker's shuffle buffer, reshuffled every epoch when streaming"})
    max_failures: int = field(default=3, metadata={
        "help": "worker failures to recover from, each from the latest checkpoint"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing model"})
    fail_at_epoch: int | None = field(default=None, metadata={
        "help": "testing only: rank 0 raises midway through this epoch (>= 2) of a fresh run"})

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]


# --- on each worker ----------------------------------------------------------------------------


class _Collate(ArrowBatchCollateFn):
    """Arrow batch -> (pixels (N, D) uint8, labels (N,) int64); Ray moves them to the device."""

    def __init__(self, D: int):
        super().__init__()
        self.D = D

    def __call__(self, batch: pa.Table) -> tuple[torch.Tensor, torch.Tensor]:
        X = batches.pixels(batch.column(schema.IMAGE), self.D)
        if not X.flags.writeable:  # a view of Arrow's buffer: torch wants memory it may own
            X = X.copy()
        y = batch.column(schema.LABEL).to_numpy().astype(np.int64)
        return torch.from_numpy(X), torch.from_numpy(y)


class _Split:
    """One worker's rows of a split: streamed through Ray Data each epoch, or cached once."""

    def __init__(self, it, D: int, batch_size: int, shuffle_buffer: int):
        self.it, self.D, self.batch_size, self.buffer = it, D, batch_size, shuffle_buffer
        self.cache: batches.Cache | None = None

    def stream(self, seed: int | None):
        shuffle = seed is not None and self.buffer > 0
        return self.it.iter_torch_batches(
            batch_size=self.batch_size, collate_fn=_Collate(self.D), prefetch_batches=2,
            local_shuffle_buffer_size=max(self.buffer, self.batch_size) if shuffle else None,
            local_shuffle_seed=seed if shuffle else None)

    def fill_cache(self, rows: int, device: torch.device) -> int:
        """Read the shard once into device memory, in large batches."""
        self.cache = batches.Cache.allocate(rows, self.D, device)
        for X, y in self.it.iter_torch_batches(batch_size=FILL_BATCH, collate_fn=_Collate(self.D),
                                               prefetch_batches=2):
            self.cache.append(X, y)
        return self.cache.n

    def batches(self, seed: int | None):
        if self.cache is not None:
            return self.cache.batches(self.batch_size, seed)
        return self.stream(seed)


def _all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        reduce_op = {"sum": torch.distributed.ReduceOp.SUM, "min": torch.distributed.ReduceOp.MIN}
        torch.distributed.all_reduce(t, op=reduce_op[op])
    return t


def _use_cache(cfg: Settings, split: _Split, rows: int, device: torch.device, collective: bool
               ) -> bool:
    """Cache when asked (default: on GPU) and the shard fits on every rank; then fill it."""
    want = cfg.cache if cfg.cache is not None else device.type == "cuda"
    if not want:
        return False
    fits = torch.tensor([int(batches.fits(rows * (split.D + 8), device))], device=device)
    if collective:
        _all_reduce(fits, "min")
    if not fits.item():
        log.warning("shard of %d rows does not fit in %s memory: streaming instead", rows, device)
        return False
    n = torch.tensor([split.fill_cache(rows, device)], device=device)
    if collective:  # every rank must run the same number of steps
        split.cache.truncate(int(_all_reduce(n, "min").item()))
    return True


def _restore(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """The latest checkpoint's state loaded into model and optimizer, or a fresh state."""
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return {"epoch": 0, "history": [], "initial_loss": None, "resumed_after": []}
    with ckpt.filesystem.open_input_stream(f"{ckpt.path}/{schema.CHECKPOINT_FILE}") as f:
        state = weights.read_checkpoint(f.read())
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    log.info("resuming after epoch %d from %s", state["epoch"], ckpt.path)
    # a record of every recovery, kept in later checkpoints and in metrics.json
    return {**state, "resumed_after": [*state.get("resumed_after", []), state["epoch"]]}


def _report(row: dict, state: dict, rank: int) -> None:
    """Report the epoch's metrics; rank 0 attaches the checkpoint (one folder per epoch)."""
    if rank != 0:
        ray.train.report(row)
        return
    with tempfile.TemporaryDirectory() as tmp:
        with open(f"{tmp}/{schema.CHECKPOINT_FILE}", "wb") as f:
            f.write(weights.checkpoint_bytes(state))
        ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"epoch-{row['epoch']:04d}")


def _shards(cfg: Settings, config: dict, rank: int, world: int, device: torch.device
            ) -> tuple[_Split, _Split | None, int]:
    """This worker's training shard, the whole validation split on rank 0, and the shard's rows.

    Validation runs whole on rank 0: exact metrics, whatever the number of workers.
    """
    D, local_bs = config["D"], cfg.batch_size // world
    train = _Split(ray.train.get_dataset_shard("train"), D, local_bs, cfg.shuffle_buffer)
    val = _Split(ray.train.get_dataset_shard("val"), D, local_bs, 0) if rank == 0 else None
    rows = config["train_rows"] // world  # streaming_split(equal=True) drops the remainder
    if _use_cache(cfg, train, rows, device, collective=world > 1):
        rows = train.cache.n
        if val is not None:
            _use_cache(cfg, val, config["val_rows"], device, collective=False)
    return train, val, rows


def _log_epoch(cfg: Settings, row: dict) -> None:
    log.info("epoch %d/%d: train loss %.4f top-1 %.3f | val loss %.4f top-1 %.3f top-5 %.3f | "
             "%.1f s, %.0f samples/s", row["epoch"], cfg.epochs, row["train_loss"],
             row["train_top1"], row["val_loss"], row["val_top1"], row["val_top5"],
             row["train_s"], row["samples_per_s"])


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's per-worker function: plain PyTorch plus Ray's dataset shards and report."""
    if not logging.getLogger().handlers:
        cli.setup_logging()
    cfg, D, C = Settings(**config["settings"]), config["D"], config["C"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(cfg.threads or max(1, int(cfg.cpus_per_worker)))
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls: ample for a linear model
    model = softmax.make_model(D, C, cfg.init_std, cfg.seed).to(device)
    opt = epochs.make_optimizer(cfg.optimizer, model.parameters(), cfg.peak_lr, cfg.momentum)
    state = _restore(model, opt)
    ddp = ray.train.torch.prepare_model(model)  # DDP when world > 1 (gloo on CPU, NCCL on GPU)
    shift, scale = (t.to(device) for t in softmax.channel_stats(config["mean"], config["std"], D))
    train, val, rows = _shards(cfg, config, rank, world, device)
    steps, fresh = max(1, math.ceil(rows / (cfg.batch_size // world))), state["epoch"] == 0
    for epoch in range(state["epoch"], cfg.epochs):
        t = time.perf_counter()
        fail = fresh and rank == 0 and cfg.fail_at_epoch == epoch + 1
        sums, first = epochs.train_epoch(
            model, ddp, opt, train.batches(batches.epoch_seed(cfg.seed, epoch, rank)), shift,
            scale, cfg.reg, lambda i, e=epoch: epochs.lr_at(
                cfg.peak_lr, cfg.schedule, (e + i / steps) / cfg.epochs),
            fail_at_step=steps // 2 if fail else None)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the steps run asynchronously: time them whole
        seconds = time.perf_counter() - t
        if epoch == 0 and first is not None:
            state["initial_loss"] = epochs.significant(float(first))
            if rank == 0:
                log.info("initial loss %.4f (ln C = %.4f)", state["initial_loss"], math.log(C))
        sums, t = _all_reduce(sums), time.perf_counter()
        va = epochs.evaluate(model, val.batches(None), shift, scale) if val else None
        reg_loss = 0.5 * cfg.reg * float(model.weight.detach().pow(2).sum())
        row = epochs.summarize(epoch + 1, sums, va, reg_loss, seconds)
        row["val_s"] = epochs.significant(time.perf_counter() - t)
        if rank == 0:
            _log_epoch(cfg, row)
        state["history"] = [*state["history"], row]
        state.update(epoch=epoch + 1, optimizer=opt.state_dict(), settings=config["settings"],
                     model={k: v.detach().cpu() for k, v in model.state_dict().items()})
        _report(row, state, rank)


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
    numbers = {"reg": cfg.reg, "init_std": cfg.init_std, "momentum": cfg.momentum}
    if not all(v >= 0 and math.isfinite(v) for v in numbers.values()) or cfg.momentum >= 1:
        raise ConfigError(f"--reg and --init-std must be >= 0 and --momentum in [0, 1), got "
                          f"{numbers}")
    if cfg.batch_size % cfg.num_workers:
        raise ConfigError(f"--batch-size {cfg.batch_size} must be a multiple of --num-workers "
                          f"{cfg.num_workers} (it is split evenly across them)")
    if cfg.shuffle_buffer < 0 or cfg.max_failures < -1:
        raise ConfigError("--shuffle-buffer must be >= 0 and --max-failures >= -1")
    if cfg.fail_at_epoch is not None and not 2 <= cfg.fail_at_epoch <= cfg.epochs:
        raise ConfigError(f"--fail-at-epoch must be between 2 and --epochs, got "
                          f"{cfg.fail_at_epoch}")
    manifest = dataset.open_ingest(cfg.data)
    for split in schema.SPLITS:
        dataset.split_files(cfg.data, manifest, split)
    if not manifest.get(schema.M_PIXEL_MEAN) or not manifest.get(schema.M_PIXEL_STD):
        raise ConfigError(f"{cfg.data}'s manifest has no pixel mean and std to normalize with")
    storage.check_writable(cfg.output)
    return manifest


def _model_settings(cfg: Settings) -> dict:
    return {k: v for k, v in asdict(cfg).items() if k not in RESUMABLE}


def _prepare_output(cfg: Settings) -> None:
    """Refuse to clobber a finished model or resume a different run; note this run's settings."""
    out, ckpts = cfg.output, storage.join(cfg.output, schema.CHECKPOINTS_DIR)
    if cfg.overwrite:  # the manifest goes first, so no reader trusts a half-replaced output
        storage.delete_file(storage.join(out, storage.MANIFEST))
        for name in (schema.WEIGHTS_FILE, schema.METRICS_FILE, schema.TEMPLATES_FILE):
            storage.delete_file(storage.join(out, name))
        storage.delete_dir(ckpts)
    elif storage.exists(storage.join(out, storage.MANIFEST)):
        raise ConfigError(f"{out} already holds a finished model; pass --overwrite to replace it")
    previous = storage.join(ckpts, SETTINGS_FILE)
    if storage.exists(previous):
        before, now = storage.read_json(previous), _model_settings(cfg)
        changed = sorted(k for k in now if before.get(k) != now[k])
        if changed:
            raise ConfigError(f"{out} holds an unfinished run with other settings ("
                              + ", ".join(f"{k}: {before.get(k)} -> {now[k]}" for k in changed)
                              + "); rerun with those or pass --overwrite to start again")
        log.info("%s holds an unfinished run: resuming it from its latest checkpoint", out)
    else:
        storage.write_json_atomic(previous, _model_settings(cfg))


def _datasets(cfg: Settings, manifest: dict) -> dict[str, ray.data.Dataset]:
    """Lazy Ray Data reads of both splits (image and label columns only).

    With --shuffle global the training rows are shuffled by Ray Data with a fixed seed: ingest
    writes its files in class order, and a local buffer alone would give batches of a few
    classes. The price: each epoch waits for the split to be read before its first batch.
    """
    fs, _ = storage.filesystem(cfg.data)
    out = {}
    for split in schema.SPLITS:
        uris = dataset.split_files(cfg.data, manifest, split)
        ds = ray.data.read_parquet([storage.filesystem(u)[1] for u in uris], filesystem=fs)
        ds = ds.select_columns([schema.IMAGE, schema.LABEL])
        ds.context.enable_progress_bars = False  # one line per epoch from rank 0 instead
        out[split] = ds
    if cfg.shuffle == "global":
        out["train"] = out["train"].random_shuffle(seed=cfg.seed)
    return out


def _check_cluster(cfg: Settings) -> None:
    """After connecting: the workers fit, and leave Ray Data a CPU to read with."""
    total = ray.cluster_resources()
    if cfg.use_gpu and total.get("GPU", 0) < cfg.num_workers:
        raise ConfigError(f"--use-gpu needs {cfg.num_workers} GPUs; the cluster has "
                          f"{total.get('GPU', 0):g}")
    spare = total.get("CPU", 0) - cfg.num_workers * cfg.cpus_per_worker
    if spare < 1:
        message = (f"{cfg.num_workers} workers x {cfg.cpus_per_worker:g} CPUs leave "
                   f"{max(spare, 0):g} of the cluster's {total.get('CPU', 0):g} CPUs to read data "
                   "with; lower --cpus-per-worker (and raise --threads) or --num-workers")
        if len(ray.nodes()) == 1:  # a local cluster does not grow: it would wait forever
            raise ConfigError(message)
        log.warning("%s, unless the cluster grows", message)


def build_trainer(cfg: Settings, manifest: dict) -> ray.train.torch.TorchTrainer:
    """The TorchTrainer: workers, datasets, and checkpoints under ``<output>/checkpoints``."""
    fs, path = storage.filesystem(cfg.output)
    counts = manifest[schema.M_COUNTS]
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}
    ingest_options = ray.train.DataConfig.default_ingest_options()
    ingest_options.preserve_order = True  # the same rows in the same order: reproducible runs
    return ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "settings": asdict(cfg), "D": dataset.num_features(manifest),
            "C": len(manifest[schema.M_CLASSES]), "mean": manifest[schema.M_PIXEL_MEAN],
            "std": manifest[schema.M_PIXEL_STD], "train_rows": counts["train"]["written"],
            "val_rows": counts["val"]["written"]},
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


def _final_state(result) -> dict:
    ckpt = result.checkpoint
    if ckpt is None:
        raise RuntimeError("training finished without a checkpoint")
    with ckpt.filesystem.open_input_stream(f"{ckpt.path}/{schema.CHECKPOINT_FILE}") as f:
        return weights.read_checkpoint(f.read())


def run(cfg: Settings) -> dict:
    """Train on ``cfg.data`` into ``cfg.output``; returns the manifest that was written."""
    t0 = time.perf_counter()
    data = check(cfg)
    _prepare_output(cfg)
    cli.connect_ray()
    _check_cluster(cfg)
    t = time.perf_counter()
    result = build_trainer(cfg, data).fit()
    fit_s = time.perf_counter() - t
    state = _final_state(result)
    epochs_s = sum(row["train_s"] for row in state["history"])
    timings = {"fit_s": round(fit_s, 3), "train_s": round(epochs_s, 3)}
    config = {**asdict(cfg), "lr": cfg.peak_lr}
    manifest = weights.write_model(cfg.output, data, state, config,
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
