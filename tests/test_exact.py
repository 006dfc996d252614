"""The exact attack (attacks/methods/exact.py) against an independent LP solver (scipy's HiGHS,
benchmarks/lp.py), an independent numpy re-scoring, the two-class closed form and Sign. The
tests that take ``both`` run each search backend (attacks/methods/search.py): fused per pair
(numba, what a CPU runs) and as batched torch steps (what a GPU runs), here on the CPU; the
``agree`` tests compare the two on the same pairs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from attacks.methods import exact
from attacks.methods.base import Fooled, pairs
from attacks.methods.exact import NEWTON_STEPS, Exact
from attacks.methods.iterative import Iterative
from attacks.methods.linear import LinearModel
from attacks.methods.problem import DENSE_C, KMAX, RIDGE, Problem, _solve, onehot
from attacks.methods.search import BACKENDS, backend_for
from attacks.methods.sign import LEVELS, Sign
from benchmarks.attack_models import photo_model
from benchmarks.lp import lp_minimum, value
from common import heap
from tests.test_fooling import numpy_verdict

LP_RTOL = 1e-6  # the certificate may exceed the LP optimum by float error only


def attack(W, b, X, targets, confidence=None, cls=Exact, backend=None):
    model = LinearModel(W, b)
    Xt = torch.from_numpy(X)
    a = cls(model, confidence, backend) if cls is Exact else cls(model, confidence)
    f = a(Xt, model.scores(Xt), torch.as_tensor(targets))
    n, t = (v.numpy() for v in pairs(len(X), torch.as_tensor(targets)))
    return f, n, t, numpy_verdict(W, b, X[n], f.images.numpy(), t)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread, as the job's workers run: tiny products on a busy machine stay fast."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(params=BACKENDS)
def both(request):
    """The name of a search backend: numba (fused per pair) or torch (batched steps)."""
    return request.param


@pytest.fixture(scope="module")
def toy():
    """A random 5-class model on random 8x8x3 images: clipping matters for many pixels."""
    rng = np.random.default_rng(0)
    W = rng.normal(0, 1e-3, (5, 192)).astype(np.float32)
    b = rng.normal(0, 0.3, 5).astype(np.float32)
    return W, b, rng.integers(0, 256, (12, 192), dtype=np.uint8), np.arange(5)


@pytest.fixture(scope="module")
def photo_fit():
    """A 10-class softmax fitted on crops of scikit-learn's two photographs, 64x64x3, and its
    400 held-out crops: real images, where several rivals bind at once (the hard case for the
    dual search)."""
    return photo_model()


@pytest.fixture(scope="module")
def photos(photo_fit):
    W, b, X = photo_fit
    return W, b, X[:6]


def check_against_lp(W, b, X, f, n, t, rows, margin=0.0):
    """The certificate never above the LP optimum; the stored image at most one level above."""
    for i in rows:
        eps = lp_minimum(W, b, X[n[i]], int(t[i]), margin)
        assert f.bound[i].item() <= eps * (1 + LP_RTOL) + 1e-9, (i, eps)
        linf = np.abs(f.images[i].numpy().astype(int) - X[n[i]].astype(int)).max()
        assert linf <= eps + 1, (i, eps, linf)


def test_toy_against_the_lp(toy, both):
    W, b, X, targets = toy
    f, n, t, want = attack(W, b, X, targets, backend=both)
    assert (want["fooled_pred"] == t).all()  # every pair: the model never fails to be fooled
    moved = np.flatnonzero((X[n] @ W.T.astype(np.float64) + b).argmax(1) != t)
    assert len(moved) > 30
    check_against_lp(W, b, X, f, n, t, moved[:30])


def test_stored_bytes_are_what_is_reported(toy):
    """Strength = L-inf of the stored step; its scores are the float64 re-scoring's."""
    W, b, X, targets = toy
    f, n, t, want = attack(W, b, X, targets)
    assert np.allclose(f.scores.numpy(), want["scores"], rtol=1e-4, atol=1e-4)
    assert (want["linf"] == f.strength.numpy()).all()
    assert (f.bound.numpy() <= want["linf"]).all()
    # strength < bound + 1: the bound proves that one level less cannot work, for any image
    assert (f.strength.numpy() < f.bound.numpy() + 1).mean() >= 0.99


def test_never_above_sign(toy, photos):
    for W, b, X, targets in (toy, (*photos, np.arange(10))):
        _, _, t, mine = attack(W, b, X, targets)
        _, _, _, sign = attack(W, b, X, targets, cls=Sign)
        fooled = sign["fooled_pred"] == t
        assert (mine["fooled_pred"] == t).all()
        assert (mine["linf"][fooled] <= sign["linf"][fooled]).all()


