"""The exact minimal L-inf fooling distance of a linear classifier, certified by LP duality.

For one image x (D,) in 0..255 and a target t, with margins ``q_k = s_t - s_k - margin`` and
``a_k = W[t] - W[k]`` (k != t), the smallest eps at which some image of the box
``B(eps) = {x' : |x' - x| <= eps, 0 <= x' <= 255}`` makes t win is a linear program. Its dual, for
weights lambda >= 0 on the rivals (``g = sum_k lambda_k a_k``, the room ``R_j`` of pixel j towards
``sign(g_j)``: ``255 - x_j`` or ``x_j``):

    h(lambda, eps) = sum_k lambda_k q_k + sum_j |g_j| min(eps, R_j)
                   = max over x' in B(eps) of sum_k lambda_k (q_k + a_k . (x' - x)),

reached at the corner ``clip(x + eps sign(g), 0, 255)`` (the sign step of attacks/sign.py along
sign(g)). ``h`` is nondecreasing and piecewise linear in eps with breakpoints at the integers
(rooms are integers): its root ``r(lambda)`` comes from one 256-bin histogram of |g| over R. For
every lambda, no image closer than ``r(lambda)`` beats all rivals (it would make h >= 0), and by
LP duality ``max over lambda of r(lambda)`` is the true minimum.

The stored image needs the other side: at the integer ``e = floor(r) + 1`` some image of B(e)
beats every rival exactly when ``min over lambda of h(lambda, e) > 0``, and then the LP's
solution is the corner along ``sign(g)`` for the minimizing lambda except at the few pixels where
``g_j = 0`` (at most one fewer than the rivals with weight), which sit inside the box. So per
pair, in stages: (1) SMO on r(lambda) (move weight from the most satisfied rival to the most
violated one of the corner at the root, regula falsi on the segment) gives the certificate and
e; (2) the same moves on h(., e) until the corner at e beats every rival; (3) where it does not,
Newton's method on h(., e) with |g_j| smoothed as ``sqrt(g_j^2 + tau^2)`` (with thousands of
pixels h is nearly smooth; tau shrinks every step) reaches the LP's duals, whose corner is
tried, then (4) that corner with the pixels at a tie set to equalize the rivals with weight (a
K x K linear system). The stored image is scored: if t wins, e is the minimum over all images,
proved by the certificate. If not, the classes that beat it join the rivals (the search starts
with the KMAX nearest by the Hoelder ratio ``q_k / ||a_k||_1``) and the next stage starts from
Newton's weights. No LP solver: (P, K, D) products, histograms and (P, K, K) solves.

Only numpy and torch here: no Ray, no storage.
"""

from __future__ import annotations

import torch

from attacks.fooling import Fooled, expand, first_success, pairs
from attacks.iterative import Iterative
from attacks.linear import BOUND_SLACK, LinearModel, _round_down
from attacks.sign import LEVELS, Sign

KMAX = 8  # rivals in the dual search, nearest first (random 1,000-class models bind more)
STAGES = 5  # searches, each followed by a step that is scored
STAGE_CALLS = 8  # root evaluations per pair and stage at most
STEP_CALLS = 8  # the same, for the step to store: it starts from the certificate's optimum
LINE_STEPS = 3  # evaluations per line search before it settles on its best point
CONVERGED = 0.01  # stop once no rival's corner margin is short by more than this many levels
FEASIBLE = 1e-4  # a corner that beats every rival by this much (score units) is tried
TAU, TAU_DECAY = 0.05, 0.4  # the smoothing of |g_j| in Newton's method, relative to the mean
# |g_j|, and its decay per step (a coarse model first, then closer to h's kinks)
NEWTON_STEPS = 6  # Newton steps towards the weights that are optimal at the step's eps
NEAR = 512  # pixels nearest a kink of h, the only ones that count in Newton's Hessian
WEIGHT_FLOOR = 1e-3  # rivals with less weight (relative to the most) are not balanced
GROW = 8  # rivals added per round: the classes that beat the step that lost
CHUNK = 256  # pairs per dual search: memory CHUNK x KMAX x D x 4 bytes (100 MB for 64x64x3)
DENSE_C = 128  # up to this many classes, products with all of W beat gathering rivals' rows
COMPACT_AT = 0.75  # the search drops settled pairs once fewer than this fraction still move


