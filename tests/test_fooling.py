"""The fooling math (attacks/methods/: linear.py, base.py, one file per attack), against oracles:
the blog's toy example, an independent numpy re-scoring of every stored image, brute-force scans,
the two-class case where the certified bound is exact, and the regularization trade-off."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from attacks.methods.base import first_success, pairs
from attacks.methods.iterative import Iterative
from attacks.methods.linear import LinearModel, measure
from attacks.methods.sign import Sign
from attacks.methods.template import TEMPLATE_RES, Template
from benchmarks.attack_models import fit_softmax, load_split

ATTACKS = (Template, Sign, Iterative)


def softmax64(S: np.ndarray) -> np.ndarray:
    e = np.exp(S - S.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def numpy_verdict(W, b, X, stored, t) -> dict:
    """The oracle: re-score the stored bytes in float64 numpy, measure them from scratch."""
    S = stored.astype(np.float64) @ W.astype(np.float64).T + b.astype(np.float64)
    diff = stored.astype(np.int64) - X.astype(np.int64)
    return {"fooled_pred": S.argmax(1), "p_target": softmax64(S)[np.arange(len(t)), t],
            "linf": np.abs(diff).max(1), "l2": np.sqrt((diff ** 2).sum(1)), "scores": S}


@pytest.fixture(scope="module")
def toy():
    """A random 5-class model on random 8x8x3 images: clipping matters for many pixels."""
    rng = np.random.default_rng(0)
    C, D, N = 5, 8 * 8 * 3, 12
    W = rng.normal(0, 1e-3, (C, D)).astype(np.float32)
    b = rng.normal(0, 0.3, C).astype(np.float32)
    X = rng.integers(0, 256, (N, D), dtype=np.uint8)
    return W, b, X, np.arange(C)


def test_blog_toy_example():
    """Karpathy's example: x.w = -3 (p = 0.0474); x + 0.5 w scores 2 (p = 0.88)."""
    x = np.array([2, -1, 3, -2, 2, 2, 1, -4, 5, 1], np.float64)
    w = np.array([-1, -1, 1, -1, 1, -1, 1, 1, -1, 1], np.float64)
    model = LinearModel(np.stack([np.zeros(10), w]), np.zeros(2))  # no bias; class 0 scores 0
    s = model.scores(torch.tensor(x[None]))
    assert s[0, 1].item() == -3
    assert torch.softmax(s, 1)[0, 1].item() == pytest.approx(0.0474, abs=5e-5)  # sigmoid(-3)
    s2 = model.scores(torch.tensor((x + 0.5 * w)[None]))
    assert s2[0, 1].item() == 2
    assert torch.softmax(s2, 1)[0, 1].item() == pytest.approx(0.88, abs=1e-3)
    # the exact step along w, in O(C) from the Gram column W w = [0, ||w||^2]
    g, t = model.fact("gram")[1][None], torch.tensor([1])
    assert g[0, 1].item() == 10
    assert first_success(s, g, t, 100, 10_000, None).item() == 31  # a > 0.3 flips it
    assert first_success(s, g, t, 100, 10_000, 0.88).item() == 50  # p = 0.88 at a = 0.4992
    # the certified bounds: |s_0 - s_1| / ||w||, reached along sign(w) (L-inf) and w (L2)
    bl, b2 = model.bounds(s, t)
    assert bl.item() == pytest.approx(0.3, rel=1e-4) and bl.item() <= 0.3
    assert b2.item() == pytest.approx(3 / math.sqrt(10), rel=1e-4)
    assert b2.item() <= 3 / math.sqrt(10)


@pytest.mark.parametrize("confidence", [None, 0.7])
def test_first_success_matches_a_scan(confidence):
    """The O(C) step on the linear model equals a brute-force scan of the grid."""
    rng = np.random.default_rng(1)
    P, C, res, kmax = 300, 6, 4, 255 * 4
    s = torch.tensor(rng.normal(0, 3, (P, C)))
    g = torch.tensor(rng.normal(0, 0.2, (P, C)))
    t = torch.tensor(rng.integers(0, C, P))
    g[torch.arange(P), t] += 0.3  # most targets reachable, some not
    got = first_success(s, g, t, res, kmax, confidence).numpy()
    a = np.arange(kmax + 1) / res
    lin = s.numpy()[:, None, :] + a[None, :, None] * g.numpy()[:, None, :]  # (P, K, C)
    ok = lin.argmax(2) == t.numpy()[:, None]
    if confidence is not None:
        p = np.exp(lin - lin.max(2, keepdims=True))
        ok &= (p / p.sum(2, keepdims=True))[np.arange(P), :, t.numpy()] >= confidence
    want = np.where(ok.any(1), ok.argmax(1), kmax + 1)
    assert (got == want).all()
    assert P // 2 < (want <= kmax).sum() < P  # neither "nothing works" nor "all work"