def test_fall_back_walks_each_pair_to_its_own_target(photos, monkeypatch):
    """Where a step is not proved, Sign's and then the iterative attack's image replace it if
    smaller: all pairs sent there at once (several targets in one walk) end no higher than
    the iterative attack run target by target, and every stored image fools its target."""
    W, b, X = photos
    targets = np.arange(10)
    def unsolved(self, x, s, t):  # the dual's steps left out: the fall-back makes them all
        zero = torch.zeros(len(t))
        return Fooled(x.clone(), s.clone(), zero, zero.clone())

    monkeypatch.setattr(Exact, "solve", unsolved)
    monkeypatch.setattr(exact, "FAR", -math.inf)  # every pair walks
    f, n, t, want = attack(W, b, X, targets)
    _, _, _, walk = attack(W, b, X, targets, cls=Iterative)
    assert (want["fooled_pred"] == t).all()
    walked = walk["fooled_pred"] == t
    assert walked.sum() >= len(t) - len(X)  # all but the pairs already won
    assert (want["linf"][walked] <= walk["linf"][walked]).all()


def test_tie_system_solved_exactly_or_by_ridge():
    """A well-posed tie system is solved exactly (numpy's solve); a singular one (two rivals
    alike) and one whose exact moves leave the box get the ridge least squares, finite."""
    rng = np.random.default_rng(7)
    L = rng.normal(size=(3, 5, 5))
    L[1, 1] = L[1, 0]  # singular
    L[2, 0] = L[2, 1] + 1e-4 * rng.normal(size=5)  # near-singular: huge exact moves
    r = rng.normal(size=(3, 5))
    got = _solve(torch.from_numpy(L).float(), torch.from_numpy(r).float()).double().numpy()
    assert np.allclose(got[0], np.linalg.solve(L[0], r[0]), rtol=1e-3, atol=1e-4)
    for i in (1, 2):
        Lf = torch.from_numpy(L[i]).float().double().numpy()
        LtL = Lf.T @ Lf
        want = np.linalg.solve(LtL + RIDGE * np.trace(LtL) / 5 * np.eye(5), Lf.T @ r[i])
        assert np.isfinite(got[i]).all() and np.abs(got[i]).max() < LEVELS
        assert np.allclose(got[i], want, rtol=1e-3, atol=1e-3), (i, got[i], want)


def test_out_of_memory_halves_the_chunk(toy, monkeypatch):
    """A chunk that runs out of memory is retried as two halves: every pair solved once, the
    same results as chunks that fit from the start."""
    W, b, X, targets = toy
    monkeypatch.setattr(exact, "CHUNK", 16)
    want, *_ = attack(W, b, X, targets)
    sizes, solve = [], Exact.solve

    def small_memory(self, x, s, t):
        sizes.append(len(t))
        if len(t) > 10:
            raise torch.OutOfMemoryError("out of memory")
        return solve(self, x, s, t)

    monkeypatch.setattr(exact, "CHUNK", 60)
    monkeypatch.setattr(Exact, "solve", small_memory)
    got, *_ = attack(W, b, X, targets)
    assert sizes[:3] == [60, 30, 15] and set(sizes[3:]) <= {7, 4}
    assert sum(n for n in sizes if n <= 10) == len(X) * len(targets)
    assert torch.equal(got.strength, want.strength) and torch.equal(got.bound, want.bound)
    assert torch.equal(got.images, want.images)


def test_photos_against_the_lp(photos):
    """A handful of pairs of a 64x64x3 model fitted on real photographs."""
    W, b, X = photos
    targets = np.array([1, 4, 8])
    f, n, t, want = attack(W, b, X[:2], targets)
    assert (want["fooled_pred"] == t).all()
    check_against_lp(W, b, X[:2], f, n, t, range(len(t)))


def test_newton_reaches_the_lp_value(photos, both):
    """The root search's weights give a root below the LP's minimum, and at the integer eps
    above it Newton's method from them gives the dual value min over lambda of h(lambda, eps),
    which is the LP's best worst-case margin."""
    W, b, X = photos
    model = LinearModel(W, b)
    search = backend_for("cpu", both)
    for i, t in ((0, 4), (1, 8), (2, 1)):
        x = torch.from_numpy(X[i:i + 1])
        prob = Problem(model, x, model.scores(x), torch.tensor([t]), 0.0, search)
        lam, r, _ = search.search_weights(prob, onehot(torch.zeros(1, dtype=torch.long), prob.K),
                                          8)
        lp = lp_minimum(W, b, X[i], t)
        assert 0.5 * lp <= r.item() <= lp + 1e-3, (i, t, lp, r.item())
        eps = torch.floor(r) + 1
        lam, h, *_ = search.newton(prob, lam, eps, NEWTON_STEPS)
        z, _ = value(W, b, X[i], t, float(eps))
        scale = np.abs(W[t] - W).sum(1).max()  # the margins' change per level
        assert z - 1e-4 * scale <= h.item() <= z + 2e-3 * scale, (i, t, z, h.item())


