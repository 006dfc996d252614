"""The dual search's interface (attacks/methods/search.py): the backend chosen per device, the
constants reaching both backends, and both backends' g and root against numpy. The whole
search both ways, against the LP and against each other: tests/test_exact.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attacks.methods.exact import Exact
from attacks.methods.linear import LinearModel
from attacks.methods.problem import DENSE_C, Constants, Problem, onehot
from attacks.methods.search import BACKENDS, backend_for


@pytest.fixture(scope="module")
def chunk():
    """A random 200-class model (more than DENSE_C: the backends make g) and 6 pairs of random
    300-pixel images with targets the model does not predict."""
    rng = np.random.default_rng(0)
    C, D = 200, 300
    assert C > DENSE_C
    W = rng.normal(0, 1e-3, (C, D)).astype(np.float32)
    b = rng.normal(0, 0.05, C).astype(np.float32)
    X = rng.integers(0, 256, (6, D), dtype=np.uint8)
    model = LinearModel(W, b)
    x = torch.from_numpy(X)
    s = model.scores(x)
    t = (s.argmax(1) + 1 + torch.arange(6) * 31) % C
    return model, x, s, t


def problem(chunk, backend) -> Problem:
    model, x, s, t = chunk
    return Problem(model, x, s, t, 0.0, backend)


def test_the_backend_follows_the_device():
    assert backend_for("cpu").name == "numba"
    assert backend_for(torch.device("cuda", 0)).name == "torch"
    assert [backend_for("cpu", name).name for name in BACKENDS] == list(BACKENDS)
    with pytest.raises(ValueError, match="CPUs only"):
        backend_for("cuda", "numba")
    with pytest.raises(ValueError, match="unknown search backend"):
        backend_for("cpu", "fused")


def test_exact_picks_its_backend_once(chunk):
    model = chunk[0]
    assert Exact(model).backend.name == "numba"
    assert Exact(model, 0.9, "torch").backend.name == "torch"


@pytest.mark.parametrize("name", BACKENDS)
def test_g_and_root_against_numpy(chunk, name):
    """g = sum_k lam_k (W[t] - W[k]) against float64 numpy (the float32 sums, to rounding), and
    the root in eps of lq + sum_j |g_j| min(eps, R_j) for a float64 g: the function is 0 there
    and negative just below (R_j: pixel j's room towards sign(g_j))."""
    backend = backend_for("cpu", name)
    prob = problem(chunk, backend)
    model, x = chunk[0], chunk[1].numpy().astype(np.float64)
    lam = torch.from_numpy(np.random.default_rng(1).dirichlet(np.ones(prob.K), len(x)))
    W, t, k = model.W.double().numpy(), prob.t.numpy(), prob.rivals.numpy()
    want = np.einsum("pk,pkd->pd", lam.numpy(), W[t][:, None, :] - W[k])
    got = backend.g(prob, lam)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert np.allclose(got.numpy(), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    g = torch.from_numpy(want)
    room = np.where(want > 0, 255 - x, x)
    lq = -0.5 * (np.abs(want) * room).sum(1)  # a root inside 0..255 for every pair

    def h(eps):
        return lq + (np.abs(want) * np.minimum(eps[:, None], room)).sum(1)

    r = backend.root(prob, g, torch.from_numpy(lq)).numpy()
    assert ((0 < r) & (r < 255)).all()
    scale = np.abs(want).sum(1)  # h's largest slope
    assert np.allclose(h(r), 0, atol=1e-9 * scale.max())
    assert (h(r - 1e-6) < 0).all()


@pytest.mark.parametrize("name", BACKENDS)
def test_the_constants_reach_the_backend(chunk, name):
    """SMO with ``converged`` huge stops at once, and Newton's method with ``feasible`` far below
    zero takes no step (every corner counts as feasible): the weights come back as they went
    in. With the defaults both move them."""
    lam0 = onehot(torch.zeros(len(chunk[3]), dtype=torch.long), problem(chunk, None).K)
    default = backend_for("cpu", name)
    lam, r, _ = default.search_weights(problem(chunk, default), lam0, 8)
    assert not torch.equal(lam, lam0)
    eps = torch.floor(r) + 1
    moved, *_ = default.newton(problem(chunk, default), lam, eps, 8, until_feasible=True)
    assert not torch.equal(moved, lam)

    still = backend_for("cpu", name, Constants(converged=1e300))
    assert torch.equal(still.search_weights(problem(chunk, still), lam0, 8)[0], lam0)
    still = backend_for("cpu", name, Constants(feasible=-1e300))
    held, _, e, *_ = still.newton(problem(chunk, still), lam, eps, 8, until_feasible=True)
    assert torch.equal(held, lam) and torch.equal(e, eps.double())


@pytest.mark.parametrize("grid, octaves", [(16, 12), (8, 5)])
def test_the_line_search_grid_bins_by_float_bits(grid, octaves):
    """A positive step's bin from its float32 bits (exponent and top mantissa bits, as both
    backends' line searches compute it) is the grid point just above it: the steps in bin i lie
    in [grid[i - 1], grid[i])."""
    c = Constants(line_grid=grid, line_octaves=octaves)
    points = c.grid()
    assert len(points) == 2 * grid * octaves and (np.diff(points) > 0).all()
    assert points[grid * octaves - 1] == 1.0 and points[-1] == 2.0 ** octaves
    rng = np.random.default_rng(2)
    a = (2.0 ** rng.uniform(-octaves, octaves, 10_000)).astype(np.float32)
    a = np.concatenate([a, points[:-1], np.float32([2.0 ** -octaves])])
    bins = ((a.view(np.int32) >> c.bin_shift) & ((1 << (32 - c.bin_shift)) - 1)) - c.first_bin
    assert (a < points[bins]).all()
    assert (points[np.maximum(bins - 1, 0)] <= np.where(bins > 0, a, np.inf)).all()
    with pytest.raises(ValueError, match="power of 2"):
        Constants(line_grid=12)
