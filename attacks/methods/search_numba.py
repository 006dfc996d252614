"""The dual search fused per pair in compiled loops (numba): the backend a CPU runs
(docs/exact.md; the interface in search.py).

The same iteration as the batched torch steps (search_torch.py), one pair at a time:
a Newton step reads the rows of W for the target and the rivals three times (g and the corner's
margins; the step's g with the line search's kinks), a row at a time, instead of a dozen passes
over (P, D) and (P, K, D) tensors; the rows' differences ``W[t] - W[k]`` are never stored, so
nothing is gathered or copied as rivals join and pairs stop. The root search (``smo``) is
fused the same way. Products are summed in float32 as the torch steps' are (they steer the
search; the certificate is recomputed in float64 by Problem), the margins in float64.
``NumbaBackend`` hands Problem's CPU tensors to the kernels as numpy arrays (views where they
are contiguous) and the search's constants as one named tuple.

Only numpy, numba and torch here: no Ray, no storage.
"""

from __future__ import annotations

import collections
import dataclasses

import numba
import numpy as np
import torch

from attacks.methods.problem import Constants, Problem

# Constants as numba takes them: a named tuple of the same fields, in the same order
Numbers = collections.namedtuple("Numbers", [f.name for f in dataclasses.fields(Constants)])
SELECT_SHIFT = 19  # the kernel's pixels are counted in bins of 1/16 octave of |g_j| (4,096)
_FLAGS = {"reassoc", "contract"}  # vectorized sums; NaN and inf keep their meaning (the kinks)


@numba.njit(cache=True, fastmath=_FLAGS, error_model="numpy")
def _combine(W, rows, w, out):
    """out = sum_k w_k (W[t] - W[r_k]) for rows = (t, r_1, ..., r_K) (float32 products, a row
    of W at a time: vectorized, streamed; the rows' differences are never stored)."""
    D = W.shape[1]
    wt = np.float32(w.sum())
    top = W[rows[0]]
    for j in range(D):
        out[j] = wt * top[j]
    for k in range(w.shape[0]):
        wk = np.float32(w[k])
        if wk != 0.0:
            a = W[rows[k + 1]]
            for j in range(D):
                out[j] -= wk * a[j]


@numba.njit(cache=True, error_model="numpy")
def combine(W, rows, lam):
    """(P, D) float32: sum_k lam_pk (W[t_p] - W[r_pk]) for every pair (rows (P, 1 + K))."""
    out = np.empty((rows.shape[0], W.shape[1]), np.float32)
    for p in range(rows.shape[0]):
        _combine(W, rows[p], lam[p], out[p])
    return out


@numba.njit(cache=True, fastmath=_FLAGS, error_model="numpy")
def _margins(W, rows, step, q, M):
    """M_k = q_k + (W[t] - W[r_k]) . step (float32 products, float64 margins)."""
    top = _dot(W[rows[0]], step)
    for k in range(M.shape[0]):
        M[k] = q[k] + (top - _dot(W[rows[k + 1]], step))


@numba.njit(cache=True, fastmath=_FLAGS, error_model="numpy")
def _dot(a, b):
    """a . b, float32 sums (vectorized), as float64."""
    acc = np.float32(0.0)
    for j in range(a.shape[0]):
        acc += a[j] * b[j]
    return np.float64(acc)


@numba.njit(cache=True, fastmath=_FLAGS, error_model="numpy")
def _pass_g(W, rows, lam, x, e, g, corner, M, q):
    """g = lam . A, the corner along sign(g) at e (the step: up to min(255 - x, e) where
    g > 0, else down to max(-x, -e)), and its margins M = q + A . corner."""
    _combine(W, rows, lam, g)
    for j in range(g.shape[0]):
        low, high = _ends(x[j], e)
        corner[j] = high if g[j] > 0 else low
    _margins(W, rows, corner, q, M)


@numba.njit(cache=True, error_model="numpy")
def _ends(xj, e):
    """Pixel j's step box within e levels (float32): down to max(-x_j, -e), up to
    min(255 - x_j, e)."""
    xj = np.float32(xj)
    return max(-xj, -e), min(np.float32(255.0) - xj, e)


