"""The dual search as batched torch steps over (P, K, D) rows: the backend a GPU runs
(docs/exact.md; the interface in search.py).

``search_weights`` moves weight between two rivals at a time (SMO, regula falsi) towards the
largest root r(lam) of h(lam, .) (one 256-bin histogram per pair, ``root``); ``newton``
minimizes h(., eps) (Newton directions from the smoothed density of h's kinks, a line search on
h itself), which reaches the LP's duals. Shapes: lam (P, K) float64, g (P, D) float32, eps and r
(P,) in pixel levels.

Only torch here: no Ray, no storage.
"""

from __future__ import annotations

import torch

from attacks.methods.problem import Constants, Problem, dots, onehot
from attacks.methods.sign import LEVELS

COMPACT_AT = 0.75  # the search drops settled pairs once fewer than this fraction still move


class TorchBackend:
    """The search in batched torch steps (search.py ``Backend``), on any device."""

    name = "torch"

    def __init__(self, c: Constants | None = None):
        self.c, self._grids = c or Constants(), {}

    def g(self, prob: Problem, lam: torch.Tensor) -> torch.Tensor:
        """(P, D) float32: lam (P, K) times the rows W[t] - W[k] (gathered once, kept)."""
        return torch.bmm(lam.float()[:, None, :], prob.rows())[:, 0]

    def root(self, prob: Problem, g: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
        """(P,) the root in eps of lq + sum_j |g_j| min(eps, R_j), in g's precision."""
        return root(histogram(prob, g), lq)[0]

    def search_weights(self, prob: Problem, lam: torch.Tensor, calls: int):
        return search_weights(prob, lam, calls, self.c)

    def newton(self, prob: Problem, lam: torch.Tensor, eps: torch.Tensor, steps: int,
               until_feasible: bool = False):
        return newton(prob, lam, eps, steps, until_feasible, self.c, self.grid(lam.device))

    def grid(self, device: torch.device) -> torch.Tensor:
        """The line search's step sizes (float32) on ``device``, copied there once."""
        if device not in self._grids:
            self._grids[device] = torch.from_numpy(self.c.grid()).to(device)
        return self._grids[device]


def evaluate(prob: Problem, lam: torch.Tensor) -> dict:
    """At the root r (P,) of h(lam, .) (inf: t cannot win at all): the corner's rival
    margins M (P, K) and h's slope in eps (P,). Float32 products: this steers the search;
    the certificate is recomputed in float64."""
    g = prob.g(lam)
    r, slope = root(histogram(prob, g).double(), (lam * prob.q).sum(1))
    M = prob.margins(prob.corner(g, r))
    return {"r": r, "M": M, "slope": slope}


def histogram(prob: Problem, g: torch.Tensor, rows=None) -> torch.Tensor:
    """(P, 256): the sum of |g_j| over the pixels j whose room towards sign(g_j) is r; g of
    the pairs ``rows`` (None: all)."""
    up, dn = (prob.up, prob.dn) if rows is None else (
        prob.up.index_select(0, rows), prob.dn.index_select(0, rows))
    hist = torch.zeros(len(g), LEVELS, dtype=g.dtype, device=g.device)
    hist.scatter_add_(1, up, g.clamp(min=0))
    return hist.scatter_add_(1, dn, g.clamp(max=0).neg_())


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
           until_feasible: bool, c: Constants, grid: torch.Tensor):
    """Weights (P, K) that minimize h(lam, eps) over the simplex, from lam: Newton directions
    with an exact line search on h itself.

    h(., eps) is convex and piecewise linear: its gradient is the corner's margins M, and its
    curvature comes from the pixels whose sign of g flips, each adding ``|a_j . d| (up_j + dn_j)``
    to the slope along d. The Hessian is that density smoothed by a kernel of width tau, the
    ``c.kernel * K``-th smallest |g_j|, over the 4x as many pixels nearest a kink
    (``sum_j w_j a_j a_j^T``, docs/exact.md section 7), damped; the step solves the KKT system
    on the simplex over the rivals free to move (with weight, or whose margin is below h and
    would take weight; one without weight that the step would push below zero is held). Along
    the step, h's minimum comes from its kinks (``line_min``), so h does not rise.

    ``until_feasible`` (the search for a step to store at the integer eps): a pair stops once its
    corner beats every rival (all of M > c.feasible), which is all that its step needs; and where
    h < 0, no image within eps beats these rivals, so its eps moves up to the next integer above
    the weights' root, and the search goes on there. Returns the weights, h there (P,) (the
    LP's best worst-case margin at eps, from above), eps (P,), and the weights' g (P, D) float32
    and root r (P,) (float32 products: to steer). ``grid``: ``c.grid()`` on lam's device.
    """
    P, K = lam.shape
    out, out_h = lam.double().clone(), torch.empty(P, dtype=torch.float64, device=lam.device)
    out_e = eps.double().clone()
    rows = torch.arange(P, device=lam.device)
    A, q, lam = prob.rows(), prob.q, out.clone()  # A (P, K, D)
    e = out_e.float()[:, None]
    low_end, span = _box(prob.lo, prob.hi, e)  # the corner's ends: g <= 0 and g > 0
    g = torch.bmm(lam.float()[:, None, :], A)[:, 0]  # (P, D)
    nk = min(c.kernel * K, A.shape[2])
    live = torch.ones(P, dtype=torch.bool, device=lam.device)  # not stopped yet
    for i in range(steps + 1):  # the last one only measures
        corner = _corner(g, low_end, span)
        M = q + dots(A, corner).double()  # h's gradient
        h = (lam * M).sum(1)
        stop = live & (M.amin(1) > c.feasible) if until_feasible else torch.zeros_like(live)
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
            r, _ = root(histogram(prob, g[low], rows[low]).double(), (lam[low] * q[low]).sum(1))
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
                            c.tau_floor * g.abs().mean(1, keepdim=True))
        tau = tau.clamp(min=1e-30)  # pixels at g_j = 0 (rows of W equal there) count, finitely
        w = span.gather(1, idx) / 2 * tau * tau / (near * near + tau * tau) ** 1.5
        a = A.gather(2, idx[:, None, :].expand(len(A), K, idx.shape[1]))  # (P, K, 4 nk)
        H = torch.bmm(a * w[:, None, :], a.transpose(1, 2)).double()
        free = (lam > 0) | (M < h[:, None])
        for _ in range(3):  # hold the rivals without weight that the step would push below 0
            d = _kkt_step(H, M, free, c.damp)
            held = (lam <= 0) & (d < 0)
            if not held.any():
                break
            free &= ~held
        d = torch.where(held, 0.0, d)
        reach = torch.where(d < 0, lam / (-d).clamp(min=1e-300), float("inf")).amin(1)
        gd = torch.bmm(d.float()[:, None, :], A)[:, 0]
        alpha = line_min(d, g, gd, q, corner, span, reach.clamp(max=2.0**c.line_octaves), c, grid)
        lam = (lam + alpha[:, None] * d).clamp(min=0)
        lam = lam / lam.sum(1, keepdim=True).clamp(min=1e-300)
        g = torch.bmm(lam.float()[:, None, :], A)[:, 0]
    g = prob.g(out)
    return out, out_h, out_e, g, root(histogram(prob, g).double(), (out * prob.q).sum(1))[0]


