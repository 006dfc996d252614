"""The exact minimal L-inf fooling distance of a linear classifier, certified by LP duality
(derived in docs/exact.md).

For a pair (x (D,) uint8 in 0..255, target t), with ``q_k = s_t - s_k - margin`` (score units)
and ``a_k = W[t] - W[k]``, the LP's dual function for weights lambda on the rivals,

    h(lambda, eps) = sum_k lambda_k q_k + sum_j |g_j| min(eps, R_j),   g = sum_k lambda_k a_k

(R_j: pixel j's room towards sign(g_j)), has a root r(lambda) in eps (pixel levels) that no image
closer than it beats, whatever lambda: the certificate. Per chunk of pairs: SMO on r over the
nearest rivals gives the first certificate and the integer e = floor(r) + 1; then in stages,
Newton's method on h(., e) over the rivals that beat each step, and the corner
``clip(x + e sign(g), 0, 255)`` (its tie pixels set inside the box where a rival beats it) is
scored. Where t wins, e is stored, proved minimal where ``linf < bound + 1``. The searches run on
the backend that ``search.backend_for`` picks once per device (numba on a CPU, torch elsewhere).

Only numpy and torch here: no Ray, no storage.
"""

from __future__ import annotations

import torch

from attacks.methods.base import Fooled, expand, first_success, pairs, pairs_that_fit
from attacks.methods.iterative import Iterative
from attacks.methods.linear import LinearModel
from attacks.methods.problem import Problem, onehot
from attacks.methods.search import backend_for
from attacks.methods.sign import Sign

STAGES = 6  # Newton's method at e, then a step that is scored (after the root search's step)
ROOT_CALLS = 8  # root evaluations per pair of the first search (the first certificate and e)
NEWTON_STEPS = 8  # Newton steps towards the weights that are optimal at e
CHUNK = 256  # pairs per dual search on a CPU (the batched steps' rows: CHUNK x K x D x 4 bytes,
# 100 MB for 64x64x3 at K = 8; the fused search stores none)
FAR = 2.0  # levels above the certificate from which the iterative attack is tried as well
GPU_CHUNK = 65536  # on a GPU at most: fewer, larger launches (H200: 14,499 / 17,770 / 21,228
# pairs/s at 16,384 / 32,768 / 49,152 pairs, 1,000 classes)
GPU_BYTES = 170  # a chunk's peak GPU memory per pair and pixel (162-168 measured at 1,000 classes)
GPU_SHARE = 0.8  # of the GPU's free memory that a chunk may take