@numba.njit(cache=True, error_model="numpy")
def _root(hist, lq):
    """Root in eps of ``lq + sum_r hist_r min(eps, r)`` and the slope there (search_torch.py
    ``root``): inf where it stays negative up to 255."""
    n = hist.shape[0]
    total = 0.0
    for r in range(n):
        total += hist[r]
    below, seen, prev = 0.0, 0.0, 0.0
    for e in range(n):
        above = total - seen
        val = lq + below + e * above
        if val >= 0:
            if e == 0:
                return 0.0, above
            frac = -prev / (val - prev) if val > prev else 1.0
            return e - 1 + min(max(frac, 0.0), 1.0), above
        prev = val
        below += hist[e] * e
        seen += hist[e]
    return np.inf, total


@numba.njit(cache=True, error_model="numpy")
def _rooms(g, x, lq, rooms):
    """The root in eps of h(lam, .) = lq + sum_j |g_j| min(eps, R_j) (lq = lam . q, g = lam . A)
    and its slope there: |g_j| binned by pixel j's room R_j towards sign(g_j) (255 - x_j or
    x_j)."""
    rooms[:] = 0.0
    for j in range(g.shape[0]):
        if g[j] > 0:
            rooms[255 - x[j]] += g[j]
        elif g[j] < 0:
            rooms[x[j]] -= g[j]
    return _root(rooms, lq)


@numba.njit(cache=True, error_model="numpy")
def roots(g, x, lq):
    """The root in eps of ``lq_p + sum_j |g_pj| min(eps, R_pj)`` for every pair p (g (P, D),
    x (P, D) uint8, lq (P,)): the certificate's, in g's precision."""
    out = np.empty(g.shape[0])
    rooms = np.empty(256)
    for p in range(g.shape[0]):
        out[p] = _rooms(g[p], x[p], lq[p], rooms)[0]
    return out


@numba.njit(cache=True, error_model="numpy")
def _solve(Mx, rhs):
    """x with Mx x = rhs by Gaussian elimination with partial pivoting (Mx, rhs overwritten);
    a zero pivot leaves zeros (torch's version turns a failed solve's NaN into 0)."""
    n = rhs.shape[0]
    for c in range(n):
        p = c
        for r in range(c + 1, n):
            if abs(Mx[r, c]) > abs(Mx[p, c]):
                p = r
        if Mx[p, c] == 0.0 or not np.isfinite(Mx[p, c]):
            return np.zeros(n)
        if p != c:
            for k in range(n):
                Mx[c, k], Mx[p, k] = Mx[p, k], Mx[c, k]
            rhs[c], rhs[p] = rhs[p], rhs[c]
        for r in range(c + 1, n):
            f = Mx[r, c] / Mx[c, c]
            if f != 0.0:
                for k in range(c, n):
                    Mx[r, k] -= f * Mx[c, k]
                rhs[r] -= f * rhs[c]
    out = np.zeros(n)
    for c in range(n - 1, -1, -1):
        s = rhs[c]
        for k in range(c + 1, n):
            s -= Mx[c, k] * out[k]
        out[c] = s / Mx[c, c]
    for c in range(n):
        if not np.isfinite(out[c]):
            out[c] = 0.0
    return out


@numba.njit(cache=True, error_model="numpy")
def _kkt_step(H, grad, free, damp):
    """The Newton step on the simplex over the free rivals (search_torch.py ``_kkt_step``)."""
    K = grad.shape[0]
    Hf = np.eye(K)
    for a in range(K):
        for b in range(K):
            if free[a] and free[b]:
                Hf[a, b] = H[a, b]
    diag = 0.0
    for a in range(K):
        diag += abs(Hf[a, a])
    diag = damp * diag / K
    kkt = np.zeros((K + 1, K + 1))
    rhs = np.zeros(K + 1)
    for a in range(K):
        for b in range(K):
            kkt[a, b] = Hf[a, b]
        kkt[a, a] += diag
        if free[a]:
            kkt[a, K] = 1.0
            kkt[K, a] = 1.0
            rhs[a] = -grad[a]
    d = _solve(kkt, rhs)[:K]
    for a in range(K):
        if not free[a]:
            d[a] = 0.0
    return d


