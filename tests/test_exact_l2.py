"""The exact L2 attack (attacks/methods/exact_l2.py) against an independent QP solver (Clarabel,
an interior-point method, in float64), an independent numpy re-scoring, and the other methods'
images of the same pairs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from attacks.methods import exact_l2, search_l2
from attacks.methods.base import pairs
from attacks.methods.exact import Exact
from attacks.methods.exact_l2 import ExactL2
from attacks.methods.iterative import Iterative
from attacks.methods.linear import LinearModel
from attacks.methods.sign import Sign
from attacks.methods.template import Template
from tests.test_exact import one_thread  # noqa: F401 (autouse: one thread, as the workers)
from tests.test_fooling import numpy_verdict

QP_RTOL = 1e-6  # the certificate may exceed the QP optimum by the solver's tolerance only
CONFIDENCE = 0.9


def qp_minimum(W, b, x, t: int, margin: float = 0.0) -> float:
    """min ||d||_2 s.t. t beats every rival by margin at x + d, 0 <= x + d <= 255 (Clarabel)."""
    clarabel = pytest.importorskip("clarabel")
    import scipy.sparse as sp

    W, b, x = (np.asarray(v, np.float64) for v in (W, b, x))
    s, rivals = W @ x + b, [k for k in range(len(W)) if k != t]
    A, q = W[t] - W[rivals], s[t] - s[rivals] - margin
    eye = sp.identity(len(x), format="csc")
    cons = sp.vstack([sp.csc_matrix(-A), eye, -eye]).tocsc()  # cons d <= rhs
    rhs = np.concatenate([q, 255 - x, x])
    settings = clarabel.DefaultSettings()
    settings.verbose = False
    settings.tol_gap_abs = settings.tol_gap_rel = settings.tol_feas = 1e-10
    sol = clarabel.DefaultSolver(eye, np.zeros(len(x)), cons, rhs,
                                 [clarabel.NonnegativeConeT(len(rhs))], settings).solve()
    assert str(sol.status) == "Solved"
    return math.sqrt(2 * sol.obj_val)


@pytest.fixture(scope="module")
def small():
    """A random 10-class model on random 10x10x3 images: clipping matters for many pixels."""
    rng = np.random.default_rng(0)
    W, b = rng.normal(0, 1e-2, (10, 300)), rng.normal(0, 1, 10)
    X = rng.integers(0, 256, (8, 300), dtype=np.uint8)
    return W.astype(np.float32), b.astype(np.float32), X, np.arange(10)


def attack(W, b, X, targets, confidence=None, cls=ExactL2):
    model = LinearModel(W, b)
    Xt = torch.from_numpy(X)
    f = cls(model, confidence)(Xt, model.scores(Xt), torch.as_tensor(targets))
    n, t = (v.numpy() for v in pairs(len(X), torch.as_tensor(targets)))
    return f, n, t, numpy_verdict(W, b, X[n], f.images.numpy(), t)


def margin_of(P):
    return 0.0 if P is None else math.log(P / (1 - P))


@pytest.mark.parametrize("confidence", [None, CONFIDENCE])
def test_certificate_and_continuous_step_against_the_qp(small, confidence):
    """On every pair that moves: the certificate never above Clarabel's optimum, the
    continuous step d(lam) within 0.1% of it and beating every rival (to 1e-6 of the step)."""
    W, b, X, targets = small
    model = LinearModel(W, b)
    n, t = pairs(len(X), torch.as_tensor(targets))
    x = torch.from_numpy(X)[n]
    attack_ = ExactL2(model, confidence)
    s = model.scores(x)
    moved = (~attack_.passes(s, t)).nonzero()[:, 0][::3]  # a third of them: Clarabel's time
    found = attack_.search(x[moved], s[moved], t[moved])
    cert = attack_.certificate(x[moved], t[moved], found).numpy()
    assert len(moved) > 20
    m = margin_of(confidence)
    for i, p in enumerate(moved.tolist()):
        opt = qp_minimum(W, b, X[n[p]], int(t[p]), m)
        d = found.d[i].astype(np.float64)
        assert cert[i] <= opt * (1 + QP_RTOL), (p, cert[i], opt)
        assert abs(np.linalg.norm(d) - opt) <= 1e-3 * opt, (p, np.linalg.norm(d), opt)
        S = (X[n[p]] + d) @ W.T.astype(np.float64) + b
        rival = np.delete(S, int(t[p])).max()
        assert S[t[p]] - rival - m >= -1e-6 * np.abs(W).sum(1).max() * np.linalg.norm(d)
        assert cert[i] >= opt * (1 - 1e-4)  # tight: the weights are the optimal ones


@pytest.mark.parametrize("confidence", [None, CONFIDENCE])
def test_stored_images_fool_near_the_certificate(small, confidence):
    """Every stored image is the target by the margin (float64 re-scoring), in 0..255; its
    L-inf is the strength; its L2 is within 1% of the certificate, or of half a level per
    changed pixel, on 99% of the pairs; pairs already won keep the original."""
    W, b, X, targets = small
    f, n, t, want = attack(W, b, X, targets, confidence)
    S = want["scores"]
    top = np.where(np.arange(S.shape[1])[None] == t[:, None], -np.inf, S).max(1)
    assert (S[np.arange(len(t)), t] - top >= margin_of(confidence) - 1e-4).all()
    assert (f.strength.numpy() == want["linf"]).all()
    bound, l2 = f.bound_l2.numpy().astype(np.float64), want["l2"]
    changed = (f.images.numpy() != X[n]).sum(1)
    assert (bound <= l2).all()
    near = (l2 <= bound * 1.01) | (l2 - bound <= 0.5 * np.sqrt(changed))
    assert near.mean() >= 0.99
    won = (X[n] @ W.T.astype(np.float64) + b).argmax(1) == t
    if confidence is None:
        assert won.any() and (f.images.numpy()[won] == X[n][won]).all()
        assert (f.bound_l2.numpy()[won] == 0).all()


def test_never_above_the_other_methods(small):
    """Where another method's image fools the model, the exact L2 image is no farther in L2."""
    W, b, X, targets = small
    _, _, t, mine = attack(W, b, X, targets)
    assert (mine["fooled_pred"] == t).all()
    for cls in (Template, Sign, Exact, Iterative):
        _, _, _, other = attack(W, b, X, targets, cls=cls)
        fooled = other["fooled_pred"] == t
        assert fooled.sum() > len(t) // 2
        assert (mine["l2"][fooled] <= other["l2"][fooled] + 1e-4).all(), cls.name