def chunk_size(device: torch.device, D: int) -> int:
    """Pairs per dual search: CHUNK on a CPU; on a GPU as many as GPU_SHARE of its free memory
    holds (GPU_BYTES per pair and pixel), between CHUNK and GPU_CHUNK."""
    if device.type != "cuda":
        return CHUNK
    return pairs_that_fit(device, GPU_BYTES * D, GPU_SHARE, CHUNK, GPU_CHUNK)


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

    ``backend``: the dual search's backend by name (search.py ``BACKENDS``); None picks it from
    the model's device, numba on a CPU and torch elsewhere.

    Shape:
        - X: (N, D) uint8, S: (N, C) float32 scores of X, targets: (T,) int64.
        - output: ``Fooled`` with images (N*T, D) uint8, image-major, and ``bound`` (N*T,).

    Examples::
        >>> attack = Exact(model)
        >>> fooled = attack(X, model.scores(X), torch.tensor([3, 7]))
    """

    name = "exact"
    softmax_confidence = False  # --confidence in the margin form (for Sign's search)

    def __init__(self, model: LinearModel, confidence: float | None = None,
                 backend: str | None = None):
        super().__init__(model, confidence)
        self.backend = backend_for(model.device, backend)

    def __call__(self, X, S, targets):
        n, t = pairs(len(X), targets)
        x, s = expand(X, len(targets)), expand(S, len(targets))
        chunk, out, start = chunk_size(X.device, X.shape[1]), [], 0
        while start < len(t):
            c = slice(start, start + chunk)
            try:
                out.append(self.solve(x[c], s[c], t[c]))
            except torch.OutOfMemoryError:  # the estimate fell short: half as many pairs
                if chunk == 1:
                    raise
                chunk = chunk // 2
                torch.cuda.empty_cache()
                continue
            start += chunk
        fooled = Fooled(*(torch.cat([getattr(f, k) for f in out])
                          for k in ("images", "scores", "strength", "bound")))
        idx = self.unproved(fooled, t).nonzero()[:, 0]
        if len(idx):  # Sign's direction from the images' own product, as Sign makes it
            self.fall_back(fooled, x, s, t, idx, self.model.mean_template(S)[n[idx]])
        return fooled

    def solve(self, x, s, t) -> Fooled:
        """One chunk of pairs: the root search gives the first certificate r and e = floor(r) + 1,
        and its weights' step at e is scored. Then in stages, for the pairs not yet won, the
        classes that beat their step join the rivals and Newton's method runs on h(., e) over
        the rivals so far (where even its weights keep h below zero, no image within e beats
        those rivals, and e moves up to the next integer above their root). The step at e along
        Newton's weights (the tie pixels balanced where a rival beats it) is scored: where t
        wins, e is proved minimal by the best certificate (where that falls short, Newton's
        weights at e - 1 give one). After the last stage, Sign's exact search along the last
        step's direction, from there up."""
        f = Fooled(x.clone(), s.clone(), torch.zeros(len(t), device=t.device),
                   torch.zeros(len(t), device=t.device))
        idx = (~self.passes(s, t)).nonzero()[:, 0]  # pairs already won keep the original
        prob = Problem(self.model, x[idx], s[idx], t[idx], self.margin, self.backend)
        lam, r, _ = self.backend.search_weights(prob, onehot(torch.zeros_like(idx), prob.K),
                                               ROOT_CALLS)
        cert = {"lam": lam.clone(), "r": r.clone()}  # the weights with the largest root so far
        e = (torch.floor(r) + 1).clamp(1, self.kmax)
        g = prob.g(lam)
        for stage in range(STAGES + 1):
            d = torch.sign(g).to(torch.int8)
            img = self.image_at(prob.x, d, e.long())
            sc = self.model.scores(img)
            ok = self.passes(sc, prob.t) & (r < e)
            tie = ((~ok) & (r < e)).nonzero()[:, 0] if stage > 0 else []
            if len(tie):  # only where the class that beats the step is one of the rivals
                best = sc[tie].scatter(1, prob.t[tie, None], -float("inf")).argmax(1)
                tie = tie[(prob.rivals[tie] == best[:, None]).any(1)]
            if len(tie):  # Newton's step lost to a rival: the few pixels at a tie inside the box
                sub = prob.subset(tie)
                img[tie] = (sub.x.float() + sub.balanced(lam[tie], e[tie])).to(torch.uint8)
                sc[tie] = self.model.scores(img[tie])
                ok = self.passes(sc, prob.t) & (r < e)
            if stage == STAGES:
                found = self.search(prob.x, d, s[idx], self.model.estimate(d), prob.t, e.long())
                img, sc, e = found.images, found.scores, found.strength
                ok = torch.ones_like(ok)
            weak = (ok & (cert["r"] <= e - 1)).nonzero()[:, 0]
            if len(weak):  # the weights optimal at e - 1 prove that no image gets there
                self.newton(prob, weak, lam.clone(), e - 1, cert, until_feasible=False)
            won = idx[ok]
            f.images[won], f.scores[won], f.strength[won] = img[ok], sc[ok], e[ok].float()
            f.bound[won] = prob.subset(ok, rows_only=True).certificate(cert["lam"][ok])
            keep = ~ok
            if not keep.any():
                break
            e = torch.where(r >= e, torch.floor(r) + 1, e)[keep].clamp(1, self.kmax)
            idx, lam, sc = idx[keep], lam[keep], sc[keep]
            cert = {k: v[keep] for k, v in cert.items()}
            prob, lam = prob.grow(keep, sc, lam)
            cert["lam"] = torch.cat([cert["lam"], cert["lam"].new_zeros(
                len(lam), prob.K - cert["lam"].shape[1])], 1)
            g, r = self.newton(prob, None, lam, e, cert)
        return f

    def newton(self, prob, rows, lam, e, cert: dict, until_feasible: bool = True):
        """Newton's weights at e (P,) from lam (P, K), in place, for the pairs ``rows`` (None:
        all); cert (the weights with the largest root so far, and that root) takes them where
        their root is larger. Returns their g and root r (float32, to steer) for those pairs."""
        sub = prob if rows is None else prob.subset(rows)
        at = slice(None) if rows is None else rows
        new, _, moved, g, r = self.backend.newton(sub, lam[at], e[at], NEWTON_STEPS,
                                                 until_feasible)
        e[at] = moved.to(e.dtype)  # e moves up where no image within it beats these rivals
        lam[at] = new.to(lam.dtype)
        better = r > cert["r"][at]
        cert["lam"][at] = torch.where(better[:, None], new.to(cert["lam"].dtype), cert["lam"][at])
        cert["r"][at] = torch.where(better, r, cert["r"][at])
        return g, r

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

    def fall_back(self, fooled: Fooled, x, s, t, idx, pbar) -> None:
        """Where the stored step is still not proved minimal (pairs idx; pbar: their images'
        p @ W), Sign's step if it is smaller; where it still fails or sits FAR levels or more
        above the certificate (rare pairs whose stages ran out), the iterative attack's image if
        it is smaller. pbar comes from the same product as Sign's (a product over the pairs
        instead can differ in the last bit on a GPU, and flip a pixel of the direction)."""
        sign = Sign(self.model, self.confidence)
        ds = torch.sign(self.model.W[t[idx]] - pbar).to(torch.int8)
        g = self.model.estimate(ds)
        k0 = first_success(s[idx], g, t[idx], 1, self.kmax, self.confidence)
        self.keep_better(fooled, idx, sign.search(x[idx], ds, s[idx], g, t[idx], k0), t)
        far = ~self.passes(fooled.scores[idx], t[idx]) | (
            fooled.strength[idx] >= fooled.bound[idx] + FAR)
        rows = idx[far]  # the dual saw too few rivals: BIM's walk
        if len(rows):
            walk = Iterative(self.model, self.confidence).walk(x[rows], s[rows], t[rows])
            self.keep_better(fooled, rows, walk, t)


def compile_cpu() -> None:
    """Compiles the CPU's search backend (search_numba.py, numba, cached on disk next to its
    source) on a tiny random problem: otherwise the first exact attack of a fresh install takes
    about 25 s longer (2 CPUs). ``make install`` runs it (``python -m attacks.methods.exact``)."""
    rng = torch.Generator().manual_seed(0)
    W = torch.randn(20, 48, generator=rng) * 1e-3
    X = torch.randint(0, 256, (2, 48), generator=rng, dtype=torch.uint8)
    model = LinearModel(W.numpy(), torch.zeros(20).numpy())
    Exact(model)(X, model.scores(X), torch.tensor([0, 7]))


if __name__ == "__main__":
    compile_cpu()
