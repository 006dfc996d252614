"""The per-worker half of the training job: what each Ray Train worker runs.

Plain PyTorch (training/epochs.py) fed by this worker's shard of Ray Data, or by a cache of it in
device memory, plus Ray Train's three calls: ``get_dataset_shard``, ``prepare_model``, ``report``.
Rank 0 attaches a checkpoint to every epoch's report (``checkpoints/epoch-NNNN/model.pt``) and a
restarted worker resumes from the latest. When the loss or the weights stop being finite, every
rank stops before reporting that epoch (they agree: the sums are all-reduced and DDP keeps the
weights equal), so no non-finite checkpoint is ever written; the driver names the epoch.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time

import numpy as np
import pyarrow as pa
import ray
import ray.train
import ray.train.torch
import torch
from ray.data.collate_fn import ArrowBatchCollateFn

from common import cli, dataset, progress, schema
from common.errors import ConfigError
from training import batches, epochs, softmax, weights
from training.settings import PATH, Settings

log = logging.getLogger(__name__)

FILL_BATCH = 4096  # rows per batch while reading a shard into the cache




class _Collate(ArrowBatchCollateFn):
    """Arrow batch -> (pixels (N, D) uint8, labels (N,) int64); Ray moves them to the device.

    An image of the wrong length stops training with one line naming the row and its file.
    """

    def __init__(self, D: int):
        super().__init__()
        self.D = D

    def __call__(self, batch: pa.Table) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            X = dataset.pixels(batch.column(schema.IMAGE), self.D)
        except ConfigError:  # name the row and its file: read their columns only now
            paths = batch.column(PATH).to_pylist()
            ids = batch.column(schema.IMAGE_ID).to_pylist()
            for i in range(batch.num_rows):  # the first bad row, with its own file
                dataset.pixels(batch.column(schema.IMAGE).slice(i, 1), self.D, [ids[i]],
                               paths[i])
            raise
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


def _use_cache(cfg: Settings, split: _Split, rows: int, device: torch.device, collective: bool,
               counter) -> bool:
    """Cache when asked (default: on GPU) and the shard fits on every rank; then fill it."""
    want = cfg.cache if cfg.cache is not None else device.type == "cuda"
    if not want:
        return False
    fits = torch.tensor([int(batches.fits(rows * (split.D + 8), device))], device=device)
    if collective:
        _all_reduce(fits, "min")
    if not fits.item():
        _say(counter, logging.WARNING,
             f"shard of {rows} rows does not fit in {device} memory: streaming instead")
        return False
    n = torch.tensor([split.fill_cache(rows, device)], device=device)
    if collective:  # every rank must run the same number of steps
        split.cache.truncate(int(_all_reduce(n, "min").item()))
    return True


def _restore(model: torch.nn.Module, opt: torch.optim.Optimizer, counter) -> dict:
    """The latest checkpoint's state loaded into model and optimizer, or a fresh state."""
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return {"epoch": 0, "history": [], "initial_loss": None, "resumed_after": []}
    with ckpt.filesystem.open_input_stream(f"{ckpt.path}/{schema.CHECKPOINT_FILE}") as f:
        state = weights.read_checkpoint(f.read())
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    _say(counter, logging.INFO, f"resuming after epoch {state['epoch']} from {ckpt.path}")
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
    counter = config.get("progress")
    if _use_cache(cfg, train, rows, device, world > 1, counter):
        rows = train.cache.n
        if val is not None:
            _use_cache(cfg, val, config["val_rows"], device, False, counter)
    return train, val, rows


def _say(counter, level: int, text: str) -> None:
    """A line for this worker's log and, through the progress actor, for the driver's."""
    log.log(level, "%s", text)
    if counter is not None:
        counter.note.remote(text)


def _epoch_line(cfg: Settings, row: dict) -> str:
    return (f"epoch {row['epoch']}/{cfg.epochs}: train loss {row['train_loss']:.4f} top-1 "
            f"{row['train_top1']:.3f} | val loss {row['val_loss']:.4f} top-1 "
            f"{row['val_top1']:.3f} top-5 {row['val_top5']:.3f} | {row['train_s']:.1f} s, "
            f"{row['samples_per_s']:.0f} samples/s")


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
    counter = config.get("progress")  # the driver's progress actor (common/progress.py)
    state = _restore(model, opt, counter if rank == 0 else None)
    ddp = ray.train.torch.prepare_model(model)  # DDP when world > 1 (gloo on CPU, NCCL on GPU)
    shift, scale = (t.to(device) for t in softmax.channel_stats(config["mean"], config["std"], D))
    train, val, rows = _shards(cfg, config, rank, world, device)
    steps, fresh = max(1, math.ceil(rows / (cfg.batch_size // world))), state["epoch"] == 0
    fail_at = config.get("fail_at_epoch")  # a fault injected by the tests, never a flag
    for epoch in range(state["epoch"], cfg.epochs):
        t = time.perf_counter()
        fail = fresh and rank == 0 and fail_at == epoch + 1
        rows_of = progress.counted(train.batches(batches.epoch_seed(cfg.seed, epoch, rank)),
                                   counter, size=lambda Xy: len(Xy[1]))
        sums, first = epochs.train_epoch(
            model, ddp, opt, rows_of, shift, scale, cfg.reg, lambda i, e=epoch: epochs.lr_at(
                cfg.peak_lr, cfg.schedule, (e + i / steps) / cfg.epochs),
            fail_at_step=steps // 2 if fail else None, robust_eps=cfg.robust_eps)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the steps run asynchronously: time them whole
        seconds = time.perf_counter() - t
        if epoch == 0 and first is not None:
            state["initial_loss"] = epochs.significant(float(first))
            if rank == 0:
                _say(counter, logging.INFO, f"initial loss {state['initial_loss']:.4f} "
                                            f"(ln C = {math.log(C):.4f})")
        sums, t = _all_reduce(sums), time.perf_counter()
        if not (torch.isfinite(sums).all() and torch.isfinite(model.weight).all()
                and torch.isfinite(model.bias).all()):
            if rank == 0:
                log.error("epoch %d: the loss or the weights are no longer finite; stopping "
                          "without a checkpoint of it", epoch + 1)
            return  # every rank sees the same sums and weights: all stop here
        va = epochs.evaluate(model, val.batches(None), shift, scale) if val else None
        reg_loss = 0.5 * cfg.reg * float(model.weight.detach().pow(2).sum())
        row = epochs.summarize(epoch + 1, sums, va, reg_loss, seconds)
        row["val_s"] = epochs.significant(time.perf_counter() - t)
        if rank == 0:
            _say(counter, logging.INFO, _epoch_line(cfg, row))
        state["history"] = [*state["history"], row]
        state.update(epoch=epoch + 1, optimizer=opt.state_dict(), settings=config["settings"],
                     model={k: v.detach().cpu() for k, v in model.state_dict().items()})
        _report(row, state, rank)
