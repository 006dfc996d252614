"""The LP dual of the minimal L-inf fooling distance for one chunk of pairs (docs/exact.md).

For weights lam (P, K) on K rivals per pair, ``g = sum_k lam_k (W[t] - W[k])`` and

    h(lam, eps) = sum_k lam_k q_k + sum_j |g_j| min(eps, R_j)   (R_j: the room to sign(g_j))

``Problem`` holds the pairs, their rivals and margins q (P, K) in score units, x (P, D) uint8
pixels in 0..255, and the search backend that makes g (search.py); it gives the corner
``clip(x + eps sign(g))`` and its rival margins, the LP's basic solution (``balanced``) and the
float64 certificate. ``Constants``: the numbers that steer both backends' searches.

Only numpy and torch here: no Ray, no storage.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch

from attacks.methods.linear import BOUND_SLACK, LinearModel, _round_down
from attacks.methods.sign import LEVELS

KMAX = 8  # rivals in the dual search, nearest first (random 1,000-class models bind more)
WEIGHT_FLOOR = 1e-3  # rivals with less weight (relative to the most) are not balanced
RIDGE = 1e-6  # the tie system's ridge where LU's solution leaves the box (relative to L'L)
GROW = 8  # rivals added per round: the classes that beat the step that lost
DENSE_C = 128  # up to this many classes, products with all of W beat gathering rivals' rows
CERT_CHUNK = 16  # pairs per float64 product of the certificate: CERT_CHUNK x K x D x 8 bytes
GPU_CERT_CHUNK = 512  # on a GPU (2.8 GB for K = 56 at 64x64x3)
ROWS_CHUNK = 1024  # pairs whose rival rows are gathered at once (diff_rows)


@dataclass(frozen=True)
class Constants:
    """The numbers of the dual search, the same for both backends (search.py)."""

    line_steps: int = 3  # SMO: evaluations per segment before it settles on its best point
    converged: float = 0.01  # SMO stops once no corner margin is short by this many levels
    feasible: float = 1e-4  # Newton stops a pair whose corner beats every rival by this (score)
    kernel: int = 8  # Newton's Hessian: pixels per rival in the kernel around h's kinks (4x used)
    tau_floor: float = 1e-3  # the kernel is at least this wide, relative to the mean |g_j|
    damp: float = 1e-3  # the Hessian's damping, relative to its mean diagonal
    line_grid: int = 16  # Newton's line search: steps per octave (a power of 2)
    line_octaves: int = 12  # octaves each side of 1
    # a float32's bits below its line search bin (the exponent and the top log2(line_grid)
    # mantissa bits), and the bin of 2^-line_octaves
    bin_shift: int = field(init=False)
    first_bin: int = field(init=False)

    def __post_init__(self):
        if self.line_grid < 1 or self.line_grid & (self.line_grid - 1):
            raise ValueError(f"line_grid must be a power of 2, got {self.line_grid}")
        object.__setattr__(self, "bin_shift", 24 - self.line_grid.bit_length())
        object.__setattr__(self, "first_bin", (127 - self.line_octaves) * self.line_grid)

    def grid(self) -> np.ndarray:
        """The line search's step sizes (float32), line_grid per octave from 2^-line_octaves to
        2^line_octaves: the upper ends of the bins of the float32 bit pattern, ``2^E (1 + (m +
        1) / line_grid)`` (the kinks in bin i lie in [grid[i - 1], grid[i]))."""
        bins = np.arange(self.first_bin + 1, self.first_bin + 2 * self.line_octaves *
                         self.line_grid + 1, dtype=np.int32)
        return (bins << self.bin_shift).view(np.float32)


class Problem:
    """One chunk of pairs: the K nearest rivals and their margins q_k (P, K).

    ``g = sum_k lam_k (W[t] - W[k])`` and the corner's rival margins are computed as products
    with W itself (a (P, C) x (C, D) product, W in cache) for few classes, and else by the
    backend (search.py): from the rows ``A = W[t] - W[rivals]`` (P, K, D), gathered when first
    needed and kept, or from W's rows read by index.
    """

    def __init__(self, model: LinearModel, x, s, t, margin: float, backend, rivals=None,
                 q_all=None):
        self.model, self.x, self.t, self.margin, self.backend = model, x, t, margin, backend
        C = model.C
        if q_all is None:
            q_all = (s.gather(1, t[:, None]) - s).double() - margin  # (P, C)
        self.q_all = q_all
        if rivals is None:
            K = C - 1 if C - 1 <= 2 * KMAX else KMAX
            l1 = model.fact("dist_l1")[t].double().clamp(min=1e-30)
            rank = (q_all / l1).scatter(1, t[:, None], float("inf"))
            rivals = rank.topk(K, 1, largest=False).indices  # (P, K) nearest first
        self.rivals, self.q, self.K = rivals, q_all.gather(1, rivals), rivals.shape[1]
        self.dense = C <= DENSE_C
        self.A = None  # (P, K, D), made by rows()

    def grow(self, rows, S: torch.Tensor, lam: torch.Tensor) -> tuple[Problem, torch.Tensor]:
        """The pairs ``rows`` with up to GROW more rivals: the classes with the smallest margins
        over t in scores S (P', C) of a step that lost (those that beat it first); lam (P', K)
        padded with zeros for them. The rows W[t] - W[k] of the old rivals, where made, are
        copied once, straight into the new ones."""
        add = min(GROW, self.model.C - 1 - self.K)
        if add <= 0:
            return self.subset(rows), lam
        grown = self.subset(rows, rows_only=True)
        rank = (S.gather(1, grown.t[:, None]) - S).double()
        rank.scatter_(1, torch.cat([grown.rivals, grown.t[:, None]], 1), float("inf"))
        new = rank.topk(add, 1, largest=False).indices
        grown.rivals = torch.cat([grown.rivals, new], 1)
        grown.q, grown.K = grown.q_all.gather(1, grown.rivals), grown.rivals.shape[1]
        if self.A is not None and not self.dense:
            grown.A = self.A.new_empty(len(new), grown.K, self.A.shape[2])
            torch.index_select(self.A, 0, _indices(rows), out=grown.A[:, :self.K])
            diff_rows(self.model.W, grown.t, new, grown.A[:, self.K:])
        return grown, torch.cat([lam, lam.new_zeros(len(lam), add)], 1)

    def subset(self, rows, rows_only: bool = False) -> Problem:
        """The pairs ``rows``; ``rows_only``: without the rows W[t] - W[k] (no copy of them),
        enough for the certificate."""
        sub = object.__new__(Problem)
        sub.model, sub.margin, sub.K, sub.dense = self.model, self.margin, self.K, self.dense
        sub.backend = self.backend
        rows = _indices(rows)
        for key in ("x", "t", "rivals", "q", "q_all", "A"):
            v = None if rows_only and key == "A" else getattr(self, key)
            setattr(sub, key, None if v is None else v.index_select(0, rows))
        return sub

    @functools.cached_property
    def up(self) -> torch.Tensor:
        """(P, D) int64: each pixel's room towards 255 (made when first needed, as dn, lo, hi:
        the fused CPU search reads x itself)."""
        return (255 - self.x.to(torch.int16)).long()

    @functools.cached_property
    def dn(self) -> torch.Tensor:
        """(P, D) int64: each pixel's room towards 0."""
        return self.x.long()

    @functools.cached_property
    def lo(self) -> torch.Tensor:
        """(P, D) float32: the step's box, lo = -x to hi = 255 - x."""
        return -self.x.float()

    @functools.cached_property
    def hi(self) -> torch.Tensor:
        return 255 - self.x.float()

    def g(self, lam: torch.Tensor) -> torch.Tensor:
        """sum_k lam_k (W[t] - W[k]), (P, D) float32 (the backend's products for many
        classes)."""
        if self.dense:
            return self._through_w(lam, torch.float32)
        return self.backend.g(self, lam)

    def _through_w(self, lam: torch.Tensor, dtype) -> torch.Tensor:
        """g as one product with W, (P, C) x (C, D), in dtype."""
        lam = lam.to(dtype)
        coef = torch.zeros(len(lam), self.model.C, dtype=dtype, device=lam.device)
        coef.scatter_add_(1, self.rivals, -lam)
        coef.scatter_add_(1, self.t[:, None], lam.sum(1, keepdim=True))
        return coef @ self.model.W.to(dtype)

    def margins(self, step: torch.Tensor) -> torch.Tensor:
        """q_k + (W[t] - W[k]) . step for the K rivals, (P, K) float64."""
        if self.dense:
            ds = step @ self.model.W.T  # (P, C)
            gain = ds.gather(1, self.t[:, None]) - ds.gather(1, self.rivals)
        else:
            gain = dots(self.rows(), step)
        return self.q + gain.double()

    def rows(self) -> torch.Tensor:
        """(P, K, D) the rows W[t] - W[k] of the rivals, made when first needed, then kept."""
        if self.A is None:
            self.A = diff_rows(self.model.W, self.t, self.rivals)
        return self.A

    def balanced(self, lam: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The LP's basic solution at eps (P,) for its duals lam: the corner along sign(g), but
        the pixels at a tie (smallest |g_j| against sum_k lam_k |a_kj|), one fewer than the
        rivals with weight, set inside the box so that those rivals' margins are equal (a K x K
        linear system per pair; a rival without weight fixes a spare pixel instead). Returns
        the step (P, D) float32, rounded to integers."""
        P, K = lam.shape
        g = self.g(lam)
        step = self.corner(g, eps)
        A = self.rows()  # (P, K, D)
        order = lam.argsort(1, descending=True)
        active = (lam.gather(1, order) > WEIGHT_FLOOR * lam.amax(1, keepdim=True)).sum(1)
        spread = torch.cat([torch.bmm(lam[c].float()[:, None, :], A[c].abs())[:, 0]
                            for c in torch.arange(P, device=g.device).split(ROWS_CHUNK)])
        tie = g.abs() / spread.clamp(min=1e-30)
        T = tie.topk(max(K - 1, 1), 1, largest=False).indices  # (P, K - 1)
        a_T = A.gather(2, T[:, None, :].expand(P, K, T.shape[1])).gather(
            1, order[:, :, None].expand(P, K, T.shape[1]))  # (P, K, K - 1), rivals by weight
        lhs = torch.cat([a_T, -torch.ones(P, K, 1, device=g.device)], 2)  # unknowns: moves, z
        rhs = -self.margins(step).float().gather(1, order)
        slot = torch.arange(K, device=g.device)[None].expand(P, K)
        spare = slot >= active[:, None]
        fix = torch.nn.functional.one_hot((slot - 1).clamp(0, K - 1), K).float()
        lhs, rhs = torch.where(spare[:, :, None], fix, lhs), torch.where(spare, 0.0, rhs)
        move = _solve(lhs, rhs)[:, :-1]
        lo = torch.maximum(self.lo, -eps.float()[:, None]).gather(1, T)
        hi = torch.minimum(self.hi, eps.float()[:, None]).gather(1, T)
        step.scatter_(1, T, torch.minimum(torch.maximum(step.gather(1, T) + move, lo), hi))
        return step.round()

    def corner(self, g: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The step (P, D) float32 to the corner clip(x + eps sign(g), 0, 255), eps (P,)."""
        step = torch.sign(g).mul_(eps.clamp(max=255).float()[:, None])
        return torch.clamp(step, self.lo, self.hi)

    def certificate(self, lam: torch.Tensor) -> torch.Tensor:
        """r(lam) recomputed in float64 from the float32 weights, shaved: a true lower bound."""
        W, b, t = self.model.W, self.model.b, self.t
        lam, rivals = lam.double().clamp(min=0), self.rivals
        if self.dense:
            g = self._through_w(lam, torch.float64)
        else:  # from W itself, not the rounded rows A; only the rivals with weight
            lam, order = lam.sort(1, descending=True)
            support = int((lam > 0).sum(1).max()) if len(lam) else 1
            rivals = rivals.gather(1, order)[:, :max(support, 1)]
            lam = lam[:, :rivals.shape[1]]
            g = torch.cat([lam[c].sum(1, keepdim=True) * _rows(W, t[c]).double() - torch.bmm(
                lam[c][:, None, :], _rows(W, rivals[c]).double())[:, 0]
                for c in torch.arange(len(lam), device=lam.device).split(
                    CERT_CHUNK if lam.device.type == "cpu" else GPU_CERT_CHUNK)])
        c = (lam * (b[t].double()[:, None] - b[rivals].double() - self.margin)).sum(1)
        lq = c + (g * self.x.double()).sum(1)
        r = self.backend.root(self, g, lq)
        return _round_down(r.clamp(max=255) * (1 - BOUND_SLACK))