def _kkt_step(H, grad, free, damp: float):
    """The Newton step (P, K) on the simplex: H d + nu 1 = -grad, sum d = 0, over the free
    rivals (the others stay), H damped by ``damp`` times its mean diagonal."""
    P, K = grad.shape
    eye = torch.eye(K, dtype=H.dtype, device=H.device).expand(P, K, K)
    H = torch.where(free[:, :, None] & free[:, None, :], H, eye)
    H = H + damp * eye * H.diagonal(0, 1, 2).abs().mean(1)[:, None, None]
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


def line_min(d, g, gd, q, corner, span, reach, c: Constants,
             grid: torch.Tensor) -> torch.Tensor:
    """A step a in [0, reach] (P,) that lowers h(lam + a d) - h(lam), where g and gd (P, D) are
    the g of lam and of d: ``a d.q + sum_j phi_j(g_j + a gd_j)``, phi_j(z) = up_j z for z > 0,
    -dn_j z below, is convex and piecewise linear in a. Its slope starts at ``d.q + gd.corner``
    (``corner``: up_j where g_j > 0, else -dn_j; ``span``: up_j + dn_j) and rises by
    ``|gd_j| span_j`` where pixel j's sign flips (a = -g_j / gd_j). The flips are binned on
    ``grid`` (``c.grid()`` on g's device: c.line_grid steps per octave; one scatter and one sum,
    no sort, no masks): the step is the last grid point before the slope turns >= 0, so h only
    falls, and the minimum is at most one grid step further. A pixel at g_j = 0 counts as a flip
    at a = 0+ (right where gd_j > 0; where gd_j < 0 it only makes the step shorter)."""
    slope0 = (d * q).sum(1) + (gd * corner).sum(1).double()
    n = len(grid)
    kink = g.div(gd).neg_().add_(0.0)  # -g/gd; + 0.0 turns -0.0 into 0.0
    # the bin of a kink: its float32 bits' exponent and top mantissa bits, the grid's point just
    # above it (log2 would take 5x as long). Kinks behind (negative), at infinity and NaN
    # (0 / 0) land in bin n, which is never summed.
    bins = ((kink.view(torch.int32) >> c.bin_shift) & ((1 << (32 - c.bin_shift)) - 1))
    bins = bins.sub_(c.first_bin).clamp_(0, n).long()
    hist = torch.zeros(len(g), n + 1, dtype=torch.float64, device=g.device)
    hist.scatter_add_(1, bins, gd.abs().mul_(span).double())
    slope = slope0[:, None] + hist.cumsum(1)[:, :-1]  # (P, n): the slope just after each grid
    turns = slope >= 0  # point
    last = torch.where(turns.any(1), turns.int().argmax(1) - 1, n - 1)
    a = torch.where(last >= 0, grid.double()[last.clamp(min=0)], 0.0)
    return torch.minimum(torch.where(slope0 >= 0, 0.0, a), reach)


