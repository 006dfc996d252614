"""One pass of training and one of evaluation over batches of pixels: plain PyTorch, no Ray.

The job (training/train.py) feeds these from Ray Data or from a cache; tests and the benchmark
feed them tensors directly.

    >>> opt = make_optimizer("sgd", model.parameters(), lr=3e-3, momentum=0.9)
    >>> sums, first = train_epoch(model, model, opt, batches, shift, scale, reg=0.1,
    ...                           lr=lambda i: 3e-3)
    >>> row = summarize(1, sums, evaluate(model, val_batches, shift, scale), 0.0, seconds=2.0)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from training import softmax

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]  # (X (N, D) pixels 0..255, y (N,) int64)


def make_optimizer(name: str, params: Iterator[nn.Parameter], lr: float, momentum: float
                   ) -> torch.optim.Optimizer:
    """``sgd``: SGD with Nesterov momentum (plain SGD when momentum is 0); ``adam``: Adam."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=momentum > 0)
    raise ValueError(f"unknown optimizer {name!r}")


def lr_at(peak: float, schedule: str, progress: float) -> float:
    """Learning rate when ``progress`` (0..1) of the run is done: constant, or a cosine from
    the peak down to 0 (Loshchilov & Hutter 2017, SGDR, without restarts)."""
    if schedule == "constant":
        return peak
    if schedule == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    raise ValueError(f"unknown schedule {schedule!r}")


def train_epoch(model: nn.Linear, step_model: nn.Module, opt: torch.optim.Optimizer,
                batches: Batches, shift: torch.Tensor, scale: torch.Tensor, reg: float,
                lr: Callable[[int], float], fail_at_step: int | None = None,
                robust_eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One pass of minibatch steps on loss = cross-entropy + 0.5 * reg * ||W||^2.

    With ``robust_eps`` > 0 the cross-entropy is its certified worst case within that L-inf
    radius of raw pixels (training/softmax.py, ``robust_scores``); the summed loss is that bound,
    top-1 and top-5 are of the clean images.

    ``step_model`` is what the forward pass goes through (``model`` itself, or its DDP wrapper,
    which averages the gradients across workers); ``lr(i)`` sets the rate of step i.
    Returns float64 sums (loss * n, top-1 hits, top-5 hits, n) on the model's device, and the
    first batch's loss before any step (near ln(C) at the start of training). The sums stay on
    the device so that the loop never waits for it.
    """
    sums = torch.zeros(4, dtype=torch.float64, device=shift.device)
    first = None
    for i, (X, y) in enumerate(batches):
        if fail_at_step is not None and i == fail_at_step:
            raise RuntimeError(f"injected failure at step {i} (a test's fail_at_epoch)")
        for group in opt.param_groups:
            group["lr"] = lr(i)
        scores = step_model(softmax.normalize(X, shift, scale))  # (N, C)
        loss, data_loss = softmax.objective(scores, y, model.weight, reg, robust_eps, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            first = data_loss.detach() if first is None else first
            sums[0] += data_loss.detach() * len(y)
            sums[1:3] += softmax.topk_correct(scores.detach(), y)
            sums[3] += len(y)
    return sums, first


@torch.no_grad()
def evaluate(model: nn.Module, batches: Batches, shift: torch.Tensor, scale: torch.Tensor
             ) -> torch.Tensor:
    """float64 sums over the batches: (cross-entropy, top-1 hits, top-5 hits, n)."""
    sums = torch.zeros(4, dtype=torch.float64, device=shift.device)
    for X, y in batches:
        scores = model(softmax.normalize(X, shift, scale))
        sums[0] += F.cross_entropy(scores, y, reduction="sum")
        sums[1:3] += softmax.topk_correct(scores, y)
        sums[3] += len(y)
    return sums


def summarize(epoch: int, train: torch.Tensor, val: torch.Tensor | None, reg_loss: float,
              seconds: float) -> dict:
    """One row of metrics.json's history from the sums of train_epoch and evaluate."""
    t = train.tolist()
    n = max(t[3], 1)
    row = {"epoch": epoch, "train_loss": t[0] / n, "train_top1": t[1] / n, "train_top5": t[2] / n}
    if val is not None:
        v = val.tolist()
        m = max(v[3], 1)
        row.update(val_loss=v[0] / m, val_top1=v[1] / m, val_top5=v[2] / m, val_rows=int(v[3]))
    row.update(reg_loss=reg_loss, train_rows=int(t[3]), train_s=seconds,
               samples_per_s=t[3] / max(seconds, 1e-9))
    return {k: significant(v) if isinstance(v, float) else v for k, v in row.items()}


def significant(x: float, digits: int = 7) -> float:
    """``x`` rounded to ``digits`` significant digits, for readable JSON (float32 has ~7)."""
    return float(f"{x:.{digits}g}")
