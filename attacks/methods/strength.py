"""How hard a model is to fool, in one number: the sign method's median strength.

    >>> median_sign_eps(W, b, X)     # W (C, D), b (C,) float32; X (N, D) uint8 -> pixel levels

The training sweep's ``median_sign_eps`` column; the frontier measures the same with the exact
minimum instead, through the attack job.
"""

from __future__ import annotations

import numpy as np
import torch

from attacks.methods.linear import LinearModel
from attacks.methods.sign import Sign


def median_sign_eps(W: np.ndarray, b: np.ndarray, X: np.ndarray) -> float:
    """The median strength of the sign method that fools the model ``(W, b)`` over the images
    ``X`` (N, D) uint8 and every target, fooled pairs only (NaN when none is fooled)."""
    lin = LinearModel(W, b)
    X = torch.from_numpy(X)
    targets = torch.arange(lin.C)
    fooled = Sign(lin)(X, lin.scores(X), targets)
    ok = (fooled.scores.argmax(1) == targets.repeat(len(X))).numpy()
    return float(np.median(fooled.strength.numpy()[ok])) if ok.any() else float("nan")
