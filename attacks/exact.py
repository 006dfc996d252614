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

from attacks.dual import Problem, newton, onehot, search_weights
from attacks.fooling import Fooled, expand, first_success, pairs
from attacks.iterative import Iterative
from attacks.sign import Sign

STAGES = 5  # searches, each followed by a step that is scored
STAGE_CALLS = 8  # root evaluations per pair and stage at most
STEP_CALLS = 8  # the same, for the step to store: it starts from the certificate's optimum
NEWTON_STEPS = 6  # Newton steps towards the weights that are optimal at the step's eps
CHUNK = 256  # pairs per dual search: memory CHUNK x K x D x 4 bytes (100 MB for 64x64x3, K = 8)


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
        lam = onehot(torch.zeros_like(idx), prob.K)
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
