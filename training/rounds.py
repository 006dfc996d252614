"""Hardening rounds, the core: train in memory, make fooling images with exact, measure. No Ray,
no storage (training/harden.py is the job).

A round trains the blog's classifier from scratch, in this process, on tensors: the objective,
optimizer, schedule, initialization and per-epoch shuffles of training/worker.py with one worker
(training/epochs.py, training/batches.py). Then it makes one fooling image per chosen (training
image, real target) pair against the model: exact's certified minimal L-inf change
(attacks/methods/exact.py), which must make the target beat every class of the model, the
background class included. The next round learns them as class C, ``background`` (C + 1
classes), or under their source image's own class (``adversarial``, C classes).

    >>> fitted = fit(X, y, Xv, yv, C, shift, scale, settings)    # Fitted: folded W, b; state
    >>> targets = draw_targets(y[src], S[src], C, "uniform", rng)
    >>> images, ok, linf = fool(LinearModel(fitted.W, fitted.b), X[src], targets)
    >>> accuracy(model, Xv, yv)                       # {val_top1, val_top5} over every class
    >>> minimal_linf(model, Xv[:100], C)              # exact's median and p90 L-inf, success
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from attacks.methods.exact import Exact
from attacks.methods.linear import LinearModel
from common.errors import ConfigError
from training import batches, epochs, softmax
from training.settings import Settings

SAMPLINGS = ("uniform", "runner-up")  # how each source image's target is drawn


@dataclass(frozen=True)
class Fitted:
    """A trained model: raw-pixel weights (folded) and the state training/weights.py writes."""

    W: np.ndarray  # (C, D) float32: scores = x @ W.T + b on pixels 0..255
    b: np.ndarray  # (C,) float32
    state: dict  # {"model": {"weight", "bias"}, "history": [...], "initial_loss": float}


def _cache(X: torch.Tensor, y: torch.Tensor, device: torch.device) -> batches.Cache:
    cache = batches.Cache.allocate(len(y), X.shape[1], device)
    cache.append(X, y)
    return cache


def fit(X: torch.Tensor, y: torch.Tensor, Xv: torch.Tensor, yv: torch.Tensor, C: int,
        shift: torch.Tensor, scale: torch.Tensor, cfg: Settings, device: str = "cpu") -> Fitted:
    """Train ``cfg.epochs`` epochs on X (N, D) uint8 pixels and labels y (N,) in 0..C-1, each
    evaluated on Xv, yv, as one worker of training.train does. Refuses a run that diverges."""
    dev = torch.device(device)
    model = softmax.make_model(X.shape[1], C, cfg.init_std, cfg.seed).to(dev)
    opt = epochs.make_optimizer(cfg.optimizer, model.parameters(), cfg.peak_lr, cfg.momentum)
    shift, scale = shift.to(dev), scale.to(dev)
    train, val = _cache(X, y, dev), _cache(Xv, yv, dev)
    steps = max(1, math.ceil(len(y) / cfg.batch_size))
    history, initial = [], None
    for epoch in range(cfg.epochs):
        t = time.perf_counter()
        order = batches.epoch_seed(cfg.seed, epoch, 0)

        def lr(i: int, e: int = epoch) -> float:
            return epochs.lr_at(cfg.peak_lr, cfg.schedule, (e + i / steps) / cfg.epochs)

        sums, first = epochs.train_epoch(model, model, opt, train.batches(cfg.batch_size, order),
                                         shift, scale, cfg.reg, lr, robust_eps=cfg.robust_eps)
        if initial is None and first is not None:
            initial = epochs.significant(float(first))
        if not (torch.isfinite(sums).all() and torch.isfinite(model.weight).all()):
            raise ConfigError(f"training diverged in epoch {epoch + 1}: the loss or the weights "
                              f"stopped being finite (lr {cfg.peak_lr:g}); lower --lr")
        seconds = time.perf_counter() - t
        va = epochs.evaluate(model, val.batches(cfg.batch_size), shift, scale)
        reg_loss = 0.5 * cfg.reg * float(model.weight.detach().pow(2).sum())
        history.append(epochs.summarize(epoch + 1, sums, va, reg_loss, seconds))
    state = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
             "history": history, "initial_loss": initial, "epoch": cfg.epochs}
    W, b = softmax.fold(model.weight, model.bias, shift, scale)
    return Fitted(W, b, state)


def draw_targets(y: np.ndarray, S: np.ndarray, C: int, sampling: str,
                 rng: np.random.Generator) -> np.ndarray:
    """One real target (0..C-1) per source image, never its label: ``uniform`` over the other
    C - 1 classes, or ``runner-up``, the real class the model scores highest after the label
    (S (N, C') scores, C' >= C). Returns (N,) int64."""
    if sampling == "uniform":
        return (y + rng.integers(1, C, len(y))) % C
    if sampling == "runner-up":
        real = np.array(S[:, :C], dtype=np.float64)
        real[np.arange(len(y)), y] = -np.inf
        return real.argmax(1)
    raise ConfigError(f"unknown --sampling {sampling!r} (one of {', '.join(SAMPLINGS)})")


def fool(model: LinearModel, X: torch.Tensor, targets: np.ndarray
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact's minimal L-inf fooling image of each X[i] (N, D) uint8 for targets[i] (N,), against
    every class of ``model``. Returns the stored images (N, D) uint8, whether each had to move
    and is scored as its target (N,) bool, and its L-inf change (N,) float32, pixel levels."""
    X = X.to(model.device)
    images = torch.empty_like(X)
    ok = torch.zeros(len(X), dtype=torch.bool, device=model.device)
    S = model.scores(X)
    for t in np.unique(targets):
        idx = torch.from_numpy(np.flatnonzero(targets == t)).to(model.device)
        f = Exact(model)(X[idx], S[idx], torch.tensor([int(t)], device=model.device))
        images[idx] = f.images
        ok[idx] = (f.scores.argmax(1) == int(t)) & (S[idx].argmax(1) != int(t))
    linf = (images.to(torch.int16) - X.to(torch.int16)).abs().amax(1).float()
    return images.cpu().numpy(), ok.cpu().numpy(), linf.cpu().numpy()


def shares(model: LinearModel, images: np.ndarray, classes: dict[str, np.ndarray]
           ) -> dict[str, float | None]:
    """For each name, the share of ``images`` (N, D) uint8 the model scores as that name's class
    (an int, or (N,) ints); None when there are no images."""
    if not len(images):
        return dict.fromkeys(classes)
    pred = model.scores(torch.from_numpy(images)).argmax(1).cpu().numpy()
    return {k: float(np.mean(pred == c)) for k, c in classes.items()}


def accuracy(model: LinearModel, Xv: torch.Tensor, yv: torch.Tensor) -> dict:
    """Top-1 and top-5 of images Xv (N, D) with labels yv (N,) over every class of the model:
    a real image called background is wrong."""
    S = model.scores(Xv)
    top = softmax.topk_correct(S, yv.to(model.device)).cpu().numpy() / max(len(yv), 1)
    return {"val_top1": float(top[0]), "val_top5": float(top[1])}


def minimal_linf(model: LinearModel, Xv: torch.Tensor, C: int) -> dict:
    """Exact's minimal L-inf over the pairs (each image of Xv (N, D) x every real target 0..C-1)
    that had to move and were fooled (t beats every class of the model): the median and 90th
    percentile (numpy's linear quantiles, as the attack's summaries; None when none was fooled),
    the success rate over all pairs, and the pairs."""
    Xv = Xv.to(model.device)
    S = model.scores(Xv)
    targets = torch.arange(C, device=model.device)
    f = Exact(model)(Xv, S, targets)
    t = targets.repeat(len(Xv))
    fooled = (f.scores.argmax(1) == t).cpu().numpy()
    moved = fooled & (S.argmax(1).repeat_interleave(C) != t).cpu().numpy()
    diff = f.images.view(len(Xv), C, -1).to(torch.int16) - Xv[:, None].to(torch.int16)
    linf = diff.abs().amax(2).flatten().float().cpu().numpy()[moved]
    q50, q90 = (float(np.quantile(linf, q)) if len(linf) else None for q in (0.5, 0.9))
    return {"median_linf": q50, "p90_linf": q90,
            "success_rate": float(fooled.mean()) if len(fooled) else 0.0,
            "pairs": int(len(fooled))}


def training_labels(mode: str, labels: np.ndarray, C: int) -> np.ndarray:
    """The labels fooling images are learnt under: class C (background) or, adversarial, the
    classes of the images they were made from. (N,) int64."""
    if mode == "background":
        return np.full(len(labels), C, dtype=np.int64)
    if mode == "adversarial":
        return labels.astype(np.int64)
    raise ConfigError(f"unknown mode {mode!r} (background or adversarial)")
