"""The exact L2 attack: the minimal L2 change, certified by the QP's Lagrangian dual
(docs/exact_l2.md).

    >>> attack = ExactL2(model)                         # CPU search (search_l2.py, numba)
    >>> fooled = attack(X, model.scores(X), targets)    # fooled.bound_l2: the certificate

Only numpy, numba and torch here: no Ray, no storage.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from attacks.methods import search_l2
from attacks.methods.base import Attack, Fooled, expand, pairs
from attacks.methods.exact import Exact
from attacks.methods.linear import BOUND_SLACK, LinearModel, _round_down

KCAP = 48  # rivals per pair at most (1,000-class models bind a handful)
CHUNK = 256  # pairs per search call and per scoring
NEWTON_STEPS = 12  # projected Newton steps per search call at most (most pairs stop in 3-8)
EPS = 1e-5  # Newton's stop: duality gap <= EPS ||d||^2, no rival short by EPS ||d|| levels
REPAIR_ROUNDS = 24  # the rounded step's repairs per search call at most
ROUNDS = 4  # search calls per pair: classes that beat the stored image join, tau grows
GROW = 8  # classes that join per round at most
TAU = 1e-6  # the repair's margin to clear, relative to the largest |score| of the original
TAU_GROWTH = 10.0  # tau's factor where float32 scoring rejects an image the repair cleared


@dataclass
class Search:
    """The search's state for P pairs: rivals (P, KCAP) int64 and their weights lam (P, KCAP)
    float64 (the first ks (P,) of each row), the continuous step d(lam) (P, D) float32, the
    integer step z (P, D) float32, flags (P,) (1: Newton converged, 2: the repair cleared
    every rival), tau (P,) score units."""

    rivals: np.ndarray
    lam: np.ndarray
    ks: np.ndarray
    d: np.ndarray
    z: np.ndarray
    flags: np.ndarray
    tau: np.ndarray


class ExactL2(Attack):
    r"""The smallest L2 perturbation that fools a linear model, with its QP-duality certificate.

    Distance measure: L2, in pixel levels. Value range: uint8 pixels 0..255 in and out.

    Reference: the minimal-distance problem of Szegedy et al., "Intriguing properties of neural
    networks" (ICLR 2014) and Carlini and Wagner, "Towards Evaluating the Robustness of Neural
    Networks" (IEEE S&P 2017), in L2, solved exactly for a linear model: ``min ||d||_2`` with
    t beating every rival by the margin inside the box 0..255 is a convex QP; its Lagrangian
    dual over the rivals' weights lam >= 0 is solved per pair (search_l2.py), and the stored
    image is the rounded step ``x + clip(sum_k lam_k (W[t] - W[k]), -x, 255 - x)``, repaired
    a pixel level at a time until the float32 scores of the stored uint8 image say t wins.
    ``bound_l2`` is ``sqrt(2 phi(lam))``, the dual function at the weights found, in float64
    and shaved: no image of any kind (integer or not) closer than it in L2 makes t win. Where
    the search fails (a pair beyond the box, or rivals past KCAP), the L-inf exact attack's
    image is kept instead. ``strength`` is the stored step's L-inf (the job's strength column
    holds levels 0..255; its L2 is the ``l2`` column).

    With ``confidence`` P the goal is the margin form, as in Exact: t beats every rival by
    ``log(P / (1 - P))``.

    Shape:
        - X: (N, D) uint8, S: (N, C) float32 scores of X, targets: (T,) int64.
        - output: ``Fooled`` with images (N*T, D) uint8, image-major, and ``bound_l2`` (N*T,).

    Examples::
        >>> attack = ExactL2(model)
        >>> fooled = attack(X, model.scores(X), torch.tensor([3, 7]))
    """

    name = "exact-l2"
    passes = Exact.passes  # the margin form of the confidence

    def __init__(self, model: LinearModel, confidence: float | None = None):
        super().__init__(model, confidence)
        self._W = np.ascontiguousarray(model.W.cpu().numpy())  # the search reads CPU memory
        self._gram = np.ascontiguousarray(model.fact("gram").double().cpu().numpy())

    def __call__(self, X, S, targets):
        _, t = pairs(len(X), targets)
        x, s = expand(X, len(targets)), expand(S, len(targets))
        out = [self.solve(x[i:i + CHUNK], s[i:i + CHUNK], t[i:i + CHUNK])
               for i in range(0, len(t), CHUNK)]
        return Fooled(*(torch.cat([getattr(f, k) for f in out])
                        for k in ("images", "scores", "strength")),
                      bound_l2=torch.cat([f.bound_l2 for f in out]))

    def solve(self, x, s, t) -> Fooled:
        """One chunk of pairs: the search, the stored images, the certificate; the L-inf exact
        attack's image where the search found none that passes."""
        P, dev = len(t), t.device
        f = Fooled(x.clone(), s.clone(), torch.zeros(P, device=dev), None,
                   torch.zeros(P, device=dev))
        idx = (~self.passes(s, t)).nonzero()[:, 0]  # pairs already won keep the original
        if len(idx) == 0:
            return f
        found = self.search(x[idx], s[idx], t[idx], f, idx)
        f.bound_l2[idx] = self.certificate(x[idx], t[idx], found).to(dev)
        lost = idx[~self.passes(f.scores[idx], t[idx])]
        if len(lost):
            self.fall_back(f, x, s, t, lost)
        f.strength = (f.images.float() - x.float()).abs().amax(1)
        return f

    def search(self, x, s, t, f: Fooled | None = None, idx=None) -> Search:
        """The dual search and the repaired steps of pairs (x (P, D) uint8, s, t), in ROUNDS
        calls: after each, the stored images are scored in float32; where a class still beats
        one, the classes that do join its rivals (tau grows where all of them were rivals
        already) and the pair goes again. Images that pass go into f's rows idx."""
        P, D = x.shape
        xc = np.ascontiguousarray(x.cpu().numpy())
        q = ((s.gather(1, t[:, None]) - s).double() - self.margin).cpu().numpy()
        scale = s.abs().amax(1).double().cpu().numpy()
        st = Search(np.zeros((P, KCAP), np.int64), np.zeros((P, KCAP)), np.zeros(P, np.int64),
                    np.zeros((P, D), np.float32), np.zeros((P, D), np.float32),
                    np.zeros(P, np.int64), TAU * np.maximum(scale, 1.0))
        tn = t.cpu().numpy()
        todo = np.arange(P)
        for _ in range(ROUNDS):
            search_l2.solve(self._W, self._gram, tn, xc, q, st.rivals, st.lam, st.ks, st.tau,
                            todo, st.z, st.d, st.flags, NEWTON_STEPS, EPS, REPAIR_ROUNDS)
            rows = torch.from_numpy(todo).to(t.device)
            img = (x[rows].float() + torch.from_numpy(st.z[todo]).to(x.device)).to(torch.uint8)
            sc = self.model.scores(img)
            ok = self.passes(sc, t[rows])
            if f is not None:
                f.images[idx[rows[ok]]], f.scores[idx[rows[ok]]] = img[ok], sc[ok]
            todo = todo[~ok.cpu().numpy()]
            if len(todo) == 0:
                break
            self.join(st, todo, sc[~ok].cpu(), tn[todo])
        return st

    def join(self, st: Search, todo: np.ndarray, sc: torch.Tensor, t: np.ndarray) -> None:
        """Pairs todo lost with scores sc: the classes that beat their image (by less than the
        margin) join their rivals, GROW at most, strongest first; where none is new and the
        repair had cleared them all, float32's scoring disagreed with the repair's sums: tau
        grows."""
        beat = (sc.gather(1, torch.from_numpy(t)[:, None]) - sc - self.margin).double().numpy()
        beat[np.arange(len(t)), t] = np.inf
        for i, p in enumerate(todo):
            have = set(st.rivals[p, :st.ks[p]].tolist())
            new = [k for k in np.argsort(beat[i])[:GROW + len(have)].tolist()
                   if beat[i, k] < st.tau[p] and k not in have][:KCAP - st.ks[p]][:GROW]
            if not new:
                st.tau[p] *= TAU_GROWTH if st.flags[p] & 2 else 1.0
                continue
            st.rivals[p, st.ks[p]:st.ks[p] + len(new)] = new
            st.lam[p, st.ks[p]:st.ks[p] + len(new)] = 0.0
            st.ks[p] += len(new)

    def certificate(self, x, t, st: Search) -> torch.Tensor:
        """sqrt(2 phi(lam)) for the weights found, in float64 from the float32 W and b taken as
        exact numbers, less a bound on float64's rounding, shaved by BOUND_SLACK and rounded
        down to float32; capped at the box's farthest point (docs/exact_l2.md, section 5)."""
        lam = np.where(np.arange(KCAP)[None] < st.ks[:, None], np.maximum(st.lam, 0.0), 0.0)
        b, t = self.model.b.cpu().double().numpy(), t.cpu().numpy()
        bias = (lam * (b[t][:, None] - b[st.rivals] - self.margin)).sum(1)
        xc = np.ascontiguousarray(x.cpu().numpy())
        phi, err = search_l2.dual_values(self._W, t, xc, st.rivals, lam, st.ks, bias)
        far = (np.maximum(xc, 255 - xc).astype(np.float64) ** 2).sum(1)
        bound = np.sqrt(np.minimum(2 * np.maximum(phi - err, 0.0), far))
        return _round_down(torch.from_numpy(bound) * (1 - BOUND_SLACK))

    def fall_back(self, f: Fooled, x, s, t, rows) -> None:
        """Pairs rows that no repaired step fooled: the L-inf exact attack's image (which
        passes wherever any image can), a target at a time."""
        exact = Exact(self.model, self.confidence)
        for target in t[rows].unique():
            r = rows[t[rows] == target]
            other = exact(x[r], s[r], target[None])
            ok = self.passes(other.scores, t[r])
            f.images[r[ok]], f.scores[r[ok]] = other.images[ok], other.scores[ok]


def compile_cpu() -> None:
    """Compiles the search's kernels (search_l2.py, numba, cached on disk next to its source)
    on a tiny random problem: otherwise the first exact-l2 attack of a fresh install takes
    about 20 s longer (2 CPUs). ``make install`` runs it (``python -m
    attacks.methods.exact_l2``)."""
    rng = np.random.default_rng(0)
    model = LinearModel(rng.normal(0, 1e-2, (6, 30)), np.zeros(6))
    X = torch.from_numpy(rng.integers(0, 256, (2, 30), dtype=np.uint8))
    ExactL2(model, 0.9)(X, model.scores(X), torch.tensor([0, 3]))


if __name__ == "__main__":
    compile_cpu()