@numba.njit(cache=True, fastmath=_FLAGS, error_model="numpy")
def _pass_line(W, rows, d, g, x, e, corner, gd, kink, bins_hist, bin_shift, first_bin):
    """gd = d . A (float32), the slope of h along d at 0 from the corner (returned without the
    d . q term), and the histogram of the slope's rises ``|gd_j| span_j`` binned by the float32
    bits of the kinks -g_j / gd_j (search_torch.py ``line_min``)."""
    D = W.shape[1]
    n = bins_hist.shape[0] - 1
    mask = (1 << (32 - bin_shift)) - 1
    _combine(W, rows, d, gd)
    slope = np.float32(0.0)
    for j in range(D):
        slope += gd[j] * corner[j]
        kink[j] = -(g[j] / gd[j]) + np.float32(0.0)
    kbits = kink.view(np.int32)
    for j in range(D):
        b = min(max(((kbits[j] >> bin_shift) & mask) - first_bin, 0), n)
        low, high = _ends(x[j], e)
        bins_hist[b] += abs(gd[j]) * (high - low)
    return slope


@numba.njit(cache=True, error_model="numpy")
def _nearest(g, n4, nk, idx, absg, counts, tau_floor):
    """The kernel's pixels: about the n4 with the smallest |g_j| (those below the n4-th's bin of
    the float32 bits, SELECT_SHIFT, then the first of its own bin), into idx; returns their
    number and the kernel's width tau (the nk-th smallest of them, at least tau_floor times the
    mean |g_j|). Counting by bits: no sort, two passes over the pixels."""
    D = g.shape[0]
    counts[:] = 0
    bits = absg.view(np.int32)
    total = 0.0
    for j in range(D):
        absg[j] = abs(g[j])
        total += absg[j]
        counts[bits[j] >> SELECT_SHIFT] += 1
    cut, seen = 0, 0
    while seen + counts[cut] < n4:
        seen += counts[cut]
        cut += 1
    room = n4 - seen  # pixels of the cut's own bin to take
    c = 0
    for j in range(D):
        b = bits[j] >> SELECT_SHIFT
        if b < cut or (b == cut and room > 0):
            if b == cut:
                room -= 1
            idx[c] = j
            c += 1
    near = np.empty(c, np.float32)
    for s in range(c):
        near[s] = absg[idx[s]]
    tau = _kth(near, min(nk, c) - 1)
    tau = max(tau, np.float32(tau_floor * total / D))
    return c, max(tau, np.float32(1e-30))


