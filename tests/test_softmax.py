"""The classifier's math against independent oracles: numpy, finite differences, brute force."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from training import epochs, softmax

N, D, C = 12, 4 * 4 * 3, 5


@pytest.fixture
def problem():
    """Random normalized inputs, labels and weights (float64 for the oracles)."""
    rng = np.random.default_rng(0)
    return (rng.normal(size=(N, D)), rng.integers(0, C, N), rng.normal(0, 0.1, (C, D)),
            rng.normal(0, 0.1, C))


def numeric_grad(f, x: np.ndarray, coords, h: float = 1e-6) -> np.ndarray:
    """Central differences of scalar f at the given coordinates of x."""
    out = []
    for idx in coords:
        old = x[idx]
        x[idx] = old + h
        up = f()
        x[idx] = old - h
        down = f()
        x[idx] = old
        out.append((up - down) / (2 * h))
    return np.array(out)


def test_reference_gradient_matches_finite_differences(problem):
    X, y, W, b = problem
    reg = 0.3
    _, dW, db = softmax.reference_loss_grad(W, b, X, y, reg)

    def loss():
        return softmax.reference_loss_grad(W, b, X, y, reg)[0]

    rng = np.random.default_rng(1)
    coords = [tuple(rng.integers(0, s) for s in W.shape) for _ in range(20)]
    np.testing.assert_allclose(numeric_grad(loss, W, coords), [dW[c] for c in coords],
                               rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(numeric_grad(loss, b, [(k,) for k in range(C)]), db,
                               rtol=1e-5, atol=1e-8)


def test_reference_loss_is_textbook_cross_entropy(problem):
    X, y, W, b = problem
    scores = X @ W.T + b
    p = np.exp(scores) / np.exp(scores).sum(1, keepdims=True)
    expected = -np.mean(np.log(p[np.arange(N), y])) + 0.5 * 2.0 * (W**2).sum()
    assert softmax.reference_loss_grad(W, b, X, y, 2.0)[0] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("reg", [0.0, 0.1, 100.0])
def test_torch_loss_and_gradient_match_numpy(problem, reg):
    X, y, W, b = problem
    model = torch.nn.Linear(D, C).double()
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(W))
        model.bias.copy_(torch.from_numpy(b))
    loss, data_loss = softmax.objective(model(torch.from_numpy(X)), torch.from_numpy(y),
                                        model.weight, reg)
    loss.backward()
    ref_loss, dW, db = softmax.reference_loss_grad(W, b, X, y, reg)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-10)
    assert data_loss.item() == pytest.approx(ref_loss - 0.5 * reg * (W**2).sum(), rel=1e-10)
    np.testing.assert_allclose(model.weight.grad.numpy(), dW, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(model.bias.grad.numpy(), db, rtol=1e-8, atol=1e-12)


def test_bias_is_not_regularized(problem):
    X, y, W, b = problem
    _, _, db0 = softmax.reference_loss_grad(W, b, X, y, 0.0)
    _, _, db1 = softmax.reference_loss_grad(W, b, X, y, 50.0)
    np.testing.assert_allclose(db0, db1)


def test_channel_stats_follow_hwc_order():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (4, 4, 3)).astype(np.float64)
    mean, std = [10.0, 20.0, 30.0], [2.0, 4.0, 8.0]
    shift, scale = softmax.channel_stats(mean, std, image.size)
    expected = ((image - np.array(mean)) / np.array(std)).reshape(-1)  # per channel, then HWC
    got = softmax.normalize(torch.from_numpy(image.reshape(1, -1)), shift, scale)[0]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)


def test_folded_weights_score_raw_pixels_like_the_model():
    rng = np.random.default_rng(3)
    mean, std = [120.0, 110.0, 100.0], [60.0, 55.0, 58.0]
    shift, scale = softmax.channel_stats(mean, std, D)
    model = softmax.make_model(D, C, init_std=0.05, seed=3)
    with torch.no_grad():
        model.bias.copy_(torch.randn(C))
    x = rng.integers(0, 256, (50, D)).astype(np.uint8)
    with torch.no_grad():
        want = model(softmax.normalize(torch.from_numpy(x), shift, scale)).double().numpy()
    W, b = softmax.fold(model.weight, model.bias, shift, scale)
    assert W.dtype == np.float32 and W.shape == (C, D) and b.shape == (C,)
    got = x.astype(np.float64) @ W.T.astype(np.float64) + b
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert (got.argmax(1) == want.argmax(1)).all()


def test_initial_loss_is_near_ln_c():
    C_big = 1000
    model = softmax.make_model(D * 64, C_big, init_std=1e-3, seed=0)
    X = torch.randn(256, D * 64)  # normalized inputs: unit variance per feature
    y = torch.randint(0, C_big, (256,))
    _, data_loss = softmax.objective(model(X), y, model.weight, reg=0.1)
    assert data_loss.item() == pytest.approx(math.log(C_big), abs=0.05)


def test_init_is_seeded_and_zero_bias():
    a, b = softmax.make_model(D, C, 1e-3, seed=7), softmax.make_model(D, C, 1e-3, seed=7)
    assert torch.equal(a.weight, b.weight) and not a.bias.any()
    assert not torch.equal(a.weight, softmax.make_model(D, C, 1e-3, seed=8).weight)
    assert a.weight.std().item() == pytest.approx(1e-3, rel=0.2)


def test_topk_correct_matches_brute_force():
    rng = np.random.default_rng(4)
    scores, y = rng.normal(size=(40, 7)), rng.integers(0, 7, 40)
    rank = (scores > scores[np.arange(40), y][:, None]).sum(1)  # classes scored above the label
    got = softmax.topk_correct(torch.from_numpy(scores), torch.from_numpy(y), (1, 3, 5))
    assert got.tolist() == [int((rank < k).sum()) for k in (1, 3, 5)]
    # with fewer classes than k, top-k is every class
    two = softmax.topk_correct(torch.from_numpy(scores[:, :2]), torch.from_numpy(y % 2))
    assert two.tolist()[1] == 40


def test_one_sgd_step_follows_the_numpy_gradient(problem):
    X, y, W, b = problem
    shift, scale = torch.zeros(D, dtype=torch.float64), torch.ones(D, dtype=torch.float64)
    model = torch.nn.Linear(D, C).double()
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(W))
        model.bias.copy_(torch.from_numpy(b))
    opt = epochs.make_optimizer("sgd", model.parameters(), lr=0.5, momentum=0.0)
    batch = [(torch.from_numpy(X), torch.from_numpy(y))]
    sums, first = epochs.train_epoch(model, model, opt, batch, shift, scale, 0.2, lambda i: 0.5)
    loss, dW, db = softmax.reference_loss_grad(W, b, X, y, 0.2)
    # (normalize casts the inputs to float32, as the pixels' uint8 allows)
    np.testing.assert_allclose(model.weight.detach().numpy(), W - 0.5 * dW, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(model.bias.detach().numpy(), b - 0.5 * db, rtol=1e-5, atol=1e-7)
    assert first.item() == pytest.approx(loss - 0.1 * (W**2).sum(), rel=1e-6)
    assert sums[3].item() == N


def test_evaluate_and_summarize_match_numpy(problem):
    X, y, W, b = problem
    model = torch.nn.Linear(D, C).double()
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(W))
        model.bias.copy_(torch.from_numpy(b))
    shift, scale = torch.zeros(D, dtype=torch.float64), torch.ones(D, dtype=torch.float64)
    halves = [(torch.from_numpy(X[:5]), torch.from_numpy(y[:5])),
              (torch.from_numpy(X[5:]), torch.from_numpy(y[5:]))]
    sums = epochs.evaluate(model, halves, shift, scale)
    row = epochs.summarize(3, sums, sums, reg_loss=0.0, seconds=2.0)
    scores = X @ W.T + b
    assert row["val_loss"] == pytest.approx(softmax.reference_loss_grad(W, b, X, y, 0)[0], 1e-5)
    assert row["val_top1"] == pytest.approx(np.mean(scores.argmax(1) == y), abs=1e-6)
    assert row["epoch"] == 3 and row["val_rows"] == N and row["samples_per_s"] == N / 2


def test_cosine_schedule():
    assert epochs.lr_at(0.1, "cosine", 0.0) == pytest.approx(0.1)
    assert epochs.lr_at(0.1, "cosine", 0.5) == pytest.approx(0.05)
    assert epochs.lr_at(0.1, "cosine", 1.0) == pytest.approx(0.0, abs=1e-12)
    assert epochs.lr_at(0.1, "constant", 0.9) == 0.1


@pytest.mark.parametrize("module", ["softmax", "templates", "batches", "epochs", "weights"])
def test_core_modules_do_not_import_ray(module):
    tree = ast.parse((Path(__file__).parents[1] / "training" / f"{module}.py").read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    assert not [n for n in names if n == "ray" or n.startswith("ray.")]
