"""The linear model that the attacks fool, and what its linearity gives for free (DESIGN.md).

``scores = x @ W.T + b`` with ``x`` the flattened HWC image, float32 pixels in 0..255, ``W`` (C, D),
``b`` (C,). This module scores images, measures stored images, and computes what is computed
once per model: the Gram matrix ``W W^T`` (the template step in O(C)) and the distances
``||W[t] - W[k]||_1`` and ``_2`` (the certified lower bounds).

    >>> model = LinearModel(W, b)                       # numpy or torch, any device
    >>> S = model.scores(X)                             # X (N, D) uint8 -> (N, C) float32

Only numpy and torch here: no Ray, no storage.
"""

from __future__ import annotations

import numpy as np
import torch

BOUND_SLACK = 1e-5  # certified bounds are shaved by this relative amount, so float error never
# lifts one above the true minimum
L1_BLOCK = 64  # targets per block when computing the (C, C) L1 distances: bounds the memory


class LinearModel:
    """A linear classifier on raw pixels, held as torch tensors on one device.

    Args:
        W: (C, D) weights, b: (C,) biases, pixels in 0..255 (preprocessing folded in).
        device: "cpu" or "cuda".
        facts: precomputed ``gram``, ``dist_l1``, ``dist_l2`` (see :meth:`facts`), so that workers
            need not recompute them.
    """

    def __init__(self, W, b, device: str = "cpu", facts: dict | None = None):
        self.device = torch.device(device)
        self.W = torch.tensor(np.asarray(W, np.float32), device=self.device)  # (C, D)
        self.b = torch.tensor(np.asarray(b, np.float32), device=self.device)  # (C,)
        if self.W.ndim != 2 or self.b.shape != (self.W.shape[0],):
            raise ValueError(f"W must be (C, D) and b (C,), got {tuple(self.W.shape)} and "
                             f"{tuple(self.b.shape)}")
        self.C, self.D = self.W.shape
        self._fast = None  # W in bfloat16, for estimates, where that is fast
        self._facts = {k: torch.tensor(np.asarray(v), device=self.device)
                       for k, v in (facts or {}).items()}

    # --- scoring -------------------------------------------------------------------------------
    def scores(self, X: torch.Tensor) -> torch.Tensor:
        """(P, D) images (uint8 or float, pixels 0..255) -> (P, C) float32 scores."""
        return torch.addmm(self.b, X.to(self.device, torch.float32), self.W.T)

    def estimate(self, V: torch.Tensor) -> torch.Tensor:
        """V @ W.T (P, C), for guesses only, never for a reported number (see ``_fast``)."""
        fast = self._fast_W()
        if fast is None:
            return V.to(torch.float32) @ self.W.T
        return (V.to(torch.bfloat16) @ fast.T).to(torch.float32)

    def mean_template(self, S: torch.Tensor, fast: bool = False) -> torch.Tensor:
        """p @ W for scores S (N, C): the softmax-weighted template (N, D).

        The gradient of log p_t is ``W[t] - p @ W``. ``fast``: for a direction only (see ``_fast``).
        """
        p = torch.softmax(S, dim=1)
        W = self._fast_W() if fast else None
        return p @ self.W if W is None else (p.to(torch.bfloat16) @ W).to(torch.float32)

    def _fast_W(self) -> torch.Tensor | None:
        """W in bfloat16 where the hardware multiplies it several times faster than float32
        (GPUs, CPUs with AMX), else None. Products with it (float32 accumulation) steer searches;
        every reported score is a float32 product of the stored image."""
        if self._fast is None:
            self._fast = self.W.to(torch.bfloat16) if _fast_bf16(self.device) else False
        return self._fast if self._fast is not False else None

    # --- facts computed once per model ---------------------------------------------------------
    def facts(self, targets=None) -> dict[str, np.ndarray]:
        """Gram matrix (C, C) and distances ``||W[t] - W[k]||`` (C, C; NaN rows: not targets)."""
        W64 = self.W.double().cpu()
        gram = W64 @ W64.T
        sq = torch.diagonal(gram)
        l2 = (sq[:, None] + sq[None, :] - 2 * gram).clamp(min=0).sqrt()
        rows = range(self.C) if targets is None else sorted({int(t) for t in targets})
        l1 = torch.full((self.C, self.C), float("nan"), dtype=torch.float64)
        rows, Wc = list(rows), self.W.cpu()
        for i in range(0, len(rows), L1_BLOCK):
            block = rows[i:i + L1_BLOCK]
            l1[block] = torch.cdist(Wc[block], Wc, p=1).double()
        return {"gram": gram.float().numpy(), "dist_l1": l1.numpy(), "dist_l2": l2.numpy()}

    def fact(self, name: str) -> torch.Tensor:
        if name not in self._facts:
            self._facts.update({k: torch.tensor(v, device=self.device)
                                for k, v in self.facts().items()})
        return self._facts[name]

    # --- certified lower bounds -----------------------------------------------------------------
    def bounds(self, S: torch.Tensor, t: torch.Tensor, margin: float = 0.0):
        """Lower bounds on the L-inf and L2 distance from each image to the region where t wins.

        For each k != t, any x' with ``s_t(x') - s_k(x') >= margin`` is at least
        ``max(0, s_k - s_t + margin) / ||W[t] - W[k]||_q`` away (Hoelder), q = 1 for L-inf and
        q = 2 for L2; the maximum over k bounds every attack. S (P, C) scores of the originals,
        t (P,) targets. Returns two (P,) float32 tensors, rounded down.
        """
        S64 = S.double()
        gap = (S64 - S64.gather(1, t[:, None]) + margin).clamp(min=0)
        gap.scatter_(1, t[:, None], 0.0)
        out = []
        for name in ("dist_l1", "dist_l2"):
            dist = self.fact(name)[t]
            ratio = torch.where(gap > 0, gap / dist, torch.zeros_like(gap))  # gap > 0, dist 0: inf
            out.append(_round_down(ratio.amax(1) * (1 - BOUND_SLACK)))
        return out[0], out[1]


