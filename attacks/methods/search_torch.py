"""The LP dual of the minimal L-inf fooling distance, for one chunk of pairs (exact.py).

For weights lambda (P, K) on K rivals per pair, ``g = sum_k lambda_k (W[t] - W[k])`` and

    h(lambda, eps) = sum_k lambda_k q_k + sum_j |g_j| min(eps, R_j)   (R_j: the room to sign(g_j))

``Problem`` holds the pairs and their rivals and evaluates h's root in eps (one 256-bin histogram),
the corner ``clip(x + eps sign(g))`` and its rival margins, and the float64 certificate;
``search_weights`` moves weight between two rivals at a time (SMO, regula falsi) towards the largest
root; ``newton`` minimizes h(., eps) (Newton directions from the density of h's kinks, a line
search on h itself), which reaches the LP's duals; ``Problem.balanced`` is the LP's basic solution
for them. Shapes: x (P, D) uint8 pixels in 0..255, margins q (P, K) in score units. These are
batched torch steps over (P, K, D) rows, what a GPU runs; on a CPU ``search_weights``, ``newton``
and the certificate's root run the same steps fused per pair (search_numba.py, ``FUSED``),
with W's rows read by index instead of the rows W[t] - W[k].

Only numpy, torch and numba here: no Ray, no storage.
"""

from __future__ import annotations

import functools

import torch

from attacks.methods import search_numba
from attacks.methods.linear import BOUND_SLACK, LinearModel, _round_down
from attacks.methods.sign import LEVELS

KMAX = 8  # rivals in the dual search, nearest first (random 1,000-class models bind more)
LINE_STEPS = 3  # evaluations per line search before it settles on its best point
CONVERGED = 0.01  # stop once no rival's corner margin is short by more than this many levels
FEASIBLE = 1e-4  # a corner that beats every rival by this much (score units) is tried
KERNEL = 8  # Newton's Hessian: pixels per rival in the kernel around h's kinks (4x as many used)
TAU_FLOOR = 1e-3  # Newton's kernel is at least this wide, relative to the mean |g_j|
DAMP = 1e-3  # Newton's Hessian: damping, relative to its mean diagonal
LINE_GRID, LINE_OCTAVES = 16, 12  # Newton's line search: steps per octave (a power of 2),
# octaves each side of 1
BIN_SHIFT = 24 - LINE_GRID.bit_length()  # a float32's bits below its line search bin (exponent
# and the top log2(LINE_GRID) mantissa bits)
FIRST_BIN = (127 - LINE_OCTAVES) * LINE_GRID  # the bin of 2^-LINE_OCTAVES
WEIGHT_FLOOR = 1e-3  # rivals with less weight (relative to the most) are not balanced
RIDGE = 1e-6  # the tie system's ridge where LU's solution leaves the box (relative to L'L)
GROW = 8  # rivals added per round: the classes that beat the step that lost
DENSE_C = 128  # up to this many classes, products with all of W beat gathering rivals' rows
CERT_CHUNK = 16  # pairs per float64 product of the certificate: CERT_CHUNK x K x D x 8 bytes
GPU_CERT_CHUNK = 512  # on a GPU (2.8 GB for K = 56 at 64x64x3)
ROWS_CHUNK = 1024  # pairs whose rival rows are gathered at once (diff_rows)
COMPACT_AT = 0.75  # the search drops settled pairs once fewer than this fraction still move
FUSED = True  # on a CPU, the root search and Newton's method run fused per pair (search_numba.py)