def test_fall_back_keeps_exacts_image(small, monkeypatch):
    """Where the search finds no image that passes, the L-inf exact attack's image is kept."""
    W, b, X, targets = small

    def nothing(W_, gram, T, X_, Q, RIV, LAM, KS, TAU, todo, Z, DC, flags, *rest):
        Z[todo] = 0.0  # the original image: it loses wherever the pair had to move

    monkeypatch.setattr(search_l2, "solve", nothing)
    f, n, t, want = attack(W, b, X[:2], targets)
    g, *_ = attack(W, b, X[:2], targets, cls=Exact)
    assert (want["fooled_pred"] == t).all()
    assert (f.images == g.images).all()


def test_imagenet_shape():
    """1,000 classes at 64x64x3: every pair fools its target near its certificate."""
    gen = torch.Generator().manual_seed(1)
    C, D = 1000, 64 * 64 * 3
    W = torch.randn(C, D, generator=gen) * 1e-4
    b = (torch.randn(C, generator=gen) * 0.1).numpy()
    model = LinearModel(W.numpy(), b, facts={"gram": (W @ W.T).numpy()})  # steers the search
    X = torch.randint(0, 256, (2, D), generator=gen, dtype=torch.uint8)
    targets = torch.tensor([3, 500, 999])
    f = ExactL2(model)(X, model.scores(X), targets)
    n, t = pairs(len(X), targets)
    want = numpy_verdict(W.numpy(), b, X.numpy()[n], f.images.numpy(), t.numpy())
    assert (want["fooled_pred"] == t.numpy()).all()
    bound = f.bound_l2.numpy()
    assert (bound > 0).all() and (bound <= want["l2"]).all()
    assert (want["l2"] <= bound * 1.01).all()


def test_constants_are_sane():
    assert exact_l2.KCAP >= exact_l2.GROW and exact_l2.EPS < 1e-3