def diff_rows(W: torch.Tensor, t: torch.Tensor, rivals: torch.Tensor, out=None) -> torch.Tensor:
    """(P, K, D) the rows W[t] - W[k] for the rivals (P, K), into ``out`` if given; made
    ROWS_CHUNK pairs at a time, so the only temporary is a chunk's W[rivals] (on a GPU the rows
    of 16,000 pairs take 6 GB per 8 rivals; a temporary of them all would double that)."""
    if out is None:
        out = W.new_empty(len(t), rivals.shape[1], W.shape[1])
    for i in range(0, len(t), ROWS_CHUNK):
        c = slice(i, i + ROWS_CHUNK)
        torch.sub(W.index_select(0, t[c])[:, None, :], _rows(W, rivals[c]), out=out[c])
    return out


def _rows(W: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """W's rows for an index of any shape, (*index.shape, D)."""
    return W.index_select(0, index.reshape(-1)).view(*index.shape, W.shape[1])


def _indices(rows: torch.Tensor) -> torch.Tensor:
    """A mask or indices as indices: index_select runs twice as fast as indexing with a mask or
    an index tensor on CPUs (torch 2.13), and the chunks' rows are the bulk of exact's traffic."""
    return rows.nonzero()[:, 0] if rows.dtype == torch.bool else rows


def dots(A: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(P, K): the rows of A (P, K, D) times v (P, D). As v (P, 1, D) times A's transpose: the
    other order, bmm(A, v[:, :, None]), runs at a sixth of the memory speed on CPUs (torch 2.13)."""
    return torch.bmm(v[:, None, :], A.transpose(1, 2))[:, 0]


def onehot(i: torch.Tensor, K: int) -> torch.Tensor:
    """(P, K) float64: all the weight on rival i (P,)."""
    return torch.nn.functional.one_hot(i, K).double()


def _solve(lhs: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """x (P, K) with lhs x = rhs (lhs (P, K, K)): LU where the system is well posed; where it is
    singular or its solution leaves every box (near-singular: most tie systems, the pixels at a
    tie having little leverage), ridge least squares in float64, ``(L'L + RIDGE mean(diag L'L))
    x = L'rhs``, whose small moves keep more rivals balanced inside the box than the exact
    solution or the least-norm one (pinv: the same proofs on trained models, fewer on random
    ones, and an SVD that took a third of the GPU's time in exact). CUDA's lstsq raises on a
    singular system."""
    sol, info = torch.linalg.solve_ex(lhs, rhs[:, :, None])
    sol = sol[:, :, 0]
    bad = (info != 0) | ~(sol[:, :-1].abs() <= LEVELS).all(1)  # NaN counts as bad
    if bad.any():
        L = lhs[bad].double()
        LtL = L.transpose(1, 2) @ L
        eye = torch.eye(L.shape[1], dtype=L.dtype, device=L.device)
        ridge = RIDGE * LtL.diagonal(0, 1, 2).mean(1)[:, None, None] * eye
        Ltr = L.transpose(1, 2) @ rhs[bad].double()[:, :, None]
        fit, _ = torch.linalg.solve_ex(LtL + ridge, Ltr)
        sol[bad] = fit[:, :, 0].to(sol.dtype)
    return torch.nan_to_num(sol)