def search_weights(prob: Problem, lam: torch.Tensor, calls: int, c: Constants):
    """Dual weights (P, K) by SMO with regula falsi, from lam: the largest root r(lam) found.

    At the root the corner's margins M satisfy ``lam . M = 0``, and lam is optimal when no
    M_k < 0. Otherwise weight moves from o (the most satisfied rival with weight) to v (the most
    violated) along ``lam + gamma (e_v - e_o)``, 0 <= gamma <= lam_o: the root is unimodal along
    it and peaks where ``M_v = M_o``, the zero that the line search brackets. Returns the best
    weights (P, K), their root r (P,) and h's slope in eps there (P,).
    """
    P, K = lam.shape
    best = {"lam": lam.clone(),
            "r": torch.full((P,), -float("inf"), dtype=torch.float64, device=lam.device),
            "slope": torch.zeros(P, dtype=torch.float64, device=lam.device)}
    ids = torch.arange(P, device=lam.device)
    base = evaluate(prob, lam)
    base["lam"] = lam.clone()
    ls = _new_line(base)
    for _ in range(calls - 1):
        done = _settled(base, c.converged)
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
        ev = evaluate(prob, query.clamp(min=0))
        ev["lam"] = query.clamp(min=0)
        phi = ev["M"][rows, ls["v"]] - ev["M"][rows, ls["o"]]
        better = ev["r"] > ls["r"]  # the best point of the segment so far
        for key in KEYS:
            ls[key][better] = ev[key][better]
        _regula_falsi(ls, phi)
        ls["steps"] += 1
        end = (ls["steps"] >= c.line_steps) | ls["at_end"]
        if end.any():
            for key in KEYS:
                base[key][end] = ls[key][end]
            new = _new_line(base)
            for key, v in new.items():
                ls[key][end] = v[end]
    _record(best, ids, {k: base[k] for k in best})
    return best["lam"], best["r"], best["slope"]


KEYS = ("lam", "r", "M", "slope")  # what a point of the search holds


def _settled(base: dict, converged: float) -> torch.Tensor:
    short = (-base["M"].amin(1)).clamp(min=0)
    return (short <= converged * base["slope"].clamp(min=1e-30)) | ~torch.isfinite(base["r"])


def _record(best: dict, ids, new: dict) -> None:
    better = new["r"] > best["r"][ids]
    for k in best:
        best[k][ids[better]] = new[k][better]


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
