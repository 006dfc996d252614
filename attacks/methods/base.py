"""Fooling images for a linear classifier: the base of the attacks, one file per attack beside it.

Every attack takes a batch of images x targets and returns, for each pair, the *stored* uint8
image, its scores (re-scored with the model: everything reported is measured on the bytes that
are kept) and the strength used. Pairs are rows in image-major order: pair ``i * T + j`` is image
``i`` with target ``targets[j]``.

    >>> attack = Template(model)                       # or Sign(model), Iterative(model)
    >>> fooled = attack(X, model.scores(X), targets)  # X (N, D) uint8 -> N*T stored images

``StepAttack`` is the shape of the one-direction attacks (template, sign): the stored image at grid
index k is ``clip(round(x + (k / res) d), 0, 255)``. The smallest k is first computed on the
linear model in O(C) per pair (DESIGN.md: along d, ``s(x + a d) = s(x) + a W d``), then verified
on the stored image; only where clipping or rounding break linearity does a search (galloping,
then bisection) re-score more candidates. Where a pair passes at k, one cheap dot product usually
proves that k - 1 fails (``s_t - s_k*`` for one competitor k* on the stored k - 1 image); a full
re-score settles the rest. So the reported k passes and k - 1 does not. ``Sign`` replaces this
search with an exact one (sign.py): its eps is the smallest in 1..255, clipping included.

Only numpy and torch here: no Ray, no storage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from attacks.methods.linear import LinearModel, passes
from common import heap

CERT_RTOL = 1e-5  # a one-competitor proof of failure needs a margin beyond this relative error


@dataclass
class Fooled:
    """The outcome for P pairs: stored images (P, D) uint8, their scores (P, C), strength (P,);
    ``bound``, ``bound_l2`` (P,): certified lower bounds on the L-inf and L2 distance, where the
    attack proves one."""

    images: torch.Tensor
    scores: torch.Tensor
    strength: torch.Tensor
    bound: torch.Tensor | None = None
    bound_l2: torch.Tensor | None = None


def pairs(n_images: int, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Image index and target (each (N*T,)) of every pair, image-major."""
    n = torch.arange(n_images, device=targets.device).repeat_interleave(len(targets))
    return n, targets.repeat(n_images)


