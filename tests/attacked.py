"""The one attack run that the tests which only read an attack output share (conftest's
``attacked``): a model fitted with numpy on the ingested sample, attacked by every method, with
small parts and files so that the output has several chunks, parts and files per partition."""

from __future__ import annotations

from attacks import fool
from benchmarks.attack_models import fit_softmax, load_split, write_model
from common import dataset, schema

NOISE, TARGETS_PER_PART = 2, 2
METHODS = schema.METHODS  # every method, exact-l2 included (1 to 5 s of the run)
# six images per chunk: the 16 validation images make three chunks of files
FILE_MB = 6 * (64 * 64 * 3 + fool.ROW_OVERHEAD) / 2**20


def fit_model(ingested: str, out: str) -> str:
    """A softmax model fitted on the training split (numpy; no Ray training)."""
    X, y, _ = load_split(ingested, "train")
    classes = dataset.open_ingest(ingested)[schema.M_CLASSES]
    W, b = fit_softmax(X, y, len(classes), l2=1e-3)
    return write_model(out, W, b, classes)


def settings(ingested: str, model: str, output: str, /, **kw) -> fool.Settings:
    base = dict(data=ingested, model=model, output=output, noise_images=NOISE, pairs_per_batch=16,
                targets_per_part=TARGETS_PER_PART, file_size_mb=FILE_MB)
    return fool.Settings(**{**base, **kw})


def attack(ingested: str, model: str, output: str) -> tuple[fool.Settings, dict]:
    """Every method, images kept: (settings, manifest)."""
    cfg = settings(ingested, model, output, methods=METHODS)
    return cfg, fool.run(cfg)
