"""Small linear softmax models for the attack tests, fitted here: the tests do not import training/.

The contract is DESIGN.md's weights.npz: ``scores = x @ W.T + b`` on flattened HWC uint8 pixels as
float32 in 0..255; the fit standardizes the pixels and folds that back into W and b.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from common import dataset, schema, storage


def load_split(data: str, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(X (N, D) uint8, labels (N,), image ids) of one split of an ingest output, in file order."""
    m = dataset.open_ingest(data)
    tables = []
    for uri in dataset.split_files(data, m, split):
        fs, path = storage.filesystem(uri)
        tables.append(pq.read_table(path, filesystem=fs))
    t = pa.concat_tables(tables)
    X = np.frombuffer(b"".join(t.column(schema.IMAGE).to_pylist()), np.uint8)
    labels = t.column(schema.LABEL).to_numpy().astype(np.int64)
    return X.reshape(t.num_rows, -1), labels, t.column(schema.IMAGE_ID).to_pylist()


def fit_softmax(X: np.ndarray, y: np.ndarray, C: int, l2: float, steps: int = 150,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A regularized linear softmax fitted with Adam; returns float32 W (C, D), b (C,) on 0..255."""
    torch.manual_seed(seed)
    Xt = torch.tensor(X, dtype=torch.float32)
    mu, sd = Xt.mean(), Xt.std()
    Z = (Xt - mu) / sd
    W = torch.zeros(C, X.shape[1], requires_grad=True)
    b = torch.zeros(C, requires_grad=True)
    opt = torch.optim.Adam([W, b], lr=1e-3)
    yt = torch.as_tensor(y)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(Z @ W.T + b, yt) + 0.5 * l2 * (W * W).sum()
        loss.backward()
        opt.step()
    W, b = W.detach(), b.detach()
    return (W / sd).numpy().astype(np.float32), (b - W.sum(1) * mu / sd).numpy().astype(np.float32)


def write_model(out: str, W: np.ndarray, b: np.ndarray, classes: list[str]) -> str:
    """A model output as training writes it: weights.npz and, last, manifest.json."""
    buf = io.BytesIO()
    np.savez(buf, **{schema.W_KEY: W, schema.B_KEY: b, schema.CLASSES_KEY: np.array(classes)})
    storage.write_bytes(storage.join(out, schema.WEIGHTS_FILE), buf.getvalue())
    storage.write_manifest(out, {schema.M_KIND: "train", schema.M_CLASSES: classes})
    return out


def photo_model(classes: int = 10, per_class: int = 40, steps: int = 60):
    """A softmax fitted on 64x64 crops of scikit-learn's two photographs (a class: one of 2 x 5
    regions of a photo, an image: a jittered crop of it): W, b and ``per_class`` held-out crops
    (classes interleaved), real pixels where several rivals bind at once. Needs scikit-learn."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(0)
    X, y = [], []
    for k in range(classes):
        photo = load_sample_images().images[(k // 5) % 2]
        h, w = photo.shape[0] // 2, photo.shape[1] // 5
        for _ in range(2 * per_class):
            s = int(rng.integers(w // 2, w + 1))
            r0 = ((k // 10) % 2) * h + int(rng.integers(0, h - s + 1))
            c0 = (k % 5) * w + int(rng.integers(0, w - s + 1))
            im = Image.fromarray(photo[r0:r0 + s, c0:c0 + s]).resize((64, 64), Image.BOX)
            noisy = np.asarray(im, np.float64) + rng.normal(0, 8, (64, 64, 3))
            X.append(np.clip(noisy, 0, 255).astype(np.uint8).reshape(-1))
            y.append(k)
    X, y = np.stack(X), np.array(y)
    fit = np.arange(len(y)) % (2 * per_class) < per_class
    W, b = fit_softmax(X[fit], y[fit], classes, l2=1e-3, steps=steps)
    held = X[~fit].reshape(classes, per_class, -1)
    return W, b, held.transpose(1, 0, 2).reshape(classes * per_class, -1)