def pairs_that_fit(device: torch.device, per_pair: float, share: float, least: int,
                   most: int) -> int:
    """How many pairs of ``per_pair`` bytes ``share`` of the GPU's free memory holds, between
    ``least`` and ``most`` (the job's default batch, exact's chunks)."""
    return int(min(max(share * heap.gpu_free(device) // per_pair, least), most))


def expand(A: torch.Tensor, T: int) -> torch.Tensor:
    """Rows of A (N, ...) repeated T times each, image-major: (N*T, ...), one plain copy."""
    return A[:, None].expand(A.shape[0], T, *A.shape[1:]).reshape(A.shape[0] * T, *A.shape[1:])


class Attack:
    """An attack on a ``LinearModel``: ``attack(X, S, targets) -> Fooled``.

    Args:
        model: the classifier; pixels in 0..255.
        confidence: stop only when the target's softmax probability reaches this (else at the
            first image predicted as the target).
    """

    name = "base"

    def __init__(self, model: LinearModel, confidence: float | None = None):
        self.model, self.confidence = model, confidence

    def __call__(self, X: torch.Tensor, S: torch.Tensor, targets: torch.Tensor) -> Fooled:
        """X (N, D) uint8 originals, S (N, C) their scores, targets (T,) int64 -> N*T pairs."""
        raise NotImplementedError

    @property
    def margin(self) -> float:
        """The score margin over every other class that success requires (for the bounds)."""
        c = self.confidence
        return max(0.0, math.log(c / (1 - c))) if c is not None and c < 1 else 0.0

    def passes(self, S: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return passes(S, t, self.confidence)


class StepAttack(Attack):
    """One direction d per pair; strength ``a = k / res`` for integer k in 0..255 * res."""

    res = 1  # grid points per pixel level

    @property
    def kmax(self) -> int:
        return 255 * self.res

    def direction(self, X, S, targets) -> tuple[torch.Tensor, torch.Tensor]:
        """Per pair, the direction d (P, D) and the score change per unit step g = W d (P, C)."""
        raise NotImplementedError

    def image_at(self, x: torch.Tensor, d: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The stored image at grid index k: clip(round(x + (k / res) d), 0, 255), uint8."""
        a = (k.to(torch.float32) / self.res)[:, None]
        return torch.floor(x.to(torch.float32) + a * d + 0.5).clamp_(0, 255).to(torch.uint8)

    def __call__(self, X, S, targets):
        _, t = pairs(len(X), targets)
        d, g = self.direction(X, S, targets)
        x, s = expand(X, len(targets)), expand(S, len(targets))
        k0 = first_success(s, g, t, self.res, self.kmax, self.confidence)
        return self.search(x, d, s, g, t, k0)

    def search(self, x, d, s, g, t, k0) -> Fooled:
        """Smallest k (in the sense: k passes on the stored image, k - 1 does not) from guess k0.

        Each round looks at one candidate per unsettled pair: k0 first. A candidate that one
        competitor already rules out costs no scoring; above a failure it gallops up (+1, +2, +4,
        ..., or less where a Newton step on that competitor's margin says the target is nearer:
        along a clipped path the target may win only in a narrow window), below a pass it gallops
        down (-1, -2, ...) until bisection between a known failure and a pass is closer.
        """
        P, dev = len(t), t.device
        done = self.passes(s, t)
        lo = torch.where(done, -1, 0).to(dev)  # largest index known to fail (0: the original)
        hi = torch.where(done, 0, self.kmax + 1).to(dev)  # smallest index known to pass
        up = torch.ones(P, dtype=torch.long, device=dev)  # gallop widths
        down, jump = torch.ones_like(up), torch.zeros_like(up)
        images, scores = x.clone(), s.clone()
        # no step works on the linear model: clipping may still open a window, so climb from
        # (just below) the certified bound instead of trying only the strongest step
        bound, _ = self.model.bounds(s, t, self.margin)
        start = (torch.floor(bound.double() * self.res) - self.res).clamp(1, self.kmax).long()
        probe = torch.where(k0 > self.kmax, start, k0).clamp(1, self.kmax)
        while True:
            todo = ((lo + 1 < hi) & (lo < self.kmax)).nonzero()[:, 0]
            if len(todo) == 0:
                break
            k = probe[todo]
            m, tol, step = self.rival_margin(x[todo], d[todo], s[todo], g[todo], t[todo], k)
            cheap = self.fails(m, tol) & (k < self.kmax)  # surely fails: no need to score it
            ok = torch.zeros_like(cheap)
            rest = (~cheap).nonzero()[:, 0]
            xi = self.image_at(x[todo[rest]], d[todo[rest]], k[rest])
            Si = self.model.scores(xi)
            ok[rest] = self.passes(Si, t[todo[rest]])
            keep = ok[rest] | (k[rest] == self.kmax)  # a pass, or a never-passing pair's last try
            images[todo[rest[keep]]], scores[todo[rest[keep]]] = xi[keep], Si[keep]
            hi[todo[ok]], lo[todo[~ok]] = k[ok], k[~ok]
            up[todo[~ok]] *= 2
            down[todo[ok]] *= 2
            jump[todo] = torch.where(step > 0, torch.ceil(-m / step.clamp(min=1e-30)), 0).clamp(
                0, self.kmax).long()
            won = todo[ok]
            m1, tol1, _ = self.rival_margin(x[won], d[won], s[won], g[won], t[won], hi[won] - 1)
            sure = won[self.fails(m1, tol1) & (hi[won] > 1)]
            lo[sure] = hi[sure] - 1
            below = torch.maximum((lo + hi) // 2, hi - down // 2)
            above = lo + torch.where(jump > 0, torch.minimum(jump, up // 2), up // 2)
            probe = torch.where(hi <= self.kmax, below, above.clamp(max=self.kmax))
        strength = torch.where(hi <= self.kmax, hi, self.kmax).float() / self.res
        return Fooled(images, scores, strength)

    def rival_margin(self, x, d, s, g, t, k):
        """The exact margin of t over its strongest rival k* on the stored image at index k.

        k* is the strongest rival on the linear model at k; the margin
        ``(s_t - s_k*) + (W[t] - W[k*]) . (x_k - x)`` is one dot product per pair, not a scoring.
        Returns (P,) margin, its float tolerance, and the linear change of the margin per index.
        """
        lin = s + (k.float() / self.res)[:, None] * g
        lin.scatter_(1, t[:, None], -float("inf"))
        rival = lin.argmax(1)
        delta = self.image_at(x, d, k).to(torch.float32) - x.to(torch.float32)
        terms = (self.model.W[t] - self.model.W[rival]) * delta
        st, sr = s.gather(1, t[:, None])[:, 0], s.gather(1, rival[:, None])[:, 0]
        gap = st - sr
        tol = CERT_RTOL * (st.abs() + sr.abs() + terms.abs().sum(1)) + 1e-6
        step = (g.gather(1, t[:, None])[:, 0] - g.gather(1, rival[:, None])[:, 0]) / self.res
        return gap + terms.sum(1) - self.margin, tol, step

    def fails(self, m: torch.Tensor, tol: torch.Tensor) -> torch.Tensor:
        """Where a rival margin (less the confidence's log-odds) proves failure.

        t loses to the rival if its margin is negative; with a confidence P,
        ``p_t <= sigmoid(margin) < P`` exactly when the margin is below log(P / (1 - P)).
        """
        return m < -tol


def first_success(s, g, t, res: int, kmax: int, confidence: float | None) -> torch.Tensor:
    """Smallest grid index k where t wins along s + (k / res) g on the linear model (no clipping).

    s, g (P, C) scores and score change per unit step, t (P,) targets. Along the ray each margin
    ``s_t - s_j`` is affine in a, so where t is the argmax is an interval, found in O(C) per pair;
    with a confidence, log p_t is concave in a and its superlevel set is found by bisection.
    Returns (P,) int64, kmax + 1 where no k in 0..kmax works.
    """
    m = s.gather(1, t[:, None]) - s  # (P, C) margins of t now
    dg = g.gather(1, t[:, None]) - g  # (P, C) their slopes
    rival = torch.ones_like(m, dtype=torch.bool).scatter_(1, t[:, None], False)
    with torch.no_grad():
        lower = torch.where(rival & (dg > 0), -m / dg, -float("inf")).amax(1)
        upper = torch.where(rival & (dg < 0), -m / dg, float("inf")).amin(1)
        stuck = (rival & (dg == 0) & (m <= 0)).any(1)
    k_lo = torch.floor(lower * res).clamp(-1, kmax + 1).long() + 1
    k_hi = (torch.ceil(upper * res).clamp(0, kmax + 2) - 1).long()
    ok = ~stuck & (k_lo <= k_hi) & (k_lo <= kmax)
    if confidence is not None:
        k_conf = _first_confident(m, dg, res, kmax, math.log(confidence))
        k_lo = torch.maximum(k_lo, k_conf)
        logp = -torch.logsumexp(-m - (k_lo.float() / res)[:, None] * dg, 1)
        ok &= (k_lo <= k_hi.clamp(max=kmax)) & (logp >= math.log(confidence))
    return torch.where(ok, k_lo, kmax + 1)


def _first_confident(m, dg, res: int, kmax: int, log_p: float) -> torch.Tensor:
    """Smallest grid k with log p_t(k / res) >= log_p; log p_t(a) = -LSE(-m - a dg) is concave."""

    def logp(k):
        return -torch.logsumexp(-m - (k.float() / res)[:, None] * dg, 1)

    def slope(k):  # d/da log p_t = sum_j p_j(a) dg_j, decreasing in a
        z = -m - (k.float() / res)[:, None] * dg
        return (torch.softmax(z, 1) * dg).sum(1)

    P, iters = len(m), math.ceil(math.log2(kmax + 2))
    lo = torch.zeros(P, dtype=torch.long, device=m.device)  # find the last k with slope >= 0
    hi = torch.full_like(lo, kmax)
    for _ in range(iters):
        mid = (lo + hi + 1) // 2
        up = slope(mid) >= 0
        lo, hi = torch.where(up, mid, lo), torch.where(up, hi, mid - 1)
    peak = lo
    lo, hi = torch.zeros_like(peak), peak  # on [0, peak] log p_t rises: the first k above log_p
    for _ in range(iters):
        mid = (lo + hi) // 2
        good = logp(mid) >= log_p
        lo, hi = torch.where(good, lo, mid + 1), torch.where(good, mid, hi)
    return torch.where(logp(hi) >= log_p, hi, kmax + 1)