@numba.njit(cache=True, error_model="numpy")
def _kth(v, k):
    """The k-th smallest of v (0-based), v reordered in place: Hoare's selection, the middle
    element as pivot (np.partition does the same but takes numba 10 s more to compile)."""
    lo, hi = 0, v.shape[0] - 1
    while lo < hi:
        pivot = v[(lo + hi) // 2]
        i, j = lo, hi
        while i <= j:
            while v[i] < pivot:
                i += 1
            while v[j] > pivot:
                j -= 1
            if i <= j:
                v[i], v[j] = v[j], v[i]
                i += 1
                j -= 1
        if k <= j:
            hi = j
        elif k >= i:
            lo = i
        else:
            return v[k]
    return v[k]


@numba.njit(cache=True, fastmath=_FLAGS, error_model="numpy")
def _weighted_gram(cols, w, c):
    """sum over the first c columns s of w_s cols_s cols_s^T, (K, K) float64 (float32 sums)."""
    K = cols.shape[0]
    H = np.empty((K, K))
    for a in range(K):
        ca = cols[a]
        for b in range(a + 1):
            cb = cols[b]
            acc = np.float32(0.0)
            for s in range(c):
                acc += ca[s] * w[s] * cb[s]
            H[a, b] = acc
            H[b, a] = acc
    return H


@numba.njit(cache=True, error_model="numpy")
def _at(W, rows, lam, x, e, g, corner, M, q):
    """h(lam, e), with g, the corner at e and its margins M (``_pass_g``)."""
    _pass_g(W, rows, lam, x, e, g, corner, M, q)
    return (lam * M).sum()


@numba.njit(cache=True, error_model="numpy")
def _hessian(W, rows, x, g, e, idx, tau, cols, w):
    """Newton's Hessian (K, K): the density of h's kinks smoothed over the kernel's pixels idx,
    ``sum_j c_j a_j a_j^T`` with ``c_j = span_j / 2 tau^2 / (g_j^2 + tau^2)^1.5``."""
    K, c = rows.shape[0] - 1, idx.shape[0]
    top = W[rows[0]]
    for a in range(K):  # the kernel pixels' columns of W[t] - W[r_a], contiguous
        row = W[rows[a + 1]]
        for s in range(c):
            cols[a, s] = top[idx[s]] - row[idx[s]]
    t2 = tau * tau
    for s in range(c):
        j = idx[s]
        low, high = _ends(x[j], e)
        w[s] = (high - low) / 2 * t2 / (g[j] * g[j] + t2) ** 1.5
    return _weighted_gram(cols, w, c)


@numba.njit(cache=True, error_model="numpy")
def _direction(H, M, lam, h, damp):
    """Newton's step d (K,) on the simplex over the rivals free to move (with weight, or whose
    margin is below h), a rival without weight that it would push below zero held (three
    rounds), and how far it may go before a weight reaches zero."""
    K = lam.shape[0]
    free = (lam > 0) | (M < h)
    held = np.zeros(K, np.bool_)
    d = np.zeros(K)
    for _ in range(3):
        d = _kkt_step(H, M, free, damp)
        held = (lam <= 0) & (d < 0)
        if not held.any():
            break
        free &= ~held
    reach = np.inf
    for k in range(K):
        if held[k]:
            d[k] = 0.0
        if d[k] < 0:
            reach = min(reach, lam[k] / max(-d[k], 1e-300))
    return d, reach


@numba.njit(cache=True, error_model="numpy")
def _line_step(slope0, hist, grid):
    """The line search's step: the last grid point before h's slope along d (slope0 at 0,
    rising by hist's bins) turns >= 0; 0 where it does not fall at all."""
    if slope0 >= 0:
        return 0.0
    n = grid.shape[0]
    slope, last = slope0, n - 1
    for b in range(n):
        slope += hist[b]
        if slope >= 0:
            last = b - 1
            break
    return grid[last] if last >= 0 else 0.0


@numba.njit(cache=True, error_model="numpy")
def newton(W, rows, q, lam0, eps, x, steps, until_feasible, grid, c):
    """Newton's method on h(., eps) for every pair (search_torch.py ``newton``, the same steps):
    W (C, D) float32, rows (P, 1 + K) int64 (each pair's target, then its rivals), q (P, K) and
    lam0 (P, K) float64, eps (P,) float64, x (P, D) uint8, grid: ``Constants.grid()``, c:
    ``Numbers``.
    Returns the weights (P, K), h there (P,), eps (P,) (moved up where h < 0), and the weights'
    g (P, D) float32 and root (P,)."""
    (P, K), D = lam0.shape, W.shape[1]
    out = lam0.copy()
    out_h = np.zeros(P)
    out_e = eps.copy()
    out_g = np.empty((P, D), np.float32)
    out_r = np.empty(P)
    n = grid.shape[0]
    nk = min(c.kernel * K, D)
    n4 = min(4 * nk, D)
    g = np.empty(D, np.float32)
    gd = np.empty(D, np.float32)
    corner = np.empty(D, np.float32)
    kink = np.empty(D, np.float32)
    absg = np.empty(D, np.float32)
    M = np.empty(K)
    hist = np.empty(n + 1)
    rooms = np.empty(256)
    idx = np.empty(n4, np.int64)
    counts = np.empty(1 << (32 - SELECT_SHIFT), np.int64)
    w, cols = np.empty(n4, np.float32), np.empty((K, n4), np.float32)
    for p in range(P):
        lam, e, rp, xp, qp = lam0[p].copy(), np.float32(eps[p]), rows[p], x[p], q[p]
        for i in range(steps + 1):
            h = _at(W, rp, lam, xp, e, g, corner, M, qp)
            if i == steps or (until_feasible and M.min() > c.feasible):
                break
            if until_feasible and h < 0:  # no image within e: up to the root's next integer
                r = _rooms(g, xp, (lam * qp).sum(), rooms)[0]
                e = np.float32(min(max(np.floor(r) + 1, e + 1.0), 255.0))
                out_e[p] = e
                h = _at(W, rp, lam, xp, e, g, corner, M, qp)
            m, tau = _nearest(g, n4, nk, idx, absg, counts, c.tau_floor)
            H = _hessian(W, rp, xp, g, e, idx[:m], tau, cols, w)
            d, reach = _direction(H, M, lam, h, c.damp)
            hist[:] = 0.0
            slope0 = (d * qp).sum() + _pass_line(W, rp, d, g, xp, e, corner, gd, kink, hist,
                                                 c.bin_shift, c.first_bin)
            a = min(_line_step(slope0, hist, grid), reach, 2.0 ** c.line_octaves)
            for k in range(K):
                lam[k] = max(lam[k] + a * d[k], 0.0)
            lam /= max(lam.sum(), 1e-300)
        out[p] = lam
        out_h[p] = h
        out_g[p] = g
        out_r[p] = _rooms(g, xp, (lam * qp).sum(), rooms)[0]
    return out, out_h, out_e, out_g, out_r


@numba.njit(cache=True, fastmath=_FLAGS, error_model="numpy")
def _evaluate(W, rows, lam, q, x, g, step, M, rooms):
    """At the root r of h(lam, .) (inf: t cannot win): the corner's rival margins M (float64,
    float32 products) and h's slope in eps (search_torch.py ``evaluate``)."""
    _combine(W, rows, lam, g)
    r, slope = _rooms(g, x, (lam * q).sum(), rooms)
    e = np.float32(min(r, 255.0))
    for j in range(g.shape[0]):
        low, high = _ends(x[j], e)
        step[j] = high if g[j] > 0 else (low if g[j] < 0 else np.float32(0.0))
    _margins(W, rows, step, q, M)
    return r, slope


@numba.njit(cache=True, error_model="numpy")
def smo(W, rows, q, lam0, x, calls, c):
    """SMO with regula falsi on the root r(lam) for every pair (search_torch.py
    ``search_weights``): weight moves from o (the most satisfied rival with weight) to v (the
    most violated) along a segment, whose best point found in ``c.line_steps`` evaluations
    becomes the next base; a pair stops once settled (no margin short by more than
    ``c.converged`` times h's slope) or after ``calls`` evaluations. W (C, D) float32, rows
    (P, 1 + K) int64 (each pair's target, then its rivals), q and lam0 (P, K) float64, x (P, D)
    uint8, c: ``Numbers``. Returns the weights (P, K), their root r (P,) and h's slope there
    (P,)."""
    (P, K), D = lam0.shape, W.shape[1]
    out, out_r, out_s = lam0.copy(), np.empty(P), np.empty(P)
    g, step = np.empty(D, np.float32), np.empty(D, np.float32)
    rooms = np.empty(256)
    M, Mq = np.empty(K), np.empty(K)
    for p in range(P):
        lam = lam0[p].copy()
        r, slope = _evaluate(W, rows[p], lam, q[p], x[p], g, step, M, rooms)
        pt_lam, pt_r, pt_M, pt_s = lam.copy(), r, M.copy(), slope  # the segment's best point
        v, o, lo, phi_lo, hi, phi_hi, gamma, side, steps = _new_line(lam, M)
        for _ in range(calls - 1):
            if not np.isfinite(r) or max(-M.min(), 0.0) <= c.converged * max(slope, 1e-30):
                break
            query = lam.copy()
            query[v] += gamma
            query[o] -= gamma
            for k in range(K):
                query[k] = max(query[k], 0.0)
            rq, sq = _evaluate(W, rows[p], query, q[p], x[p], g, step, Mq, rooms)
            phi = Mq[v] - Mq[o]
            if rq > pt_r:
                pt_lam, pt_r, pt_M, pt_s = query, rq, Mq.copy(), sq
            at_end = np.isnan(phi_hi) and phi <= 0  # still rising at lam_o: o drops out
            if phi < 0:
                if side == -1:  # Illinois: halve a stale end's value
                    phi_hi /= 2
                lo, phi_lo, side = gamma, phi, -1
            else:
                if side == 1:
                    phi_lo /= 2
                hi, phi_hi, side = gamma, phi, 1
            nxt = lo - phi_lo * (hi - lo) / max(phi_hi - phi_lo, 1e-300)
            gamma = (lo + hi) / 2 if np.isnan(phi_hi) or np.isnan(nxt) else nxt
            steps += 1
            if steps >= c.line_steps or at_end:
                lam, r, M, slope = pt_lam.copy(), pt_r, pt_M.copy(), pt_s
                v, o, lo, phi_lo, hi, phi_hi, gamma, side, steps = _new_line(lam, M)
        out[p], out_r[p], out_s[p] = lam, r, slope
    return out, out_r, out_s


@numba.njit(cache=True)
def _new_line(lam, M):
    """A segment from lam: weight from o (largest margin with weight) to v (smallest)."""
    v = np.argmin(M)
    o, best = 0, -np.inf
    for k in range(M.shape[0]):
        if lam[k] > 0 and M[k] > best:
            o, best = k, M[k]
    top = lam[o]
    return v, o, 0.0, M[v] - M[o], top, np.nan, top, 0, 0


class NumbaBackend:
    """The search fused per pair (search.py ``Backend``): CPU tensors only."""

    name = "numba"

    def __init__(self, c: Constants | None = None):
        self.c = c or Constants()
        self._numbers, self._grid = Numbers(*dataclasses.astuple(self.c)), self.c.grid()

    def g(self, prob: Problem, lam: torch.Tensor) -> torch.Tensor:
        """(P, D) float32: lam (P, K) times W[t] - W[k], from W's rows (none stored)."""
        return torch.from_numpy(combine(*_rows_of(prob), _np(lam)))

    def root(self, prob: Problem, g: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
        """(P,) the root in eps of lq + sum_j |g_j| min(eps, R_j), in g's precision."""
        return torch.from_numpy(roots(g.contiguous().numpy(), _np(prob.x, None),
                                      lq.contiguous().numpy()))

    def search_weights(self, prob: Problem, lam: torch.Tensor, calls: int):
        out = smo(*_rows_of(prob), _np(prob.q), _np(lam), _np(prob.x, None), calls,
                  self._numbers)
        return tuple(torch.from_numpy(v) for v in out)

    def newton(self, prob: Problem, lam: torch.Tensor, eps: torch.Tensor, steps: int,
               until_feasible: bool = False):
        out = newton(*_rows_of(prob), _np(prob.q), _np(lam), _np(eps), _np(prob.x, None), steps,
                     until_feasible, self._grid, self._numbers)
        return tuple(torch.from_numpy(v) for v in out)


def _rows_of(prob: Problem):
    """W and each pair's rows of it, (P, 1 + K): the target, then the rivals."""
    return (_np(prob.model.W, torch.float32),
            _np(torch.cat([prob.t[:, None], prob.rivals], 1), torch.int64))


def _np(v: torch.Tensor, dtype=torch.float64):
    """A CPU tensor as a contiguous numpy array of dtype (None: its own), a view where it is
    one already."""
    return (v if dtype is None else v.to(dtype)).contiguous().numpy()
