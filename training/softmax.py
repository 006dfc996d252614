"""The linear softmax classifier of "Breaking Linear Classifiers on ImageNet": the core, no Ray.

One fully connected layer from the flattened HWC pixels to the classes. Training sees the pixels
normalized per channel with the ingest manifest's mean and std; the saved weights fold that
normalization back in (DESIGN.md, "weights.npz"):

    z      = (x - mean) / std                 x: (N, D) pixels in 0..255, HWC order, D = H*W*3
    scores = z @ W.T + b                      W: (C, D), b: (C,), the trained parameters
           = x @ (W / std).T + (b - (W / std) @ mean)
    loss   = mean_i cross_entropy(scores_i, y_i) + 0.5 * reg * ||W||^2     (b not regularized)

With a robust radius E > 0 (L-inf, pixel levels 0..255) the cross-entropy is replaced by its
certified upper bound over every image within E of x_i (Goodfellow et al. 2015 for two classes;
Wong and Kolter 2018 for the idea). A perturbation delta with ||delta||_inf <= E moves the margin
of a rival k over the label y by (W'[k] - W'[y]) . delta <= E * ||W'[k] - W'[y]||_1, W' = W / std
the folded (raw-pixel) weights, so

    robust_i = CE(scores_i + E * ||W'[.] - W'[y_i]||_1, y_i)  >=  max_delta CE(x_i + delta)

(the label's own logit is unchanged: its distance to itself is 0). Clipping to 0..255 only shrinks
the set of images, so the bound holds for stored images too. Only the distances from the batch's
distinct labels are computed: U x C x D, U <= min(N, C).

    >>> model = make_model(12288, 1000, init_std=1e-3, seed=0)
    >>> loss, data_loss = objective(model(normalize(X, shift, scale)), y, model.weight, reg=1e-2)
    >>> W, b = fold(model.weight, model.bias, shift, scale)     # scores = x @ W.T + b on raw pixels
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# cdist's CUDA backward allocates a (labels x C x D) buffer: at 1,000 classes and 224 labels,
# 11 GB. Labels go through it in blocks of at most this many elements (1 GiB of float32).
CDIST_ELEMENTS = 2**28


def make_model(D: int, C: int, init_std: float, seed: int) -> nn.Linear:
    """``nn.Linear(D, C)`` with W ~ N(0, init_std^2) and b = 0, the same for the same seed.

    A small init_std keeps the initial scores near zero, so the initial loss is near ln(C).
    """
    gen = torch.Generator().manual_seed(seed)
    model = nn.Linear(D, C)
    with torch.no_grad():
        model.weight.copy_(torch.randn(C, D, generator=gen) * init_std)
        model.bias.zero_()
    return model


def channel_stats(mean: list[float], std: list[float], D: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel pixel mean and std (0..255) spread over the D = H*W*3 HWC features.

    Returns ``(shift, scale)``, float32 tensors of shape (D,): feature d has channel d % 3.
    """
    channels = len(mean)
    if D % channels:
        raise ValueError(f"D={D} is not a multiple of {channels} channels")
    shift = torch.tensor(mean, dtype=torch.float32).repeat(D // channels)
    scale = torch.tensor(std, dtype=torch.float32).clamp_min(1e-6).repeat(D // channels)
    return shift, scale


def normalize(X: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``(X - shift) / scale`` as float32; X (N, D) uint8 or float pixels in 0..255."""
    return (X.to(torch.float32) - shift) / scale


def objective(scores: torch.Tensor, y: torch.Tensor, W: torch.Tensor, reg: float,
              eps: float = 0.0, scale: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, data_loss)``: mean cross-entropy of scores (N, C) against labels y (N,),
    plus ``0.5 * reg * ||W||^2`` in the loss.

    With ``eps`` > 0 (pixel levels) the cross-entropy is the certified worst case within that
    L-inf radius of raw pixels (:func:`robust_scores`); ``scale`` (D,) is the normalization's std.
    """
    if eps > 0:
        scores = robust_scores(scores, y, W, eps, scale)
    data_loss = F.cross_entropy(scores, y)
    return data_loss + 0.5 * reg * W.pow(2).sum(), data_loss


def robust_scores(scores: torch.Tensor, y: torch.Tensor, W: torch.Tensor, eps: float,
                  scale: torch.Tensor | None) -> torch.Tensor:
    """Every rival's worst-case score within L-inf radius ``eps`` of raw pixels: (N, C).

    ``scores + eps * ||W'[k] - W'[y_i]||_1`` with ``W' = W / scale`` (C, D), the weights on raw
    pixels; computed from the U distinct labels of the batch only (``cdist``, p = 1, in blocks of
    labels: see ``CDIST_ELEMENTS``). ``scale`` None: W already acts on raw pixels.
    """
    labels, row = torch.unique(y, return_inverse=True)  # (U,), (N,)
    W_raw = W if scale is None else W / scale.to(W.dtype)
    step = max(1, CDIST_ELEMENTS // W.numel())  # labels per cdist call
    dist = torch.cat([torch.cdist(W_raw[labels[i:i + step]], W_raw, p=1)
                      for i in range(0, len(labels), step)])  # (U, C), 0 at each label's class
    return scores + eps * dist[row]


def topk_correct(scores: torch.Tensor, y: torch.Tensor, ks: tuple[int, ...] = (1, 5)
                 ) -> torch.Tensor:
    """How many rows have their label among the top-k scores, for each k (k capped at C).

    Returns an int64 tensor (len(ks),) on the scores' device, so a loop can sum it without
    waiting for the device.
    """
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices  # (N, k)
    hits = (top == y[:, None]).cumsum(dim=1).clamp_max(1)  # (N, k): label within the first j+1
    return torch.stack([hits[:, min(k, top.shape[1]) - 1].sum() for k in ks])


def fold(W: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray,
         shift: torch.Tensor | np.ndarray, scale: torch.Tensor | np.ndarray
         ) -> tuple[np.ndarray, np.ndarray]:
    """Fold the input normalization into the weights (computed in float64, returned float32).

    Returns ``(W', b')`` with W' (C, D) and b' (C,) such that
    ``x @ W'.T + b' == normalize(x) @ W.T + b`` for pixels x in 0..255.
    """
    W, b, shift, scale = (np.asarray(torch.as_tensor(a).detach().cpu(), dtype=np.float64)
                          for a in (W, b, shift, scale))
    W_raw = W / scale
    b_raw = b - W_raw @ shift
    return W_raw.astype(np.float32), b_raw.astype(np.float32)


def reference_loss_grad(W: np.ndarray, b: np.ndarray, X: np.ndarray, y: np.ndarray, reg: float
                        ) -> tuple[float, np.ndarray, np.ndarray]:
    """The same loss and its gradient in plain numpy, float64, as an independent oracle.

    W (C, D), b (C,), X (N, D) already normalized, y (N,) ints. Returns ``(loss, dW, db)``.
    """
    W, b, X = (np.asarray(a, dtype=np.float64) for a in (W, b, X))
    N = X.shape[0]
    scores = X @ W.T + b
    scores -= scores.max(axis=1, keepdims=True)  # stable: softmax is shift-invariant
    p = np.exp(scores)
    p /= p.sum(axis=1, keepdims=True)
    loss = -np.log(p[np.arange(N), y]).mean() + 0.5 * reg * np.sum(W * W)
    dscores = p
    dscores[np.arange(N), y] -= 1.0
    dscores /= N
    return float(loss), dscores.T @ X + reg * W, dscores.sum(axis=0)