def _fast_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private, so guarded
    return bool(amx and amx())


def _round_down(x: torch.Tensor) -> torch.Tensor:
    """float64 -> float32, never rounding up."""
    y = x.float()
    up = y.double() > x
    return torch.where(up, torch.nextafter(y, torch.full_like(y, -float("inf"))), y)


def measure(X: torch.Tensor, Xs: torch.Tensor, Ss: torch.Tensor, t: torch.Tensor) -> dict:
    """What the stored images are: distances from the originals and the model's verdict.

    X, Xs (P, D) uint8 originals and stored images, Ss (P, C) the scores of Xs, t (P,) targets.
    Returns (P,) tensors: ``linf``, ``l2`` (pixel units), ``fooled_pred``, ``p_target``.
    """
    diff = (Xs.to(torch.int16) - X.to(torch.int16)).to(torch.float32)  # exact: |diff| <= 255
    return {
        "linf": torch.linalg.vector_norm(diff, float("inf"), dim=1),
        "l2": torch.linalg.vector_norm(diff, 2, dim=1),
        "fooled_pred": Ss.argmax(1),
        "p_target": torch.log_softmax(Ss, 1).gather(1, t[:, None])[:, 0].exp(),
    }


def passes(Ss: torch.Tensor, t: torch.Tensor, confidence: float | None) -> torch.Tensor:
    """(P,) bool: t is the argmax of scores Ss (P, C), with probability >= confidence if given."""
    ok = Ss.argmax(1) == t
    if confidence is not None:
        logp = torch.log_softmax(Ss, 1).gather(1, t[:, None])[:, 0]
        ok &= logp >= float(np.log(confidence))
    return ok
