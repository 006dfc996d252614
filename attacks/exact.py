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
LP duality ``max over lambda of r(lambda)`` is the true minimum. Only a few rivals carry weight
at the optimum: this searches lambda over the KMAX rivals nearest by the Hoelder ratio
``q_k / ||a_k||_1`` (SMO: move weight from the most satisfied rival to the most violated one of
the corner at the root, with a regula falsi line search), keeps the best certificate, and stores
the sign step along the best lambda's ``sign(g)``, at the smallest integer eps that fools the
model, found and verified on the stored uint8 image by Sign's exact search. The math of one call:
a few (P, KMAX, D) products and histograms per pair; no LP solver.

Only numpy and torch here: no Ray, no storage.
"""

from __future__ import annotations

import torch

from attacks.fooling import Fooled, expand, first_success, pairs
from attacks.iterative import Iterative
from attacks.linear import BOUND_SLACK, LinearModel, _round_down
from attacks.sign import LEVELS, Sign

KMAX = 8  # rivals in the dual search, nearest first (random 1,000-class models bind more)
CALLS = 30  # root evaluations per pair at most (few pairs need more than 5)
STEP_CALLS = 8  # the same, for the step to store: it starts from the certificate's optimum
RAISES = (0.5, 0.85, 0.2)  # the stored step aims this fraction of the way to the next integer
LINE_STEPS = 3  # evaluations per line search before it settles on its best point
CONVERGED = 0.01  # stop once no rival's corner margin is short by more than this many levels
RIVAL_ROUNDS = 2  # rounds in which the classes that beat the repaired image join the rivals
REPAIR_MOVES = 12  # single-pixel moves at most, where the sign steps leave a gap
FEASIBLE = 1e-4  # a corner that beats every rival by this much (score units) is tried
CHUNK = 256  # pairs per dual search: memory CHUNK x KMAX x D x 4 bytes (100 MB for 64x64x3)
DENSE_C = 128  # up to this many classes, products with all of W beat gathering rivals' rows
COMPACT_AT = 0.75  # the search drops settled pairs once fewer than this fraction still move


class Exact(Sign):
    r"""The smallest L-inf perturbation that fools a linear model, with its LP-duality certificate.

    Distance measure: L-inf, in pixel levels. Value range: uint8 pixels 0..255 in and out.

    Reference: the linear program of Szegedy et al., "Intriguing properties of neural networks"
    (ICLR 2014) and Carlini and Wagner's minimal-distance view, solved exactly for a linear
    model: for every pair the stored image is the sign step ``clip(x + eps d, 0, 255)`` along
    ``d = sign(sum_k lambda_k (W[t] - W[k]))`` for the dual weights lambda found, at the smallest
    integer eps that makes t win on the stored uint8 image (Sign's exact search, clipping
    included). ``bound`` (the job's ``bound_linf``) is the root of the dual function for those
    weights, recomputed in float64 and shaved by ``BOUND_SLACK`` (relative): no image of any
    kind closer than it makes t win (exact arithmetic on the float32 weights). Where
    ``strength < bound + 1`` the strength is the minimal integer L-inf distance of any image,
    proved; elsewhere the pair tries again (other raised goals, a few pixels set inside the box,
    more rivals), then a plain Sign attack (the smaller step is kept), and where all fail the
    iterative attack's image: never above Sign.

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
        everyone = torch.arange(len(t), device=t.device)
        w = self.certify(x, s, t, everyone)
        fooled, blocked = self.attempt(x, s, t, w, everyone, None)
        todo = self.unproved(fooled, t, w["bound"]).nonzero()[:, 0]
        for _ in range(RIVAL_ROUNDS):  # the classes that still win against the step join in
            if len(todo) == 0:
                break
            rivals = self.more_rivals(w, todo, t, blocked)
            new = self.certify(x, s, t, todo, rivals)
            for key in w:
                w[key][todo] = new[key]
            w["bound"][todo] = torch.maximum(new["bound"], w["bound"][todo])
            fooled, blocked = self.attempt(x, s, t, w, todo, fooled)
            todo = self.unproved(fooled, t, w["bound"]).nonzero()[:, 0]
        self.fall_back(fooled, x, s, t, todo)
        fooled.bound = w["bound"]
        return fooled

    def attempt(self, x, s, t, w, idx, fooled):
        """Store sign steps for pairs idx along the optimum for a raised goal (several tries),
        then pixel repairs; returns fooled and the scores (P, C) of the repaired images."""
        todo = idx
        for frac in RAISES:  # a pair not proved minimal tries again, aiming elsewhere
            d = torch.cat([self.step(x[c], s[c], t[c], {k: v[c] for k, v in w.items()}, frac)
                           for c in todo.split(CHUNK)])
            k0 = (torch.floor(w["bound"][todo]) + 1).clamp(1, self.kmax).long()
            f = self.search(x[todo], d, s[todo], self.model.estimate(d), t[todo], k0)
            fooled = f if fooled is None else self.keep_better(fooled, todo, f, t)
            todo = todo[self.unproved(fooled, t, w["bound"])[todo]]
            if len(todo) == 0:
                return fooled, None
        # a few pixels set inside the box, not at its ends, may close the gap
        fixed = torch.cat([self.repair(x[c], s[c], t[c], {k: v[c] for k, v in w.items()})
                           for c in todo.split(CHUNK)])
        candidate = self.measured(fixed, t[todo], w, todo)
        fooled = self.keep_better(fooled, todo, candidate, t)
        blocked = torch.zeros(len(t), self.model.C, device=t.device)
        blocked[todo] = candidate.scores
        return fooled, blocked

    def more_rivals(self, w, idx, t, blocked) -> torch.Tensor:
        """Rivals (P', K) for pairs idx: those the dual weighs, then the classes with the smallest
        margins over t on the repaired image (those that still beat it first)."""
        S = blocked[idx].double()
        rank = S.gather(1, t[idx, None]) - S
        lam, old = w["lam"][idx], w["rivals"][idx]
        rank.scatter_(1, old, torch.where(lam > 0, -1e30 - lam, rank.gather(1, old)))
        rank.scatter_(1, t[idx, None], float("inf"))
        return rank.topk(w["rivals"].shape[1], 1, largest=False).indices

    def measured(self, images, t, w, idx) -> Fooled:
        """Fooled for candidate images of pairs idx, strength = the integer e aimed at."""
        e = (torch.floor(w["bound"][idx]) + 1).clamp(max=self.kmax)
        return Fooled(images, self.model.scores(images), e)

    def repair(self, x, s, t, w: dict) -> torch.Tensor:
        """The sign step at e = floor(bound) + 1 (aimed half way from r to e), then greedy
        single-pixel moves inside the box |x' - x| <= e, each the one that most raises the
        smallest rival margin, while a rival still wins (P, D) uint8."""
        e = (torch.floor(w["bound"]) + 1).clamp(max=self.kmax)
        d = self.step(x, s, t, w, RAISES[0])
        img = self.image_at(x, d, e.long())
        prob = Problem(self.model, x, s, t, self.margin, w["rivals"])
        xf = x.float()
        lo, hi = (xf - e[:, None]).clamp(min=0), (xf + e[:, None]).clamp(max=255)
        rows = torch.arange(len(t), device=t.device)
        for _ in range(REPAIR_MOVES):
            cur = img.float()
            M = prob.margins(cur - xf)  # (P, K)
            v = M.argmin(1)
            if (M.amin(1) > FEASIBLE).all():
                break
            a_v = prob.a(v)  # (P, D): the row of the most violated rival
            full = torch.where(a_v > 0, hi, lo) - cur  # the most that pixel can give v
            need = torch.ceil((-M[rows, v])[:, None].float() / a_v.abs().clamp(min=1e-30))
            part = torch.sign(full) * torch.minimum(full.abs(), need)
            best_gain, best = None, None
            for delta in (full, part):
                new_min = (M[:, :, None].float() + prob.a_all() * delta[:, None, :]).amin(1)
                if best is None:
                    best_gain, best = new_min, delta
                else:
                    take = new_min > best_gain
                    best_gain, best = torch.where(take, new_min, best_gain), torch.where(
                        take, delta, best)
            j = best_gain.argmax(1)
            ok = (best_gain[rows, j] > M.amin(1).float()) & (M.amin(1) <= FEASIBLE)
            step = torch.where(ok, best[rows, j], 0.0)
            img[rows, j] = (cur[rows, j] + step).round().clamp(0, 255).to(torch.uint8)
        return img

    def passes(self, S: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """t wins, and by ``margin`` over every rival (the margin form of the confidence)."""
        st = S.gather(1, t[:, None])[:, 0]
        rest = S.scatter(1, t[:, None], -float("inf")).amax(1)
        return (S.argmax(1) == t) & (st - rest >= self.margin)

    def unproved(self, fooled: Fooled, t, bound) -> torch.Tensor:
        """(P,) bool: the stored step fails, or one level less is not ruled out by the bound."""
        return (fooled.strength >= torch.floor(bound) + 1.5) | ~self.passes(fooled.scores, t)

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

    # --- the dual search ------------------------------------------------------------------------
    def certify(self, x, s, t, idx, rivals=None) -> dict:
        """For pairs idx: the dual weights (P', K) with the largest root r, their rivals (the
        KMAX nearest by the Hoelder ratio unless given), the slope at r, and the certified lower
        bound (P',) float32 on the L-inf distance (r recomputed in float64, shaved)."""
        out = []
        for i in range(0, len(idx), CHUNK):
            c = idx[i:i + CHUNK]
            given = None if rivals is None else rivals[i:i + CHUNK]
            prob = Problem(self.model, x[c], s[c], t[c], self.margin, given)
            lam = torch.zeros(len(c), prob.K, dtype=torch.float64, device=t.device)
            lam[:, 0] = 1.0
            lam, r = search_weights(prob, lam)
            out.append({"lam": lam, "rivals": prob.rivals, "r": r,
                        "slope": prob.evaluate(lam)["slope"], "bound": prob.certificate(lam)})
        return {k: torch.cat([o[k] for o in out]) for k in out[0]}

    def step(self, x, s, t, w: dict, frac: float) -> torch.Tensor:
        """The sign vector (P, D) int8 to store a step along: the optimum for a goal raised by
        rho, whose root lies about ``frac`` of the way from r to the next integer e. Every rival's
        corner margin is about rho there, so the sign step at e along it keeps them positive
        (the margins' slopes in eps differ from rival to rival: the optimum at r itself, a
        balanced corner at r, is often unbalanced at e)."""
        prob = Problem(self.model, x, s, t, self.margin, w["rivals"])
        r = w["r"]
        e = torch.floor(r.clamp(max=254)) + 1
        rho = frac * w["slope"] * (e - r).clamp(min=0)
        lam, _ = search_weights(prob.raised(torch.where(torch.isfinite(rho), rho, 0.0)), w["lam"],
                                calls=STEP_CALLS)
        return torch.sign(prob.g(lam)).to(torch.int8)


class Problem:
    """One chunk of pairs: the K nearest rivals and their margins q_k (P, K).

    ``g = sum_k lam_k (W[t] - W[k])`` and the corner's rival margins are computed as products
    with W itself (a (P, C) x (C, D) product, W in cache) for few classes, and with the
    gathered rows W[rivals] (P, K, D) for many.
    """

    def __init__(self, model: LinearModel, x, s, t, margin: float, rivals=None):
        self.model, self.x, self.t, self.margin = model, x, t, margin
        C = model.C
        self.K = K = max(1, min(KMAX, C - 1))
        q_all = (s.gather(1, t[:, None]) - s).double() - margin  # (P, C)
        if rivals is None:
            l1 = model.fact("dist_l1")[t].double().clamp(min=1e-30)
            rank = (q_all / l1).scatter(1, t[:, None], float("inf"))
            rivals = rank.topk(K, 1, largest=False).indices  # (P, K) nearest first
        self.rivals, self.q = rivals, q_all.gather(1, rivals)
        self.dense = C <= DENSE_C
        self.Wt = None if self.dense else model.W[t]  # (P, D)
        self.Wr = None if self.dense else model.W[rivals]  # (P, K, D)
        xi = x.to(torch.int16)
        self.up, self.dn = (255 - xi).long(), xi.long()  # rooms towards 255 and 0

    def raised(self, rho: torch.Tensor) -> Problem:
        """The same pairs with every rival to be beaten by rho (P,) more."""
        sub = self.subset(slice(None))
        sub.q = self.q - rho[:, None]
        return sub

    def subset(self, rows) -> Problem:
        sub = object.__new__(Problem)
        sub.model, sub.margin, sub.K, sub.dense = self.model, self.margin, self.K, self.dense
        for key in ("x", "t", "rivals", "q", "Wt", "Wr", "up", "dn"):
            v = getattr(self, key)
            setattr(sub, key, None if v is None else v[rows])
        return sub

    def g(self, lam: torch.Tensor) -> torch.Tensor:
        """sum_k lam_k (W[t] - W[k]), (P, D) float32."""
        lam = lam.float()
        if self.dense:
            coef = torch.zeros(len(lam), self.model.C, device=lam.device)
            coef.scatter_add_(1, self.rivals, -lam)
            coef.scatter_add_(1, self.t[:, None], lam.sum(1, keepdim=True))
            return coef @ self.model.W
        return self.Wt * lam.sum(1, keepdim=True) - torch.bmm(lam[:, None, :], self.Wr)[:, 0]

    def a_all(self) -> torch.Tensor:
        """(P, K, D) rows W[t] - W[k] of the rivals (for the few pairs that are repaired)."""
        return self.model.W[self.t][:, None, :] - self.model.W[self.rivals]

    def a(self, k: torch.Tensor) -> torch.Tensor:
        """(P, D): W[t] - W[rival k] per pair."""
        return self.model.W[self.t] - self.model.W[self.rivals.gather(1, k[:, None])[:, 0]]

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
        corner's rival margins M (P, K) and h's slope in eps (P,). Float32 products: this steers
        the search; the certificate is recomputed in float64."""
        g = self.g(lam)
        room = torch.where(g > 0, self.up, self.dn)
        if eps is None:
            hist = torch.zeros(len(g), LEVELS, device=g.device).scatter_add_(
                1, room, g.abs()).double()
            r, slope = root(hist, (lam * self.q).sum(1))
        else:
            r, slope = eps.double(), torch.ones_like(eps, dtype=torch.float64)
        step = torch.sign(g) * torch.minimum(room.float(), r.clamp(max=255).float()[:, None])
        return {"r": r, "M": self.margins(step), "slope": slope}

    def certificate(self, lam: torch.Tensor) -> torch.Tensor:
        """r(lam) recomputed in float64 from the float32 weights, shaved: a true lower bound."""
        W, b, t = self.model.W, self.model.b, self.t
        lam = lam.double().clamp(min=0)
        Wr = W[self.rivals].double() if self.Wr is None else self.Wr.double()  # (P, K, D)
        g = W[t].double() * lam.sum(1, keepdim=True) - torch.bmm(lam[:, None, :], Wr)[:, 0]
        c = (lam * (b[t].double()[:, None] - b[self.rivals].double() - self.margin)).sum(1)
        lq = c + (g * self.x.double()).sum(1)
        hist = torch.zeros(len(t), LEVELS, dtype=torch.float64, device=W.device).scatter_add_(
            1, torch.where(g > 0, self.up, self.dn), g.abs())
        r, _ = root(hist, lq)
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


def search_weights(prob: Problem, lam: torch.Tensor, eps: torch.Tensor | None = None,
                   calls: int = CALLS) -> tuple[torch.Tensor, torch.Tensor]:
    """Dual weights (P, K) by SMO with regula falsi, from lam; returns them and their score.

    Without eps: the largest root r(lam) (score r). At the root the corner's margins M satisfy
    ``lam . M = 0``, and lam is optimal when no M_k < 0. Otherwise weight moves from o (the most
    satisfied rival with weight) to v (the most violated) along ``lam + gamma (e_v - e_o)``,
    0 <= gamma <= lam_o: the root is unimodal along it and peaks where ``M_v = M_o``, the zero
    that the line search brackets. With eps (P,): the same moves minimize h(lam, eps), whose
    corner then beats every rival if anything within eps does (score min_k M_k; a pair stops
    as soon as its corner beats all K rivals).
    """
    P, K = lam.shape
    out_lam, out_score = lam.clone(), torch.full((P,), -float("inf"), dtype=torch.float64,
                                                   device=lam.device)
    ids = torch.arange(P, device=lam.device)
    base = prob.evaluate(lam, eps)
    base["lam"], base["score"] = lam.clone(), _score(base, eps)
    ls = _new_line(base)
    for _ in range(calls - 1):
        done = _settled(base, eps)
        if done.any():  # record the settled pairs, keep searching with the rest
            _record(out_lam, out_score, ids[done], base["lam"][done], base["score"][done])
        if done.all():
            return out_lam, out_score
        if done.float().mean() > 1 - COMPACT_AT:
            keep = ~done
            ids, prob = ids[keep], prob.subset(keep)
            eps = None if eps is None else eps[keep]
            base = {k: v[keep] for k, v in base.items()}
            ls = {k: v[keep] for k, v in ls.items()}
        rows = torch.arange(len(ids), device=lam.device)
        query = base["lam"] + ls["gamma"][:, None] * (_onehot(ls["v"], K) - _onehot(ls["o"], K))
        query = query.clamp(min=0)
        ev = prob.evaluate(query, eps)
        ev["lam"], ev["score"] = query, _score(ev, eps)
        phi = ev["M"][rows, ls["v"]] - ev["M"][rows, ls["o"]]
        better = ev["score"] > ls["score"]  # the best point of the segment so far
        for key in ("lam", "score", "r", "M", "slope"):
            ls[key][better] = ev[key][better]
        _regula_falsi(ls, phi)
        ls["steps"] += 1
        end = (ls["steps"] >= LINE_STEPS) | ls["at_end"]
        if end.any():
            for key in ("lam", "score", "r", "M", "slope"):
                base[key][end] = ls[key][end]
            new = _new_line(base)
            for key, v in new.items():
                ls[key][end] = v[end]
    _record(out_lam, out_score, ids, base["lam"], base["score"])
    return out_lam, out_score


def _score(ev: dict, eps) -> torch.Tensor:
    return ev["r"] if eps is None else ev["M"].amin(1)


def _settled(base: dict, eps) -> torch.Tensor:
    if eps is not None:
        return base["M"].amin(1) > FEASIBLE
    short = (-base["M"].amin(1)).clamp(min=0)
    return (short <= CONVERGED * base["slope"].clamp(min=1e-30)) | ~torch.isfinite(base["r"])


def _record(out_lam, out_score, ids, lam, score) -> None:
    better = score > out_score[ids]
    out_lam[ids[better]], out_score[ids[better]] = lam[better], score[better]


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
            **{k: base[k].clone() for k in ("lam", "score", "r", "M", "slope")}}


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
