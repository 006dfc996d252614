"""An attack worker: runs parts (a chunk of images x one method x a group of targets) and writes
their files. No Ray here: the job hands this class to Ray Data's ``map_batches``, which makes one
per actor, so the model and its Gram matrix are set up once per worker, not once per part.

    >>> worker = FoolWorker(W, b, facts, job)                 # job: a Job, from attacks/fool.py
    >>> worker({"part": np.array([json.dumps(part)])})        # -> {"result": [json of the marker]}
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import torch

from attacks import parts
from attacks.methods.base import Attack, pairs, pairs_that_fit
from attacks.methods.exact import Exact
from attacks.methods.exact_l2 import ExactL2
from attacks.methods.iterative import Iterative
from attacks.methods.linear import LinearModel, measure
from attacks.methods.noise import noise_ids, noise_images
from attacks.methods.sign import Sign
from attacks.methods.template import Template
from attacks.pairs import TargetFiles, pair_tables
from common import dataset, heap, schema
from common.errors import ConfigError

log = logging.getLogger(__name__)

ATTACKS: dict[str, type[Attack]] = {"template": Template, "sign": Sign, "iterative": Iterative,
                                    "exact": Exact, "exact-l2": ExactL2}
CPU_BATCH = 1024  # pairs per batch on a CPU worker
GPU_BATCH_MAX = 65536  # on a GPU at most
GPU_BATCH_BYTES = 48  # a batch's GPU memory per pair and pixel (sign, iterative; exact chunks)
GPU_BATCH_SHARE = 0.5  # of the GPU's free memory that a batch may take
NOISE_CONFIDENCE = 0.99  # noise starts are pushed to this probability unless --confidence says


@dataclass(frozen=True)
class Job:
    """What every worker needs besides the model: plain data, sent to each actor once."""

    output: str  # absolute URI of the attack output
    val_files: tuple[str, ...]  # the validation split's Parquet files, in the manifest's order
    val_counts: tuple[int, ...]  # rows of each
    n_val: int  # validation images attacked: the first n_val rows
    image_shape: tuple[int, int, int]
    class_names: tuple[str, ...]  # a name per class (schema.class_names), for the pairs' columns
    keep_images: str  # "all", "sample" (the pairs of the first sample_images, noise starts), "none"
    confidence: float | None  # None: the first image classified as the target
    noise_seed: int
    batch_size: int | None  # (image, target) pairs per matrix batch; None: by the device
    device: str  # "cpu" or "cuda"
    sample_images: int = 0  # with keep_images "sample": the validation images whose pairs keep it
    kill_once: str | None = None  # tests only: a path; the first part without it kills a worker

    @property
    def noise_confidence(self) -> float:
        return self.confidence if self.confidence is not None else NOISE_CONFIDENCE


def batch_pairs(device: torch.device, D: int) -> int:
    """The default pairs per batch: CPU_BATCH on a CPU; on a GPU as many as GPU_BATCH_SHARE of
    its free memory holds at GPU_BATCH_BYTES per pair and pixel, between CPU_BATCH and
    GPU_BATCH_MAX (larger batches, fewer launches: on an H200 sign ran at 145,028 / 160,768 /
    239,174 pairs/s at 16,384 / 32,768 / 65,536 pairs)."""
    if device.type != "cuda":
        return CPU_BATCH
    return pairs_that_fit(device, GPU_BATCH_BYTES * D, GPU_BATCH_SHARE, CPU_BATCH, GPU_BATCH_MAX)


class FoolWorker:
    """Holds the model on its device and the attacks; ``__call__`` runs a batch of parts."""

    def __init__(self, W: np.ndarray, b: np.ndarray, facts: dict, job: Job, counter=None):
        self.job, self.counter = job, counter  # counter: the driver's progress actor, or None
        heap.reuse_freed_memory()  # the attacks' large tensors: no page faults once warm
        self.model = LinearModel(W, b, job.device, facts)
        self.batch = job.batch_size or batch_pairs(self.model.device, self.model.D)
        log.info("batches of %d (image, target) pairs on %s", self.batch, self.model.device)
        self.attacks = {(m, origin): cls(self.model, conf) for m, cls in ATTACKS.items()
                        for origin, conf in (("val", job.confidence),
                                             ("noise", job.noise_confidence))}

    def __call__(self, batch: dict) -> dict:
        """Run each part; bad data (a ConfigError, e.g. an image of the wrong length) comes back
        as the part's ``error``, one line for the driver, instead of a retried task failure."""
        results = []
        for p in batch["part"]:
            part = parts.Part.from_json(p)
            try:
                results.append(asdict(self.run_part(part)))
            except ConfigError as e:
                results.append({"key": part.key, "error": str(e)})
        return {"result": np.array([json.dumps(r) for r in results], dtype=object)}

    def run_part(self, part: parts.Part) -> parts.Marker:
        """Attack one chunk x method x targets, write one file per target, then the marker."""
        t0 = time.perf_counter()
        if self.job.kill_once and not os.path.exists(self.job.kill_once):
            open(self.job.kill_once, "w").close()
            os._exit(1)  # a worker lost mid-run, as a node that goes away
        chunk, targets = part.chunk, list(part.targets)
        attack = self.attacks[(part.method, chunk.origin)]
        files = TargetFiles(self.job.output, part.method, targets, chunk.name,
                            self.job.image_shape)
        per_batch, first = max(1, self.batch // len(targets)), chunk.start
        for ids, labels, X in self.images(chunk, per_batch):
            cols = self.attack_batch(attack, chunk.origin, ids, labels, X, targets)
            keep = self.kept(chunk.origin, first, len(ids), len(targets))
            files.add(pair_tables(cols, targets, self.job.class_names, keep))
            first += len(ids)
            if self.counter is not None:
                self.counter.add.remote(len(ids) * len(targets))
        listing = files.close()
        marker = parts.Marker(part.key, tuple(listing), sum(f["rows"] for f in listing),
                              round(time.perf_counter() - t0, 3))
        parts.write_marker(self.job.output, marker)
        log.info("part %s: %d rows in %.1f s", part.key, marker.rows, marker.seconds)
        return marker

    def kept(self, origin: str, first: int, n: int, T: int) -> bool | np.ndarray:
        """Which pairs of a batch of images ``first..first+n`` (image-major, x T targets) keep
        their fooling image."""
        if self.job.keep_images != "sample" or origin == "noise":
            return self.job.keep_images != "none"
        return np.repeat(np.arange(first, first + n) < self.job.sample_images, T)

    def images(self, chunk: parts.Chunk, rows: int):
        """(image ids, labels, X (n, D) uint8 tensor) batches of a chunk."""
        if chunk.origin == "noise":
            X = noise_images(chunk.stop, self.job.noise_seed, self.job.image_shape)
            ids = noise_ids(chunk.stop)
            for i in range(chunk.start, chunk.stop, rows):
                sl = slice(i, min(i + rows, chunk.stop))
                yield ids[sl], np.full(sl.stop - sl.start, -1, np.int16), torch.from_numpy(X[sl])
            return
        D = self.model.D
        for table in dataset.read_rows(self.job.val_files, self.job.val_counts,
                                       chunk.start, chunk.stop, rows, D):
            yield (table.column(schema.IMAGE_ID).to_pylist(),
                   table.column(schema.LABEL).to_numpy(), pixels(table.column(schema.IMAGE), D))

    def attack_batch(self, attack: Attack, origin: str, ids, labels, X, targets) -> dict:
        """Every (image, target) pair of a batch: the stored images and their measurements."""
        X = X.to(self.model.device)
        tt = torch.tensor(targets, dtype=torch.long, device=self.model.device)
        S = self.model.scores(X)
        fooled = attack(X, S, tt)
        n, t = pairs(len(X), tt)
        bound_linf, bound_l2 = self.model.bounds(S[n], t, attack.margin)
        if fooled.bound is not None:  # the attack's own certificates, where it has them
            bound_linf = torch.maximum(bound_linf, fooled.bound)
        if fooled.bound_l2 is not None:
            bound_l2 = torch.maximum(bound_l2, fooled.bound_l2)
        m = measure(X[n], fooled.images, fooled.scores, t)
        n_np = n.cpu().numpy()
        cpu = {k: v.cpu().numpy() for k, v in {
            schema.PRED: S.argmax(1)[n], schema.STRENGTH: fooled.strength,
            schema.LINF: m["linf"], schema.L2: m["l2"], schema.FOOLED_PRED: m["fooled_pred"],
            schema.SUCCESS: m["fooled_pred"] == t, schema.P_TARGET: m["p_target"],
            schema.BOUND_LINF: bound_linf, schema.BOUND_L2: bound_l2,
            schema.IMAGE: fooled.images}.items()}
        cpu[schema.IMAGE_ID] = np.asarray(ids, dtype=object)[n_np]
        cpu[schema.ORIGIN] = np.full(len(n_np), origin, dtype=object)
        cpu[schema.LABEL] = np.asarray(labels, np.int16)[n_np]
        return cpu


def pixels(column: pa.ChunkedArray, D: int) -> torch.Tensor:
    """A binary column of D-byte images (checked by dataset.read_rows) -> (n, D) uint8 tensor."""
    return torch.from_numpy(np.array(dataset.pixels(column, D)))
