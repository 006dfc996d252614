"""The fused per-pair pieces of the dual search (attacks/methods/search_numba.py) against numpy
and against the batched torch versions in attacks/methods/search_torch.py. The whole search, both
ways, is checked against the LP in tests/test_exact.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attacks.methods import search_numba, search_torch


def test_root_matches_the_batched_one():
    """The root in eps of lq + sum_r hist_r min(eps, r) and the slope there, as search_torch.root
    gives them: a root inside, one at 0, and none up to 255 (inf)."""
    rng = np.random.default_rng(0)
    hist = rng.exponential(1.0, (6, 256)) * (rng.random((6, 256)) < 0.3)
    lq = np.array([-500.0, -20.0, -3000.0, 0.0, 1.0, -1e9])
    want_r, want_s = search_torch.root(torch.from_numpy(hist), torch.from_numpy(lq))
    for i in range(len(lq)):
        r, s = search_numba._root(hist[i], lq[i])
        assert r == pytest.approx(want_r[i].item(), rel=1e-12, abs=1e-12)
        assert s == pytest.approx(want_s[i].item(), rel=1e-12)
    assert np.isinf(search_numba._root(hist[5], lq[5])[0])
    assert search_numba._root(hist[4], lq[4])[0] == 0


def test_kernel_pixels_are_the_nearest_to_a_kink():
    """About the n4 pixels with the smallest |g_j| (those of the last bin counted in arbitrary
    order within 1/16 of an octave), and tau the nk-th smallest of them (at least a floor
    times the mean |g_j|)."""
    rng = np.random.default_rng(1)
    D, n4, nk = 5000, 512, 128
    g = (rng.standard_normal(D) * rng.exponential(1.0, D)).astype(np.float32)
    g[:7] = 0.0  # pixels where the rows are equal
    idx, absg = np.empty(n4, np.int64), np.empty(D, np.float32)
    counts = np.empty(1 << (32 - search_numba.SELECT_SHIFT), np.int64)
    c, tau = search_numba._nearest(g, n4, nk, idx, absg, counts, 1e-3)
    assert c == n4 and len(set(idx.tolist())) == n4
    chosen = np.abs(g[idx])
    rest = np.delete(np.abs(g), idx)
    assert chosen.max() <= rest.min() * (1 + 1 / 16)
    assert set(range(7)) <= set(idx.tolist())
    assert tau == np.sort(chosen)[nk - 1]
    flat = np.full(D, 3.0, np.float32)  # every |g_j| equal: the floor is the mean's 1e-3
    c, tau = search_numba._nearest(flat, n4, nk, idx, absg, counts, 2.0)
    assert c == n4 and tau == pytest.approx(6.0)


def test_kth_smallest_against_a_sort():
    """Hoare's selection on random, repeated, sorted, reversed and constant values."""
    rng = np.random.default_rng(4)
    cases = [rng.standard_normal(1000), rng.integers(0, 5, 777).astype(float),
             np.arange(300.0), np.arange(300.0)[::-1], np.full(50, 2.5), np.array([7.0])]
    for v in cases:
        v = v.astype(np.float32)
        for k in {0, len(v) // 3, len(v) - 1}:
            assert search_numba._kth(v.copy(), k) == np.sort(v)[k]


def test_small_solves_and_weighted_products_against_numpy():
    rng = np.random.default_rng(2)
    for n in (2, 9, 57):
        Mx = rng.standard_normal((n, n)) + n * np.eye(n)
        rhs = rng.standard_normal(n)
        want = np.linalg.solve(Mx, rhs)
        assert np.allclose(search_numba._solve(Mx.copy(), rhs.copy()), want, rtol=1e-10, atol=1e-12)
    singular = np.ones((3, 3))
    assert (search_numba._solve(singular, np.ones(3)) == 0).all()
    cols = rng.standard_normal((16, 300)).astype(np.float32)
    w = rng.random(300).astype(np.float32)
    want = (cols[:, :250].astype(np.float64) * w[:250]) @ cols[:, :250].T.astype(np.float64)
    assert np.allclose(search_numba._weighted_gram(cols, w, 250), want, rtol=1e-4, atol=1e-4)


def test_the_kkt_step_keeps_the_simplex():
    """The step sums to zero over the free rivals, is zero on the others, and solves
    H d + nu = -grad there (H damped)."""
    rng = np.random.default_rng(3)
    K = 6
    B = rng.standard_normal((K, K))
    H = B @ B.T + np.eye(K)
    grad = rng.standard_normal(K)
    free = np.array([True, True, False, True, False, True])
    d = search_numba._kkt_step(H, grad, free, 1e-3)
    want = search_torch._kkt_step(torch.from_numpy(H)[None], torch.from_numpy(grad)[None],
                                  torch.from_numpy(free)[None], 1e-3)[0].numpy()
    assert np.allclose(d, want, atol=1e-10)
    assert abs(d[free].sum()) < 1e-12 and (d[~free] == 0).all()