@pytest.mark.parametrize("attack", ATTACKS, ids=lambda a: a.name)
@pytest.mark.parametrize("confidence", [None, 0.9])
def test_numpy_rescoring_agrees(toy, attack, confidence):
    """Every reported measurement is that of the stored bytes; successes really are fooled."""
    W, b, X, targets = toy
    model = LinearModel(W, b)
    Xt = torch.from_numpy(X)
    S = model.scores(Xt)
    f = attack(model, confidence)(Xt, S, torch.tensor(targets))
    n, t = (v.numpy() for v in pairs(len(X), torch.tensor(targets)))
    stored = f.images.numpy()
    want = numpy_verdict(W, b, X[n], stored, t)
    got = measure(Xt[n], f.images, f.scores, torch.tensor(t))
    assert (got["fooled_pred"].numpy() == want["fooled_pred"]).all()
    assert np.allclose(got["p_target"].numpy(), want["p_target"], atol=1e-5)
    assert (got["linf"].numpy() == want["linf"]).all()
    assert np.allclose(got["l2"].numpy(), want["l2"], rtol=1e-6)
    assert np.allclose(f.scores.numpy(), want["scores"], rtol=1e-4, atol=1e-4)
    fooled = want["fooled_pred"] == t
    assert fooled.mean() > 0.8
    if confidence is not None:  # where the search says it got there, it did
        assert (want["p_target"][fooled & (f.strength.numpy() < 255)] >= confidence).all()
    margin = attack(model, confidence).margin
    bl, b2 = model.bounds(S[torch.from_numpy(n)], torch.from_numpy(t), margin)
    assert (bl.numpy()[fooled] <= want["linf"][fooled]).all()
    assert (b2.numpy()[fooled] <= want["l2"][fooled]).all()
    if attack is Iterative:  # the iterate stays in the ball of the reported radius
        assert (want["linf"] <= f.strength.numpy()).all()


def test_sign_eps_is_minimal(toy):
    """eps - 1 does not fool: the eps - 1 image follows from the stored one alone, because
    clip(x + e d) - x = d min(e, room) per pixel, so the (e - 1) step is that clamped to e - 1."""
    W, b, X, targets = toy
    model = LinearModel(W, b)
    f = Sign(model)(torch.from_numpy(X), model.scores(torch.from_numpy(X)), torch.tensor(targets))
    n, t = (v.numpy() for v in pairs(len(X), torch.tensor(targets)))
    x0, stored, eps = X[n].astype(np.int64), f.images.numpy().astype(np.int64), f.strength.numpy()
    fooled = numpy_verdict(W, b, X[n], f.images.numpy(), t)["fooled_pred"] == t
    moved = fooled & (eps >= 1)
    assert moved.sum() > len(t) // 2 and (eps == np.round(eps)).all()
    e1 = (eps - 1)[:, None]
    before = x0 + np.clip(stored - x0, -e1, e1)
    assert (numpy_verdict(W, b, X[n], before, t)["fooled_pred"][moved] != t[moved]).all()


def test_template_strength_is_minimal_on_its_grid(toy):
    """The template step one grid point (1/8 level) weaker does not fool."""
    W, b, X, targets = toy
    model = LinearModel(W, b)
    attack = Template(model)
    Xt = torch.from_numpy(X)
    f = attack(Xt, model.scores(Xt), torch.tensor(targets))
    n, t = pairs(len(X), torch.tensor(targets))
    k = torch.round(f.strength * TEMPLATE_RES).long()
    fooled = (numpy_verdict(W, b, X[n.numpy()], f.images.numpy(), t.numpy())["fooled_pred"]
              == t.numpy()) & (k.numpy() >= 1)
    d, _ = attack.direction(Xt, model.scores(Xt), torch.tensor(targets))
    before = attack.image_at(Xt[n], d, k - 1).numpy()
    assert fooled.sum() > len(t) // 2
    assert (numpy_verdict(W, b, X[n.numpy()], before, t.numpy())["fooled_pred"][fooled]
            != t.numpy()[fooled]).all()


