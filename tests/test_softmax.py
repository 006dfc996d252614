"""The classifier's math against independent oracles: numpy, finite differences, brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

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


# --- the robust objective (--robust-eps) --------------------------------------------------------


def robust_ce(W_raw: np.ndarray, b_raw: np.ndarray, X_raw: np.ndarray, y: np.ndarray,
              eps: float) -> float:
    """The certified worst-case cross-entropy, written out pair by pair in float64 (oracle)."""
    S = X_raw @ W_raw.T + b_raw
    for i in range(len(X_raw)):
        for k in range(W_raw.shape[0]):
            S[i, k] += eps * np.abs(W_raw[k] - W_raw[y[i]]).sum()
    S -= S.max(1, keepdims=True)
    return float(np.mean(np.log(np.exp(S).sum(1)) - S[np.arange(len(y)), y]))


def raw_problem(seed: int = 5):
    """Pixels 0..255, per-channel stats that are not 0 and 1, and normalized-space weights."""
    rng = np.random.default_rng(seed)
    X = rng.integers(0, 256, (N, D)).astype(np.float64)
    shift, scale = softmax.channel_stats([100.0, 120.0, 90.0], [50.0, 20.0, 70.0], D)
    return X, rng.integers(0, C, N), rng.normal(0, 0.1, (C, D)), rng.normal(0, 0.1, C), \
        shift.double(), scale.double()


def numpy_fold(W, b, shift, scale):
    W_raw = W / scale.numpy()
    return W_raw, b - W_raw @ shift.numpy()


@pytest.mark.parametrize("eps, block", [(0.5, None), (4.0, None), (4.0, 2 * C * D)])
def test_robust_loss_and_gradient_match_numpy_on_raw_pixels(eps, block, monkeypatch):
    if block:  # two labels per cdist call, as the 1,000-class runs do with more
        monkeypatch.setattr(softmax, "CDIST_ELEMENTS", block)
    X, y, W, b, shift, scale = raw_problem()
    model = torch.nn.Linear(D, C).double()
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(W))
        model.bias.copy_(torch.from_numpy(b))
    scores = model(softmax.normalize(torch.from_numpy(X), shift, scale).double())
    loss, data_loss = softmax.objective(scores, torch.from_numpy(y), model.weight, 0.3, eps, scale)
    loss.backward()
    assert data_loss.item() == pytest.approx(robust_ce(*numpy_fold(W, b, shift, scale), X, y, eps),
                                             rel=1e-6)
    assert data_loss.item() > F.cross_entropy(scores, torch.from_numpy(y)).item()

    def f():  # the numpy oracle as a function of the normalized-space weights
        return robust_ce(*numpy_fold(W, b, shift, scale), X, y, eps) + 0.15 * (W**2).sum()

    rng = np.random.default_rng(6)
    coords = [tuple(rng.integers(0, s) for s in W.shape) for _ in range(20)]
    np.testing.assert_allclose(numeric_grad(f, W, coords, h=1e-5),
                               [model.weight.grad.numpy()[c] for c in coords], rtol=1e-4,
                               atol=1e-7)
    np.testing.assert_allclose(numeric_grad(f, b, [(k,) for k in range(C)], h=1e-5),
                               model.bias.grad.numpy(), rtol=1e-4, atol=1e-7)


def test_two_class_robust_loss_is_the_loss_of_the_worst_image():
    """For two classes the bound is attained (Goodfellow et al. 2015): at x + E sign(W[k] - W[y])
    in raw pixels, without clipping, the plain cross-entropy equals the robust one."""
    X, y, W, b, shift, scale = raw_problem(7)
    y, W, b, eps = y % 2, W[:2], b[:2], 3.0
    W_raw, b_raw = numpy_fold(W, b, shift, scale)
    worst = X + eps * np.sign(W_raw[1 - y] - W_raw[y])  # (N, D), may leave 0..255: no clipping
    scores = torch.from_numpy(worst @ W_raw.T + b_raw)
    want = F.cross_entropy(scores, torch.from_numpy(y)).item()
    clean = torch.from_numpy(softmax.normalize(torch.from_numpy(X), shift, scale).numpy() @ W.T + b)
    _, got = softmax.objective(clean, torch.from_numpy(y), torch.from_numpy(W), 0.0, eps, scale)
    assert got.item() == pytest.approx(want, rel=1e-9)


def certified_radius(W: np.ndarray, b: np.ndarray, X: np.ndarray) -> np.ndarray:
    """(N,) L-inf radius within which no image changes the predicted class (Hoelder), float64:
    min over k != pred of (s_pred - s_k) / ||W[pred] - W[k]||_1, W and b on raw pixels."""
    W, b, X = (np.asarray(a, dtype=np.float64) for a in (W, b, X))
    S = X @ W.T + b
    pred = S.argmax(1)
    dist = np.abs(W[pred][:, None, :] - W[None]).sum(2)  # (N, C)
    ratio = (S[np.arange(len(X)), pred][:, None] - S) / np.where(dist > 0, dist, np.nan)
    ratio[np.arange(len(X)), pred] = np.inf
    return np.nan_to_num(ratio, nan=np.inf).min(1)


def fit(X: np.ndarray, y: np.ndarray, eps: float, shift, scale, steps: int = 150):
    """A small model trained by train_epoch (full batch, Adam) with the given robust radius."""
    model = softmax.make_model(X.shape[1], int(y.max()) + 1, init_std=1e-3, seed=0)
    opt = epochs.make_optimizer("adam", model.parameters(), lr=1e-2, momentum=0.0)
    batch = [(torch.from_numpy(X), torch.from_numpy(y))]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny steps: threads would only wait for each other
    try:
        for _ in range(steps):
            epochs.train_epoch(model, model, opt, batch, shift, scale, 1e-3, lambda i: 1e-2,
                               robust_eps=eps)
    finally:
        torch.set_num_threads(threads)
    return softmax.fold(model.weight, model.bias, shift, scale)


def test_robust_training_certifies_what_no_sign_attack_breaks():
    """A model trained with --robust-eps E: images its bound certifies at E resist the targeted
    sign attack at every target within E (the attack's minimal eps, clipping included, lies
    beyond), and it certifies more training images at E than the plain objective does."""
    from attacks.methods.linear import LinearModel
    from attacks.methods.sign import Sign

    rng = np.random.default_rng(8)
    centers = 128 + rng.normal(0, 8, (3, D))  # close classes: the plain fit certifies few at E
    y = np.repeat(np.arange(3), 20)
    X = np.clip(centers[y] + rng.normal(0, 40, (len(y), D)), 0, 255).astype(np.uint8)
    shift, scale = softmax.channel_stats([128.0, 110.0, 140.0], [40.0, 25.0, 60.0], D)
    E = 6.0
    W, b = fit(X, y, E, shift, scale)
    radius = certified_radius(W, b, X)
    plain = certified_radius(*fit(X, y, 0.0, shift, scale), X)
    assert (radius > E).sum() >= 40 and (plain > E).sum() <= 20

    model = LinearModel(W, b)
    targets = torch.arange(3)
    fooled = Sign(model)(torch.from_numpy(X), model.scores(torch.from_numpy(X)), targets)
    pred = np.repeat(model.scores(torch.from_numpy(X)).argmax(1).numpy(), 3)
    moved = (fooled.scores.argmax(1).numpy() != pred)  # the stored image changed the class
    linf = np.abs(fooled.images.numpy().astype(int) - np.repeat(X, 3, 0).astype(int)).max(1)
    assert moved.sum() > 0  # the attack does flip images, farther out
    assert (linf[moved] >= np.repeat(radius, 3)[moved]).all()  # the certificate holds
    assert (linf[moved & (np.repeat(radius, 3) > E)] > E).all()