def test_confidence_is_the_margin_form(toy):
    """With a confidence P every rival is beaten by log(P / (1 - P)), at the LP's distance."""
    W, b, X, targets = toy
    P = 0.9
    f, n, t, want = attack(W, b, X[:4], targets, confidence=P)
    S = want["scores"]
    rival = np.where(np.arange(len(W))[None] == t[:, None], -np.inf, S).max(1)
    assert (S[np.arange(len(t)), t] - rival >= math.log(P / (1 - P)) - 1e-4).all()
    check_against_lp(W, b, X[:4], f, n, t, range(0, len(t), 2), margin=math.log(P / (1 - P)))


def test_two_classes_closed_form():
    """Two classes, no clipping: the minimum is the Hoelder bound |s_0 - s_1| / ||W_0 - W_1||_1
    exactly, and the stored step is the first integer above it."""
    rng = np.random.default_rng(2)
    W = rng.normal(0, 1e-2, (2, 300)).astype(np.float32)
    X = rng.integers(100, 156, (40, 300), dtype=np.uint8)
    f, n, t, want = attack(W, np.zeros(2, np.float32), X, [0, 1])
    S = X[n].astype(np.float64) @ W.T.astype(np.float64)
    exact = np.abs(S[:, 0] - S[:, 1]) / np.abs(W[0].astype(np.float64) - W[1]).sum()
    moved = S.argmax(1) != t
    assert moved.sum() >= 30 and (want["fooled_pred"] == t).all()
    assert np.allclose(f.bound.numpy()[moved], exact[moved], rtol=1e-4)
    assert (f.bound.numpy()[moved] <= exact[moved]).all()
    assert (want["linf"][moved] == np.floor(exact[moved]) + 1).all()


def test_a_thousand_classes(both):
    """1,000 random classes on 8x8x3 images, where 5 to 15 rivals bind at the optimum (more than
    the first search weighs)."""
    check_many_classes(1000, seed=3, targets=[0, 333, 999], backend=both)


def test_a_hundred_classes_where_rivals_join_the_products_with_w(both):
    """Up to DENSE_C classes the dual's products go through W itself, and the rivals' rows are
    made only when Newton's method needs them: they must follow the rivals that join (a model of
    18 to 128 classes once failed there on its second stage)."""
    assert 2 * KMAX + 1 < 100 <= DENSE_C  # the dense path, with rivals to add
    check_many_classes(100, seed=5, targets=[0, 17, 50, 99], backend=both)


def check_many_classes(C: int, seed: int, targets: list[int], backend: str) -> None:
    """A random C-class model on three 8x8x3 images: every pair fooled, never above Sign, the
    certificate within half a level below the LP's optimum (never above it). With 192 pixels the
    LP's few fractional pixels weigh much more than on 64x64x3 images: the stored step may sit a
    few levels above."""
    W, b, X = random_model(C, 192, 3, seed)
    f, n, t, want = attack(W, b, X, np.array(targets), backend=backend)
    _, _, _, sign = attack(W, b, X, np.array(targets), cls=Sign)
    assert (want["fooled_pred"] == t).all()
    assert (want["linf"] <= np.where(sign["fooled_pred"] == t, sign["linf"], 255)).all()
    for i in range(len(t)):
        eps = lp_minimum(W, b, X[n[i]], int(t[i]))
        assert eps - 0.5 <= f.bound[i].item() <= eps * (1 + LP_RTOL) + 1e-9, (i, eps)
        assert want["linf"][i] <= 1.3 * eps + 1, (i, eps)


def random_model(C: int, D: int, N: int, seed: int):
    """W (C, D) and b (C,) float32 at random, and N random images of D pixels."""
    rng = np.random.default_rng(seed)
    W = rng.normal(0, 1e-3, (C, D)).astype(np.float32)
    b = rng.normal(0, 0.05, C).astype(np.float32)
    return W, b, rng.integers(0, 256, (N, D), dtype=np.uint8)


def each_backend(W, b, X, targets) -> tuple[dict, np.ndarray]:
    """Per backend, the stored images' L-inf (numpy's measure) and the certificates, every pair
    fooled as numpy scores it; and the pairs that move (not won by the original)."""
    out = {}
    for name in BACKENDS:
        f, n, t, want = attack(W, b, X, targets, backend=name)
        assert (want["fooled_pred"] == t).all(), name
        out[name] = (want["linf"].astype(np.int64), f.bound.numpy().astype(np.float64))
    moved = (X[n].astype(np.float64) @ W.T.astype(np.float64) + b).argmax(1) != t
    return out, moved


