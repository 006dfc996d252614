"""Beside the pairs: the summary tables and the contact sheets, written after every part is done.

    >>> files = write_summary(pairs, ["sign"], targets, names)     # summary/*.parquet
    >>> files += write_figures(job, pairs, model, targets, manifest, ["sign"], noise=4)

Both read the stored pairs back, so they show what analysts will read. Where images were not kept,
the few pairs of the contact sheets are recomputed with the same attacks (deterministic).
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from attacks import figures, summary
from attacks.methods.linear import LinearModel
from attacks.methods.noise import noise_ids, noise_images
from attacks.pairs import Pairs
from attacks.worker import ATTACKS, Job, pixels
from common import dataset, schema, storage
from common.errors import ConfigError

log = logging.getLogger(__name__)

FIG_IMAGES, FIG_TARGETS = 3, 3  # a contact sheet shows a few images x a few targets


def _write_table(output: str, rel: str, table: pa.Table) -> dict:
    """One summary table, whole; its manifest entry carries the sha256 that read_summary checks
    (a small file read whole: the digest covers its footer too, which page checksums do not)."""
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    data = buf.getvalue().to_pybytes()
    storage.write_bytes(storage.join(output, rel), data)
    return {"path": rel, "rows": table.num_rows, "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest()}


def write_summary(pairs: Pairs, methods, targets, names) -> list[dict]:
    """Write summary/*.parquet (``names``: a name per class, schema.class_names); log each
    method's success rate."""
    tables = summary.summarize(pairs, methods, targets, names)
    q50 = schema.quantile_column(schema.LINF, 0.5)
    for r in tables["methods"].to_pylist():
        log.info("%-5s %-9s fooled %d of %d pairs (%.1f%%), median linf %.1f", r[schema.ORIGIN],
                 r[schema.METHOD], r[schema.S_FOOLED], r[schema.S_PAIRS],
                 100 * r[schema.S_SUCCESS_RATE], r[q50])
    return [_write_table(pairs.results, f"{schema.SUMMARY_DIR}/{schema.SUMMARY_TABLES[k]}", t)
            for k, t in tables.items()]


def _pick(targets: list[int], classes) -> list[int]:
    """A few targets spread over the run's, preferring ones the model does not give the images."""
    others = [t for t in targets if t not in {int(c) for c in classes}] or targets
    idx = np.linspace(0, len(others) - 1, min(FIG_TARGETS, len(others))).round().astype(int)
    return [others[i] for i in sorted(set(idx))]


def _originals(job: Job, D: int, origin: str, count: int):
    """(ids, labels, X (n, D) uint8) of the first images of an origin."""
    if origin == "noise":
        n = min(FIG_IMAGES, count)
        X = noise_images(n, job.noise_seed, job.image_shape)
        return noise_ids(n), np.full(n, -1), X
    table = next(dataset.read_rows(job.val_files, job.val_counts, 0,
                                   min(FIG_IMAGES, job.n_val), FIG_IMAGES, D))
    return (table.column(schema.IMAGE_ID).to_pylist(), table.column(schema.LABEL).to_numpy(),
            pixels(table.column(schema.IMAGE), D).numpy())


def _examples(pairs, model, method, confidence, X, ids, targets) -> list[dict]:
    """The contact sheet's rows, from the stored pairs (recomputed where images were not kept)."""
    if len(set(ids)) != len(ids):
        raise ConfigError(f"the validation split repeats an image_id among {ids}: the contact "
                          "sheet could pair one image with another's fooling image; re-ingest")
    S = model.scores(torch.from_numpy(X))
    P = torch.softmax(S, 1).numpy()
    rows = {t: pairs.take(method, t, ids) for t in targets}
    fresh = None
    if any(r[schema.IMAGE] is None for rs in rows.values() for r in rs.values()):
        fresh = ATTACKS[method](model, confidence)(torch.from_numpy(X), S, torch.tensor(targets))
    out = []
    for i, image_id in enumerate(ids):
        for j, t in enumerate(targets):
            r = rows[t][image_id]
            stored = (np.frombuffer(r[schema.IMAGE], np.uint8) if r[schema.IMAGE] is not None
                      else fresh.images[i * len(targets) + j].numpy())
            out.append({"original": X[i], "stored": stored, "pred": int(S[i].argmax()),
                        "p_pred": float(P[i].max()), "target": t, "p_target": r[schema.P_TARGET],
                        "fooled_pred": r[schema.FOOLED_PRED], "linf": r[schema.LINF],
                        "strength": r[schema.STRENGTH]})
    return out


def write_figures(job: Job, pairs: Pairs, model: LinearModel, run_targets: list[int],
                  manifest: dict, methods, noise: int) -> list[dict]:
    """figures/<origin>-<method>.png for the validation images and, if any, the noise starts."""
    output = job.output
    names = schema.class_names(manifest)
    files = []
    for origin in ("val", "noise") if noise else ("val",):
        ids, _, X = _originals(job, model.D, origin, noise)
        conf = job.confidence if origin == "val" else job.noise_confidence
        W, b = model.W.cpu().numpy(), model.b.cpu().numpy()
        preds = (X.astype(np.float64) @ W.T.astype(np.float64) + b).argmax(1)
        targets = _pick(run_targets, preds)
        for method in methods:
            ex = _examples(pairs, model, method, conf, X, ids, targets)
            title = f"{method}: {'validation images' if origin == 'val' else 'noise starts'}"
            png = figures.contact_sheet(ex, names, job.image_shape, title)
            rel = f"{schema.FIGURES_DIR}/{origin}-{method}.png"
            storage.write_bytes(storage.join(output, rel), png)
            files.append({"path": rel, "rows": len(ex), "bytes": len(png)})
    return files
