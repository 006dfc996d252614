"""The model contract: ``<model>/weights.npz``, read and written here and nowhere else.

``scores = x @ W.T + b`` with ``x`` the flattened HWC image as float32 in 0..255 (any
normalization used in training is folded in): W float32 (C, D), b float32 (C,), classes str (C,).
Readers get the file's sha256 with it, so that a later stage can say which model it used and a
reader of that stage can check it.

    >>> m = read_model("s3://bucket/model")        # refuses no manifest, bad shapes, NaN, pickles
    >>> scores = X.astype(np.float32) @ m.W.T + m.b
    >>> entry = write_weights("out/model", W, b, classes)   # {path, bytes, sha256}
"""

from __future__ import annotations

import hashlib
import io
import struct
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np

from common import dataset, schema, storage
from common.errors import ConfigError


@dataclass(frozen=True)
class Model:
    """A finished model: its weights, classes, the file's sha256 and the model's manifest."""

    uri: str
    W: np.ndarray  # (C, D) float32
    b: np.ndarray  # (C,) float32
    classes: list[str]
    sha256: str
    manifest: dict

    @property
    def C(self) -> int:
        return self.W.shape[0]

    @property
    def D(self) -> int:
        return self.W.shape[1]


def weights_bytes(W: np.ndarray, b: np.ndarray, classes: list[str]) -> bytes:
    """weights.npz's bytes; refuses shapes that disagree or numbers that are not finite."""
    _check(W, b, list(classes), "the weights to write")
    buf = io.BytesIO()
    np.savez(buf, **{schema.W_KEY: W.astype(np.float32), schema.B_KEY: b.astype(np.float32),
                     schema.CLASSES_KEY: np.array(classes, dtype=str)})
    return buf.getvalue()


def write_weights(out: str, W: np.ndarray, b: np.ndarray, classes: list[str]) -> dict:
    """Write ``<out>/weights.npz``; returns the manifest's file entry ``{path, bytes, sha256}``."""
    data = weights_bytes(W, b, classes)
    storage.write_bytes(storage.join(out, schema.WEIGHTS_FILE), data)
    return {"path": schema.WEIGHTS_FILE, "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest()}


def _check(W: np.ndarray, b: np.ndarray, classes: list[str], what: str) -> None:
    if W.ndim != 2 or b.shape != (W.shape[0],) or len(classes) != W.shape[0]:
        raise ConfigError(f"{what}: W {W.shape}, b {b.shape} and {len(classes)} classes do not "
                          "match (W must be (C, D), b (C,))")
    if not (np.isfinite(W).all() and np.isfinite(b).all()):
        raise ConfigError(f"{what}: W or b holds NaN or infinite values")


def read_model(uri: str, D: int | None = None) -> Model:
    """The finished model at ``uri``, or one ConfigError: no manifest, not a model, no or
    unreadable weights.npz (pickled arrays are refused; a damaged one fails its zip CRC, or the
    sha256 its manifest records), shapes that disagree with each other or with ``D`` features,
    or values that are not finite."""
    manifest = storage.read_manifest(uri, "model output")
    if manifest.get(schema.M_KIND) != "train":
        raise ConfigError(f"{uri} is not a model output (its manifest says "
                          f"{manifest.get(schema.M_KIND)!r})")
    where = storage.join(uri, schema.WEIGHTS_FILE)
    listed = dataset.listed_files(storage.join(uri, storage.MANIFEST),
                                  manifest.get(schema.M_FILES, []))
    digest = next((f.get("sha256") for f in listed if f["path"] == schema.WEIGHTS_FILE), None)
    try:
        raw = storage.read_bytes(where)
    except FileNotFoundError:
        raise ConfigError(f"{uri} has no {schema.WEIGHTS_FILE}") from None
    sha256 = hashlib.sha256(raw).hexdigest()
    if digest is not None and sha256 != digest:
        raise ConfigError(f"{where}: damaged: its sha256 is not the one its manifest records")
    try:  # a zip: each array's bytes carry a CRC-32, checked as np.load reads them
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            W, b = z[schema.W_KEY], z[schema.B_KEY]
            classes = [str(c) for c in z[schema.CLASSES_KEY]]
    except (zipfile.BadZipFile, zlib.error, struct.error, KeyError, ValueError, OSError,
            EOFError, NotImplementedError, SyntaxError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{where} is not a weights file of W, b and classes without pickled "
                          f"objects: {reason}") from None
    _check(W, b, classes, where)
    if D is not None and W.shape[1] != D:
        raise ConfigError(f"{where}: W has {W.shape[1]} features per class, the data's images "
                          f"have {D}")
    return Model(uri, W.astype(np.float32), b.astype(np.float32), classes, sha256, manifest)