class Exact(Sign):
    r"""The smallest L-inf perturbation that fools a linear model, with its LP-duality certificate.

    Distance measure: L-inf, in pixel levels. Value range: uint8 pixels 0..255 in and out.

    Reference: the linear program of Szegedy et al., "Intriguing properties of neural networks"
    (ICLR 2014) and Carlini and Wagner's minimal-distance view, solved exactly for a linear
    model: for every pair the stored image is the sign step ``clip(x + e d, 0, 255)`` along
    ``d = sign(sum_k lambda_k (W[t] - W[k]))`` for dual weights lambda (with a few pixels at a
    tie set inside the box where that is needed), at the integer ``e = floor(bound) + 1``,
    verified by scoring the stored uint8 image. ``bound`` (the job's
    ``bound_linf``) is the root of the dual function for the best weights found, recomputed in
    float64 and shaved by ``BOUND_SLACK`` (relative): no image of any kind closer than it makes
    t win (exact arithmetic on the float32 weights). So wherever the step at e fools the model,
    e is the minimal integer L-inf distance of any image, proved. Where it does not, the classes
    that beat it join the rivals and the search goes on from its weights (``STAGES`` in all);
    then Sign's exact search along the last direction, a plain Sign attack (the smaller step is
    kept), and where all fail the iterative attack's image: never above Sign.

    With ``confidence`` P the goal is the margin form: t beats every rival by ``log(P / (1 - P))``
    (an LP still; for two classes it is p_t >= P, with more classes p_t may stay below P: at least
    ``1 / (1 + (C - 1)(1 - P) / P)``).

    Shape:
        - X: (N, D) uint8, S: (N, C) float32 scores of X, targets: (T,) int64.
        - output: ``Fooled`` with images (N*T, D) uint8, image-major, and ``bound`` (N*T,).

    Examples::
        >>> attack = Exact(model)
        >>> fooled = attack(X, model.scores(X), torch.tensor([3, 7]))
    """

    name = "exact"
    softmax_confidence = False  # --confidence in the margin form (for Sign's search)

    def __call__(self, X, S, targets):
        _, t = pairs(len(X), targets)
        x, s = expand(X, len(targets)), expand(S, len(targets))
        out = [self.solve(x[c], s[c], t[c]) for c in torch.arange(len(t)).split(CHUNK)]
        fooled = Fooled(*(torch.cat([getattr(f, k) for f in out])
                          for k in ("images", "scores", "strength", "bound")))
        self.fall_back(fooled, x, s, t, self.unproved(fooled, t).nonzero()[:, 0])
        return fooled

    def solve(self, x, s, t) -> Fooled:
        """One chunk of pairs, in stages: a few moves of the dual search, then the step at the
        next integer above its root, scored; the pairs whose step wins are done (their bound is
        certified then), the classes that beat the others' step join their rivals. After the
        last stage, Sign's exact search along the last step's direction, from there up."""
        f = Fooled(x.clone(), s.clone(), torch.zeros(len(t), device=t.device),
                   torch.zeros(len(t), device=t.device))
        idx = (~self.passes(s, t)).nonzero()[:, 0]  # pairs already won keep the original
        prob = Problem(self.model, x[idx], s[idx], t[idx], self.margin)
        lam = _onehot(torch.zeros_like(idx), prob.K)
        for stage in range(STAGES):
            lam, r, _ = search_weights(prob, lam, STAGE_CALLS)
            e = (torch.floor(r) + 1).clamp(1, self.kmax)
            d, lam_e = self.step(prob, lam, e)
            img = self.image_at(x[idx], d, e.long())
            sc = self.model.scores(img)
            ok = self.passes(sc, t[idx])
            if (~ok).any():  # the LP's duals at e, closer: Newton's method
                bad = (~ok).nonzero()[:, 0]
                sub = prob.subset(bad)
                lam_e[bad] = newton(sub, lam_e[bad], e[bad], NEWTON_STEPS)[0].to(lam_e.dtype)
                d[bad] = torch.sign(sub.g(lam_e[bad])).to(torch.int8)
                img[bad] = self.image_at(x[idx[bad]], d[bad], e[bad].long())
                sc[bad] = self.model.scores(img[bad])
                ok = self.passes(sc, t[idx])
            if (~ok).any():  # the few pixels at a tie set inside the box
                bad = (~ok).nonzero()[:, 0]
                sub = prob.subset(bad)
                img[bad] = (sub.x.float() + sub.balanced(lam_e[bad], e[bad])).to(torch.uint8)
                sc[bad] = self.model.scores(img[bad])
                ok = self.passes(sc, t[idx])
            if stage == STAGES - 1:
                found = self.search(x[idx], d, s[idx], self.model.estimate(d), t[idx], e.long())
                img, sc, e = found.images, found.scores, found.strength
                ok = torch.ones_like(ok)
            won = idx[ok]
            f.images[won], f.scores[won], f.strength[won] = img[ok], sc[ok], e[ok].float()
            f.bound[won] = prob.subset(ok).certificate(lam[ok])
            idx, prob, lam, sc = idx[~ok], prob.subset(~ok), lam_e[~ok], sc[~ok]
            if len(idx) == 0:
                break
            prob, lam = prob.grow(sc, lam)
        return f

    def step(self, prob, lam, e) -> torch.Tensor:
        """The sign vector (P, D) int8 to store a step along: from the root's optimum lam, the
        weights whose corner at e beats every rival (or comes closest)."""
        lam, _, _ = search_weights(prob, lam, STEP_CALLS, e.double())
        return torch.sign(prob.g(lam)).to(torch.int8), lam

    def passes(self, S: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """t wins, and by ``margin`` over every rival (the margin form of the confidence)."""
        st = S.gather(1, t[:, None])[:, 0]
        rest = S.scatter(1, t[:, None], -float("inf")).amax(1)
        return (S.argmax(1) == t) & (st - rest >= self.margin)

    def unproved(self, fooled: Fooled, t) -> torch.Tensor:
        """(P,) bool: the stored step fails, or one level less is not ruled out by the bound."""
        return (fooled.strength >= torch.floor(fooled.bound) + 1.5) | ~self.passes(
            fooled.scores, t)

    def keep_better(self, fooled: Fooled, idx, other: Fooled, t) -> Fooled:
        """Pairs idx take ``other``'s image where it passes and is smaller (or theirs fails)."""
        mine = self.passes(fooled.scores[idx], t[idx])
        theirs = self.passes(other.scores, t[idx])
        better = theirs & (~mine | (other.strength < fooled.strength[idx]))
        rows = idx[better]
        fooled.images[rows] = other.images[better]
        fooled.scores[rows] = other.scores[better]
        fooled.strength[rows] = other.strength[better]
        return fooled

    def fall_back(self, fooled: Fooled, x, s, t, idx) -> None:
        """Where the stored step is still not proved minimal, Sign's step if it is smaller; where
        it still fails, the iterative attack's image."""
        if len(idx) == 0:
            return
        sign = Sign(self.model, self.confidence)
        ds = torch.sign(self.model.W[t[idx]] - self.model.mean_template(s[idx])).to(torch.int8)
        g = self.model.estimate(ds)
        k0 = first_success(s[idx], g, t[idx], 1, self.kmax, self.confidence)
        self.keep_better(fooled, idx, sign.search(x[idx], ds, s[idx], g, t[idx], k0), t)
        for target in t[idx].unique():  # still failing (the dual saw too few rivals): BIM's walk
            rows = idx[(t[idx] == target) & ~self.passes(fooled.scores[idx], t[idx])]
            if len(rows):
                walk = Iterative(self.model, self.confidence)(x[rows], s[rows], target[None])
                self.keep_better(fooled, rows, walk, t)


class Problem:
    """One chunk of pairs: the K nearest rivals and their margins q_k (P, K).

    ``g = sum_k lam_k (W[t] - W[k])`` and the corner's rival margins are computed as products
    with W itself (a (P, C) x (C, D) product, W in cache) for few classes, and with the
    gathered rows W[rivals] (P, K, D) for many.
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
        self.Wt = None if self.dense else model.W[t]  # (P, D)
        self.Wr = None if self.dense else model.W[rivals]  # (P, K, D)
        xi = x.to(torch.int16)
        self.up, self.dn = (255 - xi).long(), xi.long()  # rooms towards 255 and 0
        self.lo, self.hi = -xi.float(), (255 - xi).float()  # the step's box

    def grow(self, S: torch.Tensor, lam: torch.Tensor) -> tuple[Problem, torch.Tensor]:
        """The same pairs with up to GROW more rivals: the classes with the smallest margins
        over t in scores S (P, C) of a step that lost (those that beat it first); lam (P, K)
        padded with zeros for them."""
        add = min(GROW, self.model.C - 1 - self.K)
        if add <= 0:
            return self, lam
        rank = (S.gather(1, self.t[:, None]) - S).double()
        rank.scatter_(1, torch.cat([self.rivals, self.t[:, None]], 1), float("inf"))
        new = rank.topk(add, 1, largest=False).indices
        rivals = torch.cat([self.rivals, new], 1)
        grown = Problem(self.model, self.x, None, self.t, self.margin, rivals, self.q_all)
        return grown, torch.cat([lam, lam.new_zeros(len(lam), add)], 1)

    def subset(self, rows) -> Problem:
        sub = object.__new__(Problem)
        sub.model, sub.margin, sub.K, sub.dense = self.model, self.margin, self.K, self.dense
        for key in ("x", "t", "rivals", "q", "q_all", "Wt", "Wr", "up", "dn", "lo", "hi"):
            v = getattr(self, key)
            setattr(sub, key, None if v is None else v[rows])
        return sub

    def g(self, lam: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """sum_k lam_k (W[t] - W[k]), (P, D), products in dtype."""
        lam = lam.to(dtype)
        if self.dense:
            coef = torch.zeros(len(lam), self.model.C, dtype=dtype, device=lam.device)
            coef.scatter_add_(1, self.rivals, -lam)
            coef.scatter_add_(1, self.t[:, None], lam.sum(1, keepdim=True))
            return coef @ self.model.W.to(dtype)
        Wt, Wr = self.Wt.to(dtype), self.Wr.to(dtype)
        return Wt * lam.sum(1, keepdim=True) - torch.bmm(lam[:, None, :], Wr)[:, 0]

    def margins(self, step: torch.Tensor) -> torch.Tensor:
        """q_k + (W[t] - W[k]) . step for the K rivals, (P, K) float64."""
        if self.dense:
            ds = step @ self.model.W.T  # (P, C)
            gain = ds.gather(1, self.t[:, None]) - ds.gather(1, self.rivals)
        else:
            gain = (self.Wt * step).sum(1, keepdim=True) - torch.bmm(
                self.Wr, step[:, :, None])[:, :, 0]
        return self.q + gain.double()

    def evaluate(self, lam: torch.Tensor, eps: torch.Tensor | None = None) -> dict:
        """At the root r of h(lam, .) (inf: t cannot win at all), or at a given eps (P,): the
        corner's rival margins M (P, K), h's slope in eps (P,) and the search's score: r, or at
        eps the corner's smallest margin. Float32 products: this steers the search; the
        certificate is recomputed in float64."""
        g = self.g(lam)
        if eps is None:
            r, slope = root(self.histogram(g).double(), (lam * self.q).sum(1))
        else:
            r, slope = eps.double(), torch.ones_like(eps, dtype=torch.float64)
        M = self.margins(self.corner(g, r))
        return {"r": r, "M": M, "slope": slope, "score": r if eps is None else M.amin(1)}

    def rows(self) -> torch.Tensor:
        """(P, K, D) the rows W[t] - W[k] of the rivals."""
        return self.model.W[self.t][:, None, :] - self.model.W[self.rivals]

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
        tie = g.abs() / torch.bmm(lam.float()[:, None, :], A.abs())[:, 0].clamp(min=1e-30)
        T = tie.topk(max(K - 1, 1), 1, largest=False).indices  # (P, K - 1)
        a_T = A.gather(1, order[:, :, None].expand(P, K, A.shape[2])).gather(
            2, T[:, None, :].expand(P, K, T.shape[1]))  # (P, K, K - 1), rivals by weight
        lhs = torch.cat([a_T, -torch.ones(P, K, 1, device=g.device)], 2)  # unknowns: moves, z
        rhs = -self.margins(step).float().gather(1, order)
        slot = torch.arange(K, device=g.device)[None].expand(P, K)
        spare = slot >= active[:, None]
        fix = torch.nn.functional.one_hot((slot - 1).clamp(0, K - 1), K).float()
        lhs, rhs = torch.where(spare[:, :, None], fix, lhs), torch.where(spare, 0.0, rhs)
        move = torch.nan_to_num(torch.linalg.lstsq(lhs, rhs[:, :, None]).solution[:, :-1, 0])
        lo = torch.maximum(self.lo, -eps.float()[:, None]).gather(1, T)
        hi = torch.minimum(self.hi, eps.float()[:, None]).gather(1, T)
        step.scatter_(1, T, torch.minimum(torch.maximum(step.gather(1, T) + move, lo), hi))
        return step.round()

    def histogram(self, g: torch.Tensor) -> torch.Tensor:
        """(P, 256): the sum of |g_j| over the pixels j whose room towards sign(g_j) is r."""
        hist = torch.zeros(len(g), LEVELS, dtype=g.dtype, device=g.device)
        hist.scatter_add_(1, self.up, g.clamp(min=0))
        return hist.scatter_add_(1, self.dn, g.clamp(max=0).neg_())

    def corner(self, g: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The step (P, D) float32 to the corner clip(x + eps sign(g), 0, 255), eps (P,)."""
        step = torch.sign(g).mul_(eps.clamp(max=255).float()[:, None])
        return torch.clamp(step, self.lo, self.hi)

    def certificate(self, lam: torch.Tensor) -> torch.Tensor:
        """r(lam) recomputed in float64 from the float32 weights, shaved: a true lower bound."""
        b, t = self.model.b, self.t
        lam = lam.double().clamp(min=0)
        g = self.g(lam, torch.float64)
        c = (lam * (b[t].double()[:, None] - b[self.rivals].double() - self.margin)).sum(1)
        lq = c + (g * self.x.double()).sum(1)
        r, _ = root(self.histogram(g), lq)
        return _round_down(r.clamp(max=255) * (1 - BOUND_SLACK))


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


def newton(prob: Problem, lam: torch.Tensor, eps: torch.Tensor, steps: int):
    """Weights (P, K) that minimize h(lam, eps) over the simplex, by Newton's method on h
    smoothed (|g_j| as sqrt(g_j^2 + tau^2)): with thousands of pixels h is nearly smooth, and
    a few steps from the root's weights reach the LP's duals. The rivals free to move are those
    with weight and those whose corner margin is below h (they would take weight). Returns the
    best weights met and h there (P,) (the LP's best worst-case margin at eps, from above)."""
    P, K = lam.shape
    A = prob.rows()  # (P, K, D)
    e = eps.float()[:, None]
    up, dn = torch.minimum(prob.hi, e), torch.minimum(-prob.lo, e)
    w, v = (up + dn) / 2, (up - dn) / 2  # max(up g, -dn g) = w |g| + v g
    best, best_h = lam.double().clone(), torch.full((P,), float("inf"), dtype=torch.float64,
                                                     device=lam.device)
    lam = lam.double()
    for i in range(steps + 1):  # the last one only measures
        g = torch.bmm(lam.float()[:, None, :], A)[:, 0]  # (P, D)
        corner = torch.where(g > 0, up, -dn)
        M = prob.q + torch.bmm(A, corner[:, :, None])[:, :, 0].double()  # the corner's margins
        h = (lam * M).sum(1)
        better = h < best_h
        best[better], best_h[better] = lam[better], h[better]
        if i == steps:
            break
        tau = TAU * TAU_DECAY**i * g.abs().mean(1, keepdim=True).clamp(min=1e-30)
        root = torch.sqrt(g * g + tau * tau)
        grad = prob.q + torch.bmm(A, (w * g / root + v)[:, :, None])[:, :, 0].double()
        c, near = (w * tau * tau / root**3).topk(min(NEAR, A.shape[2]), 1)  # pixels at a kink
        a = A.gather(2, near[:, None, :].expand(P, K, near.shape[1]))  # (P, K, NEAR)
        H = torch.bmm(a * c[:, None, :], a.transpose(1, 2)).double()  # (P, K, K)
        free = (lam > 0) | (M < h[:, None])
        both = free[:, :, None] & free[:, None, :]
        eye = torch.eye(K, dtype=H.dtype, device=H.device).expand(P, K, K)
        H = torch.where(both, H, eye) + 1e-12 * eye * H.diagonal(0, 1, 2).abs().amax(1)[:, None,
                                                                                        None]
        one = free.double()
        kkt = torch.cat([torch.cat([H, one[:, :, None]], 2),
                         torch.cat([one[:, None, :], torch.zeros(P, 1, 1, dtype=H.dtype,
                                                                 device=H.device)], 2)], 1)
        rhs = torch.cat([-torch.where(free, grad, 0.0), torch.zeros(P, 1, dtype=H.dtype,
                                                                    device=H.device)], 1)
        d = torch.linalg.solve(kkt, rhs[:, :, None])[:, :K, 0]
        d = torch.nan_to_num(d)
        shrink = torch.where(d < 0, lam / (-d).clamp(min=1e-300), float("inf")).amin(1)
        lam = (lam + shrink.clamp(max=1)[:, None] * d).clamp(min=0)
        lam = lam / lam.sum(1, keepdim=True).clamp(min=1e-300)
    return best, best_h


def search_weights(prob: Problem, lam: torch.Tensor, calls: int, eps=None):
    """Dual weights (P, K) by SMO with regula falsi, from lam: the largest root r(lam) found,
    or with eps (P,) the corner at eps with the largest smallest margin (a corner that beats
    every rival ends the search).

    At the root the corner's margins M satisfy ``lam . M = 0``, and lam is optimal when no
    M_k < 0. Otherwise weight moves from o (the most satisfied rival with weight) to v (the most
    violated) along ``lam + gamma (e_v - e_o)``, 0 <= gamma <= lam_o: the root is unimodal along
    it and peaks where ``M_v = M_o``, the zero that the line search brackets. Returns the best
    weights (P, K), their root r (P,) (or eps) and h's slope in eps there (P,). At eps the same
    moves minimize h(lam, eps), whose corner then beats every rival if any image within eps does.
    """
    P, K = lam.shape
    best = {"lam": lam.clone(), "r": torch.zeros(P, dtype=torch.float64, device=lam.device),
            "slope": torch.zeros(P, dtype=torch.float64, device=lam.device),
            "score": torch.full((P,), -float("inf"), dtype=torch.float64, device=lam.device)}
    ids = torch.arange(P, device=lam.device)
    base = prob.evaluate(lam, eps)
    base["lam"] = lam.clone()
    ls = _new_line(base)
    for _ in range(calls - 1):
        done = _settled(base, eps)
        if done.any():  # record the settled pairs, keep searching with the rest
            _record(best, ids[done], {k: base[k][done] for k in best})
        if done.all():
            return best["lam"], best["r"], best["slope"]
        if done.float().mean() > 1 - COMPACT_AT:
            keep = ~done
            ids, prob = ids[keep], prob.subset(keep)
            base = {k: v[keep] for k, v in base.items()}
            ls = {k: v[keep] for k, v in ls.items()}
            eps = None if eps is None else eps[keep]
        rows = torch.arange(len(ids), device=lam.device)
        query = base["lam"] + ls["gamma"][:, None] * (_onehot(ls["v"], K) - _onehot(ls["o"], K))
        ev = prob.evaluate(query.clamp(min=0), eps)
        ev["lam"] = query.clamp(min=0)
        phi = ev["M"][rows, ls["v"]] - ev["M"][rows, ls["o"]]
        better = ev["score"] > ls["score"]  # the best point of the segment so far
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


KEYS = ("lam", "r", "M", "slope", "score")  # what a point of the search holds


def _settled(base: dict, eps) -> torch.Tensor:
    if eps is not None:
        return base["M"].amin(1) > FEASIBLE
    short = (-base["M"].amin(1)).clamp(min=0)
    return (short <= CONVERGED * base["slope"].clamp(min=1e-30)) | ~torch.isfinite(base["r"])


def _record(best: dict, ids, new: dict) -> None:
    better = new["score"] > best["score"][ids]
    for k in best:
        best[k][ids[better]] = new[k][better]


def _onehot(i: torch.Tensor, K: int) -> torch.Tensor:
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