class Problem:
    """One chunk of pairs: the K nearest rivals and their margins q_k (P, K).

    ``g = sum_k lam_k (W[t] - W[k])`` and the corner's rival margins are computed as products
    with W itself (a (P, C) x (C, D) product, W in cache) for few classes, and with the rows
    ``A = W[t] - W[rivals]`` (P, K, D), gathered once, for many.
    """

    def __init__(self, model: LinearModel, x, s, t, margin: float, rivals=None, q_all=None):
        self.model, self.x, self.t, self.margin = model, x, t, margin
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
        self.A = None if self.dense or fused(x) else diff_rows(model.W, t, rivals)  # (P, K, D)

    def grow(self, rows, S: torch.Tensor, lam: torch.Tensor) -> tuple[Problem, torch.Tensor]:
        """The pairs ``rows`` with up to GROW more rivals: the classes with the smallest margins
        over t in scores S (P', C) of a step that lost (those that beat it first); lam (P', K)
        padded with zeros for them. The rows W[t] - W[k] of the old rivals are copied once,
        straight into the new ones."""
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

    def g(self, lam: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """sum_k lam_k (W[t] - W[k]), (P, D), products in dtype."""
        lam = lam.to(dtype)
        if self.dense:
            coef = torch.zeros(len(lam), self.model.C, dtype=dtype, device=lam.device)
            coef.scatter_add_(1, self.rivals, -lam)
            coef.scatter_add_(1, self.t[:, None], lam.sum(1, keepdim=True))
            return coef @ self.model.W.to(dtype)
        if self.A is None and dtype == torch.float32:  # fused: from W's rows, none stored
            return torch.from_numpy(search_numba.combine(*_fused_rows(self), _np(lam)))
        return torch.bmm(lam[:, None, :], self.rows().to(dtype))[:, 0]

    def margins(self, step: torch.Tensor) -> torch.Tensor:
        """q_k + (W[t] - W[k]) . step for the K rivals, (P, K) float64."""
        if self.dense:
            ds = step @ self.model.W.T  # (P, C)
            gain = ds.gather(1, self.t[:, None]) - ds.gather(1, self.rivals)
        else:
            gain = dots(self.A, step)
        return self.q + gain.double()

    def evaluate(self, lam: torch.Tensor) -> dict:
        """At the root r (P,) of h(lam, .) (inf: t cannot win at all): the corner's rival
        margins M (P, K) and h's slope in eps (P,). Float32 products: this steers the search;
        the certificate is recomputed in float64."""
        g = self.g(lam)
        r, slope = root(self.histogram(g).double(), (lam * self.q).sum(1))
        M = self.margins(self.corner(g, r))
        return {"r": r, "M": M, "slope": slope}

    def rows(self) -> torch.Tensor:
        """(P, K, D) the rows W[t] - W[k] of the rivals."""
        if self.A is None:  # few classes, or fused: made when first needed, then kept
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

    def histogram(self, g: torch.Tensor, rows=None) -> torch.Tensor:
        """(P, 256): the sum of |g_j| over the pixels j whose room towards sign(g_j) is r; g of
        the pairs ``rows`` (None: all)."""
        up, dn = (self.up, self.dn) if rows is None else (
            self.up.index_select(0, rows), self.dn.index_select(0, rows))
        hist = torch.zeros(len(g), LEVELS, dtype=g.dtype, device=g.device)
        hist.scatter_add_(1, up, g.clamp(min=0))
        return hist.scatter_add_(1, dn, g.clamp(max=0).neg_())

    def corner(self, g: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The step (P, D) float32 to the corner clip(x + eps sign(g), 0, 255), eps (P,)."""
        step = torch.sign(g).mul_(eps.clamp(max=255).float()[:, None])
        return torch.clamp(step, self.lo, self.hi)

    def certificate(self, lam: torch.Tensor) -> torch.Tensor:
        """r(lam) recomputed in float64 from the float32 weights, shaved: a true lower bound."""
        W, b, t = self.model.W, self.model.b, self.t
        lam, rivals = lam.double().clamp(min=0), self.rivals
        if self.dense:
            g = self.g(lam, torch.float64)
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
        if fused(g):
            r = torch.from_numpy(search_numba.roots(g.contiguous().numpy(), _np(self.x, None),
                                                lq.contiguous().numpy()))
        else:
            r, _ = root(self.histogram(g), lq)
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


def root(hist: torch.Tensor, lq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Root in eps of ``lq + sum_r hist_r min(eps, r)`` (hist (P, 256) over integer rooms r) and
    the slope there; inf where it stays negative up to 255 (then nothing in 0..255 gets there)."""
    h = torch.arange(LEVELS, dtype=hist.dtype, device=hist.device)
    below = torch.cumsum(hist * h, 1) - hist * h  # sum over rooms < e of hist_r r
    above = hist.sum(1, keepdim=True) - (torch.cumsum(hist, 1) - hist)  # sum over rooms >= e
    val = lq[:, None] + below + h * above  # (P, 256): the function at e = 0..255
    ok = val >= 0
    e1 = ok.int().argmax(1)  # the first integer where it is >= 0
    v1 = val.gather(1, e1[:, None])[:, 0]
    v0 = val.gather(1, (e1 - 1).clamp(min=0)[:, None])[:, 0]
    frac = torch.where(v1 > v0, -v0 / (v1 - v0).clamp(min=1e-300), 1.0).clamp(0, 1)
    r = torch.where(e1 > 0, e1 - 1 + frac, 0.0)
    r = torch.where(ok.any(1), r, float("inf"))
    return r, above.gather(1, e1[:, None])[:, 0]


def newton(prob: Problem, lam: torch.Tensor, eps: torch.Tensor, steps: int,
           until_feasible: bool = False):
    """Weights (P, K) that minimize h(lam, eps) over the simplex, from lam: Newton directions
    with an exact line search on h itself.

    h(., eps) is convex and piecewise linear: its gradient is the corner's margins M, and its
    curvature comes from the pixels whose sign of g flips, each adding ``|a_j . d| (up_j + dn_j)``
    to the slope along d. The Hessian is that density, smoothed over the ``KERNEL * K`` pixels
    with the smallest |g_j| (``sum_j c_j a_j a_j^T``, ``c_j`` a kernel of width the largest of
    those |g_j|), damped; the step solves the KKT system on the simplex over the rivals free to
    move (with weight, or whose margin is below h and would take weight; one without weight
    that the step would push below zero is held). Along the step, h's minimum comes from its
    kinks (``line_min``), so h does not rise.

    ``until_feasible`` (the search for a step to store at the integer eps): a pair stops once its
    corner beats every rival (all of M > FEASIBLE), which is all that its step needs; and where
    h < 0, no image within eps beats these rivals, so its eps moves up to the next integer above
    the weights' root, and the search goes on there. Returns the weights, h there (P,) (the
    LP's best worst-case margin at eps, from above), eps (P,), and the weights' g (P, D) float32
    and root r (P,) (float32 products: to steer). On a CPU the same steps run fused per pair
    (search_numba.py).
    """
    if fused(lam):
        return _newton_cpu(prob, lam, eps, steps, until_feasible)
    P, K = lam.shape
    out, out_h = lam.double().clone(), torch.empty(P, dtype=torch.float64, device=lam.device)
    out_e = eps.double().clone()
    rows = torch.arange(P, device=lam.device)
    A, q, lam = prob.rows(), prob.q, out.clone()  # A (P, K, D)
    e = out_e.float()[:, None]
    low_end, span = _box(prob.lo, prob.hi, e)  # the corner's ends: g <= 0 and g > 0
    g = torch.bmm(lam.float()[:, None, :], A)[:, 0]  # (P, D)
    nk = min(KERNEL * K, A.shape[2])
    live = torch.ones(P, dtype=torch.bool, device=lam.device)  # not stopped yet
    for i in range(steps + 1):  # the last one only measures
        corner = _corner(g, low_end, span)
        M = q + dots(A, corner).double()  # h's gradient
        h = (lam * M).sum(1)
        stop = live & (M.amin(1) > FEASIBLE) if until_feasible else torch.zeros_like(live)
        if i == steps:
            stop = live
        if stop.any():
            out[rows[stop]], out_h[rows[stop]] = lam[stop], h[stop]
            live = live & ~stop
            if not live.any():
                break
            if (~live).float().mean() > 1 - COMPACT_AT:  # drop the stopped pairs (a copy of A)
                keep = live.nonzero()[:, 0]  # index_select: twice as fast as a mask here
                rows, A, q, lam, g, low_end, span, corner, M, h, e, live = (
                    v.index_select(0, keep) for v in (
                        rows, A, q, lam, g, low_end, span, corner, M, h, e, live))
        if until_feasible and (live & (h < 0)).any():  # no image within e: up to the root's
            low = (live & (h < 0)).nonzero()[:, 0]  # next integer
            r, _ = root(prob.histogram(g[low], rows[low]).double(), (lam[low] * q[low]).sum(1))
            e[low] = torch.maximum(torch.floor(r) + 1, e[low, 0].double() + 1).clamp(
                max=LEVELS - 1).float()[:, None]
            out_e[rows[low]] = e[low, 0].double()
            at = rows[low]
            low_end[low], span[low] = _box(prob.lo.index_select(0, at),
                                           prob.hi.index_select(0, at), e[low])
            corner[low] = _corner(g[low], low_end[low], span[low])
            M[low] = q[low] + dots(A.index_select(0, low), corner[low]).double()
            h[low] = (lam[low] * M[low]).sum(1)
        near, idx = g.abs().topk(min(4 * nk, A.shape[2]), 1, largest=False, sorted=False)
        tau = torch.maximum(near.kthvalue(nk, 1, keepdim=True).values,
                            TAU_FLOOR * g.abs().mean(1, keepdim=True))
        tau = tau.clamp(min=1e-30)  # pixels at g_j = 0 (rows of W equal there) count, finitely
        c = span.gather(1, idx) / 2 * tau * tau / (near * near + tau * tau) ** 1.5
        a = A.gather(2, idx[:, None, :].expand(len(A), K, idx.shape[1]))  # (P, K, 4 nk)
        H = torch.bmm(a * c[:, None, :], a.transpose(1, 2)).double()
        free = (lam > 0) | (M < h[:, None])
        for _ in range(3):  # hold the rivals without weight that the step would push below 0
            d = _kkt_step(H, M, free)
            held = (lam <= 0) & (d < 0)
            if not held.any():
                break
            free &= ~held
        d = torch.where(held, 0.0, d)
        reach = torch.where(d < 0, lam / (-d).clamp(min=1e-300), float("inf")).amin(1)
        gd = torch.bmm(d.float()[:, None, :], A)[:, 0]
        alpha = line_min(d, g, gd, q, corner, span, reach.clamp(max=2.0**LINE_OCTAVES))
        lam = (lam + alpha[:, None] * d).clamp(min=0)
        lam = lam / lam.sum(1, keepdim=True).clamp(min=1e-300)
        g = torch.bmm(lam.float()[:, None, :], A)[:, 0]
    g = prob.g(out)
    return out, out_h, out_e, g, root(prob.histogram(g).double(), (out * prob.q).sum(1))[0]


def fused(v: torch.Tensor) -> bool:
    """Whether the search over tensors on v's device runs fused per pair (search_numba.py):
    on a CPU, 2x faster than the batched torch steps, which run on a GPU."""
    return FUSED and v.device.type == "cpu"


def _newton_cpu(prob: Problem, lam, eps, steps: int, until_feasible: bool):
    """``newton`` on a CPU: the same steps, fused per pair (search_numba.py)."""
    out = search_numba.newton(
        *_fused_rows(prob), _np(prob.q), _np(lam), _np(eps), _np(prob.x, None), steps,
        until_feasible, _grid("cpu").numpy(), BIN_SHIFT, FIRST_BIN, KERNEL, TAU_FLOOR, DAMP,
        FEASIBLE, LINE_OCTAVES)
    return tuple(torch.from_numpy(v) for v in out)


def _fused_rows(prob: Problem):
    """W and each pair's rows of it, (P, 1 + K): the target, then the rivals."""
    return (_np(prob.model.W, torch.float32),
            _np(torch.cat([prob.t[:, None], prob.rivals], 1), torch.int64))


def _np(v: torch.Tensor, dtype=torch.float64):
    """A CPU tensor as a contiguous numpy array of dtype (None: its own), a view where it is
    one already."""
    return (v if dtype is None else v.to(dtype)).contiguous().numpy()


def _kkt_step(H, grad, free):
    """The Newton step (P, K) on the simplex: H d + nu 1 = -grad, sum d = 0, over the free
    rivals (the others stay), H damped by DAMP times its mean diagonal."""
    P, K = grad.shape
    eye = torch.eye(K, dtype=H.dtype, device=H.device).expand(P, K, K)
    H = torch.where(free[:, :, None] & free[:, None, :], H, eye)
    H = H + DAMP * eye * H.diagonal(0, 1, 2).abs().mean(1)[:, None, None]
    one = free.double()
    kkt = torch.cat([torch.cat([H, one[:, :, None]], 2),
                     torch.cat([one[:, None, :], H.new_zeros(P, 1, 1)], 2)], 1)
    rhs = torch.cat([-torch.where(free, grad, 0.0), H.new_zeros(P, 1)], 1)
    d = torch.nan_to_num(torch.linalg.solve_ex(kkt, rhs[:, :, None])[0][:, :K, 0])  # no sync
    return torch.where(free, d, 0.0)


def _box(lo, hi, e):
    """The corner's coordinate where g_j <= 0, ``max(lo, -e)`` = -dn_j, and its span up_j + dn_j
    to ``min(hi, e)``, where g_j > 0 (lo, hi (P, D): the step's box; e (P, 1))."""
    low_end = torch.maximum(lo, -e)
    return low_end, torch.minimum(hi, e) - low_end


def _corner(g, low_end, span):
    """The step to h's corner: up_j where g_j > 0, else -dn_j (no torch.where: a masked select
    runs at a sixth of the speed of arithmetic on CPUs, torch 2.13)."""
    return torch.addcmul(low_end, torch.sign(g).clamp_(min=0), span)


def line_min(d, g, gd, q, corner, span, reach) -> torch.Tensor:
    """A step a in [0, reach] (P,) that lowers h(lam + a d) - h(lam), where g and gd (P, D) are
    the g of lam and of d: ``a d.q + sum_j phi_j(g_j + a gd_j)``, phi_j(z) = up_j z for z > 0,
    -dn_j z below, is convex and piecewise linear in a. Its slope starts at ``d.q + gd.corner``
    (``corner``: up_j where g_j > 0, else -dn_j; ``span``: up_j + dn_j) and rises by
    ``|gd_j| span_j`` where pixel j's sign flips (a = -g_j / gd_j). The flips are binned on a grid
    of LINE_GRID steps per octave (one scatter and one sum, no sort, no masks): the step is the
    last grid point before the slope turns >= 0, so h only falls, and the minimum is at most one
    grid step further. A pixel at g_j = 0 counts as a flip at a = 0+ (right where gd_j > 0; where
    gd_j < 0 it only makes the step shorter)."""
    slope0 = (d * q).sum(1) + (gd * corner).sum(1).double()
    grid = _grid(g.device)
    n = len(grid)
    kink = g.div(gd).neg_().add_(0.0)  # -g/gd; + 0.0 turns -0.0 into 0.0
    # the bin of a kink: its float32 bits' exponent and top mantissa bits, the grid's point just
    # above it (log2 would take 5x as long). Kinks behind (negative), at infinity and NaN
    # (0 / 0) land in bin n, which is never summed.
    bins = ((kink.view(torch.int32) >> BIN_SHIFT) & ((1 << (32 - BIN_SHIFT)) - 1))
    bins = bins.sub_(FIRST_BIN).clamp_(0, n).long()
    hist = torch.zeros(len(g), n + 1, dtype=torch.float64, device=g.device)
    hist.scatter_add_(1, bins, gd.abs().mul_(span).double())
    slope = slope0[:, None] + hist.cumsum(1)[:, :-1]  # (P, n): the slope just after each grid
    turns = slope >= 0  # point
    last = torch.where(turns.any(1), turns.int().argmax(1) - 1, n - 1)
    a = torch.where(last >= 0, grid.double()[last.clamp(min=0)], 0.0)
    return torch.minimum(torch.where(slope0 >= 0, 0.0, a), reach)


def _grid(device) -> torch.Tensor:
    """The line search's step sizes (float32), LINE_GRID per octave from 2^-LINE_OCTAVES to
    2^LINE_OCTAVES: the upper ends of the bins of the float32 bit pattern, ``2^E (1 + (m + 1) /
    LINE_GRID)`` (the kinks in bin i lie in [grid[i - 1], grid[i]))."""
    bins = torch.arange(FIRST_BIN + 1, FIRST_BIN + 2 * LINE_OCTAVES * LINE_GRID + 1,
                        dtype=torch.int32, device=device)  # made there: no copy to a GPU per step
    return (bins << BIN_SHIFT).view(torch.float32)


def search_weights(prob: Problem, lam: torch.Tensor, calls: int):
    """Dual weights (P, K) by SMO with regula falsi, from lam: the largest root r(lam) found.

    At the root the corner's margins M satisfy ``lam . M = 0``, and lam is optimal when no
    M_k < 0. Otherwise weight moves from o (the most satisfied rival with weight) to v (the most
    violated) along ``lam + gamma (e_v - e_o)``, 0 <= gamma <= lam_o: the root is unimodal along
    it and peaks where ``M_v = M_o``, the zero that the line search brackets. Returns the best
    weights (P, K), their root r (P,) and h's slope in eps there (P,).
    """
    if fused(lam):
        out = search_numba.search(*_fused_rows(prob), _np(prob.q), _np(lam), _np(prob.x, None),
                              calls, LINE_STEPS, CONVERGED)
        return tuple(torch.from_numpy(v) for v in out)
    P, K = lam.shape
    best = {"lam": lam.clone(),
            "r": torch.full((P,), -float("inf"), dtype=torch.float64, device=lam.device),
            "slope": torch.zeros(P, dtype=torch.float64, device=lam.device)}
    ids = torch.arange(P, device=lam.device)
    base = prob.evaluate(lam)
    base["lam"] = lam.clone()
    ls = _new_line(base)
    for _ in range(calls - 1):
        done = _settled(base)
        if done.any():  # record the settled pairs, keep searching with the rest
            _record(best, ids[done], {k: base[k][done] for k in best})
        if done.all():
            return best["lam"], best["r"], best["slope"]
        if done.float().mean() > 1 - COMPACT_AT:
            keep = ~done
            ids, prob = ids[keep], prob.subset(keep)
            base = {k: v[keep] for k, v in base.items()}
            ls = {k: v[keep] for k, v in ls.items()}
        rows = torch.arange(len(ids), device=lam.device)
        query = base["lam"] + ls["gamma"][:, None] * (onehot(ls["v"], K) - onehot(ls["o"], K))
        ev = prob.evaluate(query.clamp(min=0))
        ev["lam"] = query.clamp(min=0)
        phi = ev["M"][rows, ls["v"]] - ev["M"][rows, ls["o"]]
        better = ev["r"] > ls["r"]  # the best point of the segment so far
        for key in KEYS:
            ls[key][better] = ev[key][better]
        _regula_falsi(ls, phi)
        ls["steps"] += 1
        end = (ls["steps"] >= LINE_STEPS) | ls["at_end"]
        if end.any():
            for key in KEYS:
                base[key][end] = ls[key][end]
            new = _new_line(base)
            for key, v in new.items():
                ls[key][end] = v[end]
    _record(best, ids, {k: base[k] for k in best})
    return best["lam"], best["r"], best["slope"]


KEYS = ("lam", "r", "M", "slope")  # what a point of the search holds


def _settled(base: dict) -> torch.Tensor:
    short = (-base["M"].amin(1)).clamp(min=0)
    return (short <= CONVERGED * base["slope"].clamp(min=1e-30)) | ~torch.isfinite(base["r"])


def _record(best: dict, ids, new: dict) -> None:
    better = new["r"] > best["r"][ids]
    for k in best:
        best[k][ids[better]] = new[k][better]


def onehot(i: torch.Tensor, K: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(i, K).double()


def _new_line(base: dict) -> dict:
    """A line search from base: weight from o (largest M with weight) to v (smallest M)."""
    M, lam = base["M"], base["lam"]
    rows = torch.arange(len(M), device=M.device)
    v = M.argmin(1)
    o = torch.where(lam > 0, M, -float("inf")).argmax(1)
    top = lam[rows, o]
    phi0 = M[rows, v] - M[rows, o]  # < 0 unless settled
    return {"v": v, "o": o, "lo": torch.zeros_like(top), "phi_lo": phi0, "hi": top,
            "phi_hi": torch.full_like(top, float("nan")), "gamma": top.clone(),
            "side": torch.zeros_like(v), "steps": torch.zeros_like(v),
            "at_end": torch.zeros_like(v, dtype=torch.bool),
            **{k: base[k].clone() for k in KEYS}}


def _regula_falsi(ls: dict, phi: torch.Tensor) -> None:
    """Update the bracket [lo, hi] of the zero of phi (phi(lo) < 0) with phi at ls["gamma"],
    and choose the next gamma (Illinois: halve a stale end's value)."""
    g = ls["gamma"]
    first = torch.isnan(ls["phi_hi"])
    ls["at_end"] = first & (phi <= 0)  # still rising at gamma = lam_o: o drops out, stop there
    neg = phi < 0
    stale_hi, stale_lo = neg & (ls["side"] == -1), ~neg & (ls["side"] == 1)
    ls["phi_hi"] = torch.where(stale_hi, ls["phi_hi"] / 2, ls["phi_hi"])
    ls["phi_lo"] = torch.where(stale_lo, ls["phi_lo"] / 2, ls["phi_lo"])
    ls["lo"], ls["phi_lo"] = torch.where(neg, g, ls["lo"]), torch.where(neg, phi, ls["phi_lo"])
    ls["hi"], ls["phi_hi"] = torch.where(neg, ls["hi"], g), torch.where(neg, ls["phi_hi"], phi)
    ls["side"] = torch.where(neg, -1, 1)
    span = (ls["phi_hi"] - ls["phi_lo"]).clamp(min=1e-300)
    nxt = ls["lo"] - ls["phi_lo"] * (ls["hi"] - ls["lo"]) / span
    ls["gamma"] = torch.where(torch.isnan(nxt), (ls["lo"] + ls["hi"]) / 2, nxt)
