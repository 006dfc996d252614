"""Stored fooling images read back: one (image, target, method) pair with the original it started
from, and a method's extremes (the smallest changes, the most confident fooling images).

    >>> pairs = Pairs.open(results)
    >>> ex = example(pairs, manifest, model, "ILSVRC2012_val_00000001", 7, "sign")
    >>> ex["stored"], ex["original"]           # (D,) uint8 each: the fooling image and its start
    >>> picks = extremes(pairs, "exact", targets, count=6)  # {"smallest": .., "confident": ..}

Reads only what it shows: a partition's image ids and statistics, then the row groups that hold
the chosen rows; the originals come from the ingest output the attack read (validation images)
or are drawn again from the attack's seed (noise starts, attacks/methods/noise.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from attacks.methods.noise import NOISE_PREFIX, noise_images
from attacks.pairs import Pairs
from common import dataset, schema
from common.errors import ConfigError
from common.model import Model, read_model

if TYPE_CHECKING:
    import pandas as pd

SCAN = [schema.IMAGE_ID, schema.ORIGIN, schema.PRED, schema.SUCCESS, schema.LINF,
        schema.P_TARGET, schema.STRENGTH]  # what choosing examples reads: no images
SCAN_TARGETS = 24  # partitions read to choose a method's extremes: cost does not grow with C


def attack_model(results: str, manifest: dict, uri: str | None = None) -> Model:
    """The model the attack used (``uri`` must be that one: the weights' sha256 is checked)."""
    uri = uri or manifest[schema.M_SOURCE]["model"]
    model = read_model(uri)
    used = manifest[schema.M_SOURCE].get("model_sha256")
    if model.sha256 != used:
        raise ConfigError(f"{uri} is not the model the attack {results} used (weights sha256 "
                          f"{model.sha256[:12]}, the attack's {str(used)[:12]})")
    return model


def originals(manifest: dict, ids: list[str]) -> dict[str, np.ndarray]:
    """The starting images (image_id -> (D,) uint8) of an attack output's pairs."""
    shape = manifest[schema.M_IMAGE_SHAPE]
    out = {}
    noise = [i for i in ids if i.startswith(NOISE_PREFIX)]
    if noise:
        seed = manifest[schema.M_IDENTITY]["settings"]["seed"]
        count = 1 + max(int(i[len(NOISE_PREFIX):]) for i in noise)
        X = noise_images(count, seed, tuple(shape))
        out.update({i: X[int(i[len(NOISE_PREFIX):])] for i in noise})
    val = [i for i in ids if not i.startswith(NOISE_PREFIX)]
    if val:
        data = manifest[schema.M_SOURCE]["data"]
        files = dataset.split_files(data, dataset.open_ingest(data), "val")
        rows = dataset.rows_by_id(files, val, [schema.IMAGE_ID, schema.IMAGE])
        missing = [i for i in val if i not in rows]
        if missing:
            raise ConfigError(f"the validation images {', '.join(missing[:3])} are not in {data}, "
                              "the data the attack read")
        out.update({i: np.frombuffer(r[schema.IMAGE], np.uint8) for i, r in rows.items()})
    return out


def probabilities(model: Model, X: np.ndarray) -> np.ndarray:
    """Softmax of ``X @ W.T + b`` (N, C), in float64 for X (N, D) uint8."""
    S = X.astype(np.float64) @ model.W.T.astype(np.float64) + model.b
    E = np.exp(S - S.max(1, keepdims=True))
    return E / E.sum(1, keepdims=True)


def examples_of(rows: list[dict], manifest: dict, model: Model) -> list[dict]:
    """Stored pair rows (with their images) as figure examples: the original, its class and
    probability, the stored fooling image and what the model says of it."""
    starts = originals(manifest, [r[schema.IMAGE_ID] for r in rows])
    X = np.stack([starts[r[schema.IMAGE_ID]] for r in rows]) if rows else np.empty((0, model.D))
    P = probabilities(model, X)
    return [{"image_id": r[schema.IMAGE_ID], "method": r[schema.METHOD],
             "original": X[i], "stored": np.frombuffer(r[schema.IMAGE], np.uint8),
             "pred": int(P[i].argmax()), "p_pred": float(P[i].max()),
             "target": int(r[schema.TARGET]), "p_target": float(r[schema.P_TARGET]),
             "fooled_pred": int(r[schema.FOOLED_PRED]), "linf": float(r[schema.LINF]),
             "strength": float(r[schema.STRENGTH])} for i, r in enumerate(rows)]


def stored_rows(pairs: Pairs, picks: list[tuple[str, int, str]]) -> list[dict]:
    """The full stored rows of (image_id, target, method) picks, in their order; a pair that is
    not there or was stored without its image is one ConfigError naming it."""
    out = []
    for image_id, target, method in picks:
        row = pairs.take(method, target, [image_id]).get(image_id)
        if row is None:
            raise ConfigError(f"{pairs.results} holds no pair of image {image_id!r}, target "
                              f"{target} and method {method!r}")
        if row[schema.IMAGE] is None:
            raise ConfigError(f"{pairs.results} holds no fooling image of {image_id!r} -> "
                              f"{target} ({method}): it was written with --keep-images none, or "
                              "sample and this image is not among the first --sample-images")
        out.append({**row, schema.METHOD: method, schema.TARGET: target})
    return out


def example(pairs: Pairs, manifest: dict, model: Model, image_id: str, target: int,
            method: str) -> dict:
    """One pair as a figure example (see ``examples_of``)."""
    return examples_of(stored_rows(pairs, [(image_id, target, method)]), manifest, model)[0]


def spread(targets, count: int = SCAN_TARGETS) -> list[int]:
    """At most ``count`` of the targets, evenly spaced."""
    targets = list(targets)
    idx = np.unique(np.linspace(0, len(targets) - 1, min(count, len(targets))).round())
    return [int(targets[int(i)]) for i in idx]


def moved(pairs: Pairs, method: str, targets, origin: str = "val",
          kept: set[str] | None = None) -> pd.DataFrame:
    """The fooled pairs that had to move (SCAN's columns and ``target``) of one method and
    ``origin``, from the partitions of up to SCAN_TARGETS of ``targets``, among the images
    ``kept`` when given (those whose pairs hold their fooling image, ``attacks.pairs.kept_ids``)."""
    import pandas as pd  # here: report.show, which imports this module, draws without it

    frames = [pairs.read(method, t, SCAN).to_pandas().assign(target=t)
              for t in spread(targets) if pairs.uris(method, t)]
    if not frames:
        return pd.DataFrame(columns=[*SCAN, "target"])
    f = pd.concat(frames)
    f = f[(f[schema.ORIGIN] == origin) & f[schema.SUCCESS]
          & schema.had_to_move(f[schema.PRED], f["target"])]
    return f if kept is None else f[f[schema.IMAGE_ID].isin(kept)]


def extremes(pairs: Pairs, method: str, targets, count: int, origin: str = "val",
             kept: set[str] | None = None) -> dict:
    """(image_id, target, method) picks of ``moved``'s pairs: the ``count`` with the smallest
    L-inf change and the ``count`` with the highest target probability. Each image appears at
    most once in a list."""
    found = moved(pairs, method, targets, origin, kept)

    def best(order: list[str], ascending: list[bool]) -> list[tuple[str, int, str]]:
        rows = found.sort_values(order, ascending=ascending).drop_duplicates(schema.IMAGE_ID)
        return [(r.image_id, int(r.target), method) for r in rows.head(count).itertuples()]

    return {"smallest": best([schema.LINF, schema.P_TARGET], [True, False]),
            "confident": best([schema.P_TARGET, schema.LINF], [False, True])}


def distinct_targets(picks: list[tuple], count: int) -> list[tuple]:
    """The first ``count`` picks with targets of their own (picks repeat a target otherwise)."""
    out, seen = [], set()
    for p in picks:
        if p[1] not in seen:
            out.append(p)
            seen.add(p[1])
    return out[:count]