def check_agree(W, b, X, targets, least_proved: float) -> None:
    """The two backends on the same pairs: each stored strength within one level of the
    other's, and the proved pairs of those that move (linf - bound_linf < 1) the same up to 1%
    of them; each backend proves at least ``least_proved`` of them."""
    out, moved = each_backend(W, b, X, targets)
    (l_nb, c_nb), (l_pt, c_pt) = out["numba"], out["torch"]
    assert np.abs(l_nb - l_pt).max() <= 1, np.abs(l_nb - l_pt).max()
    proved_nb, proved_pt = (l_nb - c_nb < 1)[moved], (l_pt - c_pt < 1)[moved]
    assert np.mean(proved_nb != proved_pt) <= 0.01, (proved_nb.sum(), proved_pt.sum())
    assert min(proved_nb.mean(), proved_pt.mean()) >= least_proved, proved_nb.mean()


def test_backends_agree_at_a_thousand_classes():
    """1,000 random classes on 16x16x3 images, 8 images x 32 targets."""
    W, b, X = random_model(1000, 768, 8, seed=3)
    check_agree(W, b, X, np.linspace(0, 999, 32).round().astype(int), least_proved=0.9)


def test_backends_agree_on_photos(photo_fit):
    """The photo crops' model, 40 held-out crops x 10 targets."""
    W, b, X = photo_fit
    check_agree(W, b, X[:40], np.arange(10), least_proved=0.97)


def test_backends_agree_where_both_prove_on_tiny_images():
    """1,000 classes on 8x8x3 images, where a third of the pairs stay unproved: there the two
    backends' float32 sums, in other orders, lead the searches to other steps, a few levels
    apart. Where both prove a pair, each step is the true minimum: the same."""
    W, b, X = random_model(1000, 192, 8, seed=3)
    out, moved = each_backend(W, b, X, np.linspace(0, 999, 16).round().astype(int))
    (l_nb, c_nb), (l_pt, c_pt) = out["numba"], out["torch"]
    both = (l_nb - c_nb < 1) & (l_pt - c_pt < 1) & moved
    assert both.sum() >= 0.5 * moved.sum(), (both.sum(), moved.sum())
    assert (l_nb[both] == l_pt[both]).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_gpu_agrees_with_the_cpu(toy, photos):
    """On CUDA (its own linear algebra: a singular tie system must not stop the batch): every
    pair fooled as numpy scores it, the certificate below the step, and the same steps and
    certificates as on the CPU (up to the rounding of another order of sums)."""
    for W, b, X, targets in (toy, (*photos, np.arange(10))):
        f, n, t, _ = attack(W, b, X, targets)
        model = LinearModel(W, b, "cuda")
        Xg = torch.from_numpy(X).cuda()
        g = Exact(model)(Xg, model.scores(Xg), torch.as_tensor(targets).cuda())
        want = numpy_verdict(W, b, X[n], g.images.cpu().numpy(), t)
        assert (want["fooled_pred"] == t).all()
        assert (g.strength.cpu() == f.strength).float().mean() >= 0.95
        assert (g.bound.cpu() <= g.strength.cpu()).all()
        assert ((g.bound.cpu() - f.bound).abs() < 0.5).float().mean() >= 0.95


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_gpu_chunks_count_the_memory_that_torch_keeps_for_reuse():
    """A freed tensor's memory stays with PyTorch's allocator (the driver counts it as taken):
    exact's chunks are as large after it as before (without this, after a 65,536-pair sign attack
    on an H100, chunks of 256 pairs: a quarter of the speed)."""
    device, D = torch.device("cuda"), 64 * 64 * 3
    torch.cuda.empty_cache()
    before = exact.chunk_size(device, D)
    block = torch.empty(int(heap.gpu_free(device) // 2), dtype=torch.uint8, device=device)
    taken = block.numel()
    del block
    assert torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device) >= taken
    assert abs(exact.chunk_size(device, D) - before) <= 0.02 * before, before


def test_lp_oracle_is_tight():
    """The oracle itself: at its answer the best worst-case margin is zero, below it negative."""
    rng = np.random.default_rng(4)
    W = rng.normal(0, 1e-3, (4, 48))
    X = rng.integers(0, 256, 48)
    t = int(np.argmin(W @ X))  # the class the model likes least
    eps = lp_minimum(W, np.zeros(4), X, t)
    assert 0 < eps < 255
    assert value(W, np.zeros(4), X, t, eps)[0] == pytest.approx(0, abs=1e-7)
    assert value(W, np.zeros(4), X, t, 0.99 * eps)[0] < 0
