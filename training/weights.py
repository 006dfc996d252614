"""The model output's files: ``weights.npz`` (through common/model.py, the one place that
reads and writes it), the checkpoints, ``metrics.json``, ``templates.png`` and the manifest.

    >>> state = read_checkpoint(data)                       # torch.load(weights_only=True)
    >>> manifest = write_model(out, ingest_manifest, state, config, timings)

A checkpoint is data, never code: a dict of tensors, numbers, strings and lists, saved with
``torch.save`` and loaded with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import io
import json
import math

import numpy as np
import torch

from common import dataset, lifecycle, schema, storage, templates
from common.model import write_weights
from training import softmax
from training.epochs import significant


def write_file(out: str, name: str, data: bytes) -> dict:
    """Write ``<out>/<name>`` whole; returns ``{path, bytes, sha256}`` for the manifest."""
    storage.write_bytes(storage.join(out, name), data)
    return {"path": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def checkpoint_bytes(state: dict) -> bytes:
    """Serialize a checkpoint state (tensors, numbers, strings, lists, dicts)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def read_checkpoint(data: bytes) -> dict:
    """Load a checkpoint state on the CPU without running any pickled code."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def write_model(output: lifecycle.Output, data: dict, state: dict, config: dict,
                timings: dict) -> dict:
    """Write a trained state's weights.npz, metrics.json, templates.png and, last, manifest.json.

    ``data`` is the ingest manifest (classes, image shape, the normalization to fold in),
    ``state`` the final checkpoint's, ``config`` the resolved settings. Returns the manifest.
    """
    shift, scale = softmax.channel_stats(data[schema.M_PIXEL_MEAN], data[schema.M_PIXEL_STD],
                                         dataset.num_features(data))
    W, b = softmax.fold(state["model"]["weight"], state["model"]["bias"], shift, scale)
    out, classes, history = output.uri, data[schema.M_CLASSES], state["history"]
    final = history[-1]
    files = [write_weights(out, W, b, classes)]
    metrics = {"history": history, schema.M_INITIAL_LOSS: state["initial_loss"],
               "ln_classes": significant(math.log(len(classes))),
               "resumed_after": state.get("resumed_after", [])}  # epochs a run resumed from
    files.append(write_file(out, schema.METRICS_FILE, json.dumps(metrics, indent=2).encode()))
    robust = f", robust eps {config['robust_eps']:g}" if config.get("robust_eps") else ""
    title = (f"reg={config['reg']:g}{robust}: val top-1 {final['val_top1']:.1%}, "
             f"top-5 {final['val_top5']:.1%} after {final['epoch']} epochs")
    png = templates.render(W, tuple(data[schema.M_IMAGE_SHAPE]),
                           data.get(schema.M_CLASS_NAMES) or classes, title)
    files.append(write_file(out, schema.TEMPLATES_FILE, png))
    manifest = {
        schema.M_KIND: "train", schema.M_DATA: config["data"], schema.M_CLASSES: classes,
        schema.M_CLASS_NAMES: data.get(schema.M_CLASS_NAMES),
        schema.M_IMAGE_SHAPE: data[schema.M_IMAGE_SHAPE],
        schema.M_PIXEL_MEAN: data[schema.M_PIXEL_MEAN],
        schema.M_PIXEL_STD: data[schema.M_PIXEL_STD],
        schema.M_COUNTS: {"train": final["train_rows"], "val": final["val_rows"]},
        schema.M_FINAL: final, schema.M_INITIAL_LOSS: state["initial_loss"],
        schema.M_WEIGHT_NORMS: {"W": significant(float(state["model"]["weight"].norm())),
                                "W_pixels": significant(float(np.linalg.norm(W)))},
        schema.M_FILES: files, **schema.stamp(config, timings),
    }
    return output.finish(manifest)
