"""A small sweep output in training.sweep's layout, fitted here (no Tune): for the frontier and
transfer tests, which need several models on the same data but not their training."""

from __future__ import annotations

import os

from attacks import frontier
from benchmarks.attack_models import fit_softmax, load_split, write_model
from common import schema, storage
from common.sweep import SweepRow, write_sweep
from common.templates import render

SETTINGS = ((1e-4, 0.0), (1e-4, 8.0))  # (reg, robust_eps) of the two models


def fake_sweep(ingested: str, out: str) -> list[SweepRow]:
    """Two fitted models (the "robust" one: a stronger L2 stands in) and the sweep's table."""
    X, y, _ = load_split(ingested, "train")
    m = storage.read_manifest(ingested)
    classes, rows = m[schema.M_CLASSES], []
    for reg, eps in SETTINGS:
        W, b = fit_softmax(X, y, len(classes), reg + eps / 8, steps=40)
        model = write_model(os.path.join(out, f"reg={reg:g}_eps={eps:g}"), W, b, classes)
        storage.write_bytes(storage.join(model, schema.TEMPLATES_FILE),
                            render(W, tuple(m[schema.M_IMAGE_SHAPE]), classes, "t"))
        rows.append(SweepRow(reg=reg, robust_eps=eps, val_top1=0.5, val_top5=1.0, val_loss=1.0,
                             train_loss=1.0, train_top1=1.0, w_norm=1.0, w_pixels_norm=1.0,
                             epochs=1, median_sign_eps=1.0, model=model))
    write_sweep(out, rows)
    storage.write_manifest(out, {schema.M_KIND: "sweep", schema.M_DATA: ingested})
    return rows


def attack_sweep(ingested: str, root: str) -> dict:
    """The sweep, and the frontier job run on it with the images kept (4 images x 4 targets)."""
    sweep, out = os.path.join(root, "sweep"), os.path.join(root, "frontier")
    rows = fake_sweep(ingested, sweep)
    settings = {"sweeps": (sweep,), "output": out, "limit_images": 4, "methods": ("sign",)}
    manifest = frontier.run(frontier.Settings(**settings))
    return {"sweep": sweep, "frontier": out, "models": [r.model for r in rows],
            "manifest": manifest, "settings": settings}