def test_two_classes_sign_meets_the_certified_bound():
    """With two classes, sign(grad log p_t) = sign(W[t] - W[k]) is the best L-inf direction:
    without clipping the smallest eps is the first integer above the certified bound."""
    rng = np.random.default_rng(2)
    W = rng.normal(0, 1e-2, (2, 300)).astype(np.float32)
    X = rng.integers(100, 156, (40, 300), dtype=np.uint8)  # mid-grey: no pixel clips
    model = LinearModel(W, np.zeros(2, np.float32))
    Xt, targets = torch.from_numpy(X), torch.tensor([0, 1])
    S = model.scores(Xt)
    f = Sign(model)(Xt, S, targets)
    n, t = pairs(len(X), targets)
    bound, _ = model.bounds(S[n], t)
    moved = S[n].argmax(1) != t
    assert moved.sum() >= 30 and (f.strength[moved] < 100).all()
    assert (f.strength[moved] == torch.floor(bound[moved]) + 1).all()


@pytest.mark.slow
def test_stronger_regularization_needs_larger_perturbations(ingested):
    """Two small models on the same data: the heavily regularized one (smoother templates,
    smaller scores) needs larger steps to make the target 99% probable, with every method."""
    X, y, _ = load_split(ingested, "train")
    Xv, _, _ = load_split(ingested, "val")
    C = int(y.max()) + 1
    medians = {}
    for l2 in (1e-3, 1.0):
        model = LinearModel(*fit_softmax(X, y, C, l2))
        Xt = torch.from_numpy(Xv.copy())
        S = model.scores(Xt)
        n, t = pairs(len(Xv), torch.arange(C))
        moved = S.argmax(1)[n] != t
        for attack in (Template, Sign):
            f = attack(model, 0.99)(Xt, S, torch.arange(C))
            m = measure(Xt[n], f.images, f.scores, t)
            medians[l2, attack.name] = (m["linf"][moved].median().item(),
                                        m["l2"][moved].median().item())
    for name in ("template", "sign"):
        weak, strong = medians[1e-3, name], medians[1.0, name]
        assert strong[0] > 1.2 * weak[0] and strong[1] > 1.2 * weak[1], medians


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("attack", ATTACKS, ids=lambda a: a.name)
def test_gpu_agrees_with_numpy(toy, attack):
    W, b, X, targets = toy
    model = LinearModel(W, b, "cuda")
    Xt = torch.from_numpy(X).cuda()
    f = attack(model)(Xt, model.scores(Xt), torch.tensor(targets).cuda())
    n, t = (v.cpu().numpy() for v in pairs(len(X), torch.tensor(targets)))
    want = numpy_verdict(W, b, X[n], f.images.cpu().numpy(), t)
    assert (f.scores.argmax(1).cpu().numpy() == want["fooled_pred"]).all()
    cpu = attack(LinearModel(W, b))(torch.from_numpy(X), LinearModel(W, b).scores(
        torch.from_numpy(X)), torch.tensor(targets))
    assert (cpu.strength == f.strength.cpu()).float().mean() > 0.95


FAULTS = """
import resource, sys, torch
from common import heap
if sys.argv[1] == "reuse":
    assert heap.reuse_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones(2**24 + 2**22).sum()
before = faults()
for i in range(12):  # 96 to 160 MB blocks, made and freed as the attacks' chunks are
    torch.ones(2**23 * (3 + i % 3)).sum()
print(faults() - before)
"""


def test_workers_reuse_freed_memory():
    """The kernel's own count of page faults over twelve large tensors made and freed: under
    glibc's defaults every one faults in all its pages afresh (1.5 GB: 393,216 pages of 4 KB),
    with the workers' heap (common/heap.py) most pages are reused."""
    run = [subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True,
                          check=True, cwd=Path(__file__).parent.parent) for mode in ("", "reuse")]
    fresh, reused = (int(r.stdout) for r in run)
    assert fresh >= 12 * 96 * 2**20 // 4096  # at least every page of the smallest blocks
    assert reused < fresh / 2
