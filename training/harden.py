"""Does a background class of fooling images, or retraining on them, make the model harder to fool?

    python -m training.harden --data out/imagenet64 --output out/harden
    python -m training.harden --data DATA --output OUT --modes background --rounds 3 \\
        --images-per-round 500 --classes 100 --limit-images 100

The blog's closing claim, measured: "a straight-forward attempt to patch this up by introducing a
background class and iteratively adding fooling images as a new background class during training
are not effective". Round 0 trains the classifier on the C real classes, with training.train's
objective, optimizer, schedule and initialization. Round r makes --images-per-round fooling
images with exact (the certified minimal L-inf change that makes a real target beat every class
of the model) against the round r-1 model, from training images never used before (validation
images never are), one target each (--sampling), and trains the next model from scratch on the
training split plus the fooling images of rounds 1..r: in mode ``background`` as class C (C + 1
classes), in mode ``adversarial`` under their source image's class (C classes). After each round,
on the validation split: top-1 and top-5 over every class of the model (a real image called
background is wrong); the share of this round's fooling images the new model calls background,
and of fresh ones made the same way from validation images; and exact's median and 90th
percentile minimal L-inf over the first --limit-images validation images x every real target
(the pairs that had to move), which every real target must reach over the background too.

Training runs in this process on in-memory tensors (no Ray): the split, of the first --classes
classes, must fit in memory (the photo sample, or 100 classes of the 1000-class sample: a few
hundred MB). Writes ``round=0/`` and ``<mode>/round=<r>/`` (model outputs, as training.train
writes them: weights.npz with the class ``background`` last in background mode),
``<mode>/fooling-<r>.parquet`` (the images trained on from round r) and ``<mode>/fresh-<r>.parquet``
(the fresh ones), ``harden.parquet`` and ``harden.md`` (one row per round), and last
``manifest.json``. attacks.frontier --harden puts the rounds on the frontier beside L2 and the
robust objective. A rerun on an unfinished output starts again.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from attacks.methods.linear import LinearModel
from common import cli, dataset, lifecycle, schema, storage
from common.errors import ConfigError
from common.sweep import HardenRow, harden_markdown, write_harden
from training import rounds, softmax
from training.rounds import SAMPLINGS
from training.settings import Settings as TrainSettings

log = logging.getLogger(__name__)

READ_ROWS = 4096  # rows per read of a split
_TRAIN = {f.name: f for f in fields(TrainSettings)}


def _as_train(name: str):
    """training.train's flag of that name, with its default and help: round 0 is its model."""
    return field(default=_TRAIN[name].default, metadata=_TRAIN[name].metadata)


@dataclass(frozen=True)
class Settings:
    data: str = field(metadata={"help": "ingest output to train on: local path or s3://"})
    output: str = field(metadata={"help": "where to write the rounds' models and table"})
    modes: tuple[str, ...] = field(default=schema.HARDEN_MODES, metadata={
        "help": "background: learn the fooling images as one more class; adversarial: under "
                "their source image's class (each mode runs its own rounds from round 0)"})
    rounds: int = field(default=3, metadata={"help": "rounds of fooling and retraining per mode"})
    images_per_round: int = field(default=500, metadata={
        "help": "training images made into fooling images each round (one target each)"})
    sampling: str = field(default="uniform", metadata={
        "help": "each image's target: uniform over the other real classes (seeded), or "
                "runner-up, the real class the attacked model scores next after the label",
        "choices": SAMPLINGS})
    classes: int | None = field(default=None, metadata={
        "help": "train and measure on the first K classes of the data only (default: all)"})
    limit_images: int = field(default=100, metadata={
        "help": "validation images x every real target that exact measures each round (the "
                "frontier's --limit-images)"})
    epochs: int = _as_train("epochs")
    batch_size: int = field(default=_TRAIN["batch_size"].default, metadata={
        "help": "images per step"})
    lr: float | None = _as_train("lr")
    reg: float = _as_train("reg")
    optimizer: str = _as_train("optimizer")
    momentum: float = _as_train("momentum")
    schedule: str = _as_train("schedule")
    init_std: float = _as_train("init_std")
    seed: int = field(default=0, metadata={
        "help": "initial weights, shuffles, and the images and targets drawn"})
    use_gpu: bool = field(default=False, metadata={"help": "train and attack on the GPU"})
    threads: int | None = field(default=None, metadata={"help": "torch threads (default: all)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output"})


RESUMABLE = {"output", "use_gpu", "threads", "overwrite", "data"}  # not in the identity


@dataclass(frozen=True)
class Split:
    """A split's images of the classes used, in memory."""

    ids: np.ndarray  # (N,) str
    X: torch.Tensor  # (N, D) uint8 pixels
    y: np.ndarray  # (N,) int64 labels 0..K-1


def read_split(data: str, manifest: dict, split: str, K: int) -> Split:
    """Every image of ``split`` with a label below K, in the data's order."""
    D = dataset.num_features(manifest)
    ids, X, y = [], [], []
    rows = dataset.split_counts(manifest, split)
    for t in dataset.read_rows(dataset.split_files(data, manifest, split), rows, 0, sum(rows),
                               READ_ROWS, D):
        keep = np.flatnonzero(t.column(schema.LABEL).to_numpy() < K)
        t = t.take(keep)
        ids += t.column(schema.IMAGE_ID).to_pylist()
        X.append(dataset.pixels(t.column(schema.IMAGE), D).copy())
        y.append(t.column(schema.LABEL).to_numpy().astype(np.int64))
    X = np.concatenate(X) if X else np.empty((0, D), np.uint8)
    return Split(np.array(ids, dtype=object), torch.from_numpy(X),
                 np.concatenate(y) if y else np.empty(0, np.int64))


def train_settings(cfg: Settings, out: str) -> TrainSettings:
    """training.train's settings for one round's model (what its manifest records)."""
    shared = {f.name for f in fields(TrainSettings)} & {f.name for f in fields(Settings)}
    return TrainSettings(**{k: getattr(cfg, k) for k in shared - {"data", "output"}},
                         data=lifecycle.absolute(cfg.data), output=lifecycle.absolute(out))


def check(cfg: Settings) -> dict:
    """Fail fast, before anything is read or written; returns the ingest manifest."""
    if not cfg.modes or len(set(cfg.modes)) != len(cfg.modes) or not set(cfg.modes) <= set(
            schema.HARDEN_MODES):
        raise ConfigError(f"--modes must list distinct modes of {', '.join(schema.HARDEN_MODES)}"
                          f", got {','.join(cfg.modes)}")
    if cfg.rounds < 0 or cfg.images_per_round < 1 or cfg.limit_images < 1:
        raise ConfigError("--rounds must be >= 0, --images-per-round and --limit-images positive")
    if cfg.sampling not in rounds.SAMPLINGS:
        raise ConfigError(f"unknown --sampling {cfg.sampling!r}")
    from training import train  # its checks of the training flags and the data

    manifest = train.check(train_settings(cfg, cfg.output))
    C = len(manifest[schema.M_CLASSES])
    if cfg.classes is not None and not 2 <= cfg.classes <= C:
        raise ConfigError(f"--classes must be 2..{C} (the data's classes), got {cfg.classes}")
    if cfg.use_gpu and not torch.cuda.is_available():
        raise ConfigError("--use-gpu, but torch sees no GPU here")
    return manifest


def output(cfg: Settings) -> lifecycle.Output:
    """The job's lifecycle: it owns round 0, each mode's folder and the table."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in RESUMABLE}
    return lifecycle.Output(
        cfg.output, "harden", owns=(_round_name(0), *cfg.modes, f"{schema.HARDEN_TABLE}.parquet",
                                    f"{schema.HARDEN_TABLE}.md"),
        inputs={"data": cfg.data},
        identity={"inputs": {"data": lifecycle.input_identity(cfg.data)}, "settings": settings})


def _round_name(r: int) -> str:
    return f"round={r}"


def model_uri(out: str, mode: str, r: int) -> str:
    """Where round r's model of a mode is: ``round=0/`` (shared), ``<mode>/round=<r>/``."""
    return storage.join(out, _round_name(0)) if r == 0 else storage.join(out, mode, _round_name(r))


def fooling_path(mode: str, r: int, fresh: bool = False) -> str:
    """``<mode>/fooling-<r>.parquet`` (trained on from round r) or ``fresh-<r>.parquet``,
    inside the output."""
    return f"{mode}/{'fresh' if fresh else 'fooling'}-{r}.parquet"


def write_fooling(uri: str, ids, labels, targets, attacked: int, linf, images, shape) -> dict:
    """One round's fooling images (schema.HARDEN_FOOLING_SCHEMA), page checksums on; returns
    the manifest's counts of the file."""
    table = pa.Table.from_pydict({
        schema.IMAGE_ID: list(ids), schema.LABEL: np.asarray(labels, np.int16),
        schema.TARGET: np.asarray(targets, np.int16),
        schema.ATTACKED_ROUND: np.full(len(ids), attacked, np.int16),
        schema.LINF: np.asarray(linf, np.float32),
        schema.IMAGE: [x.tobytes() for x in images]},
        schema=schema.with_image_shape(schema.HARDEN_FOOLING_SCHEMA, shape))
    buf = io.BytesIO()
    pq.write_table(table, buf, write_page_checksum=True)
    data = buf.getvalue()
    storage.write_bytes(uri, data)
    return {"rows": len(ids), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


class Job:
    """One run: the data in memory, the rounds of each mode, their rows."""

    def __init__(self, cfg: Settings, manifest: dict):
        self.cfg, self.m = cfg, manifest
        self.K = cfg.classes or len(manifest[schema.M_CLASSES])
        self.device = "cuda" if cfg.use_gpu else "cpu"
        self.train = read_split(cfg.data, manifest, "train", self.K)
        self.val = read_split(cfg.data, manifest, "val", self.K)
        need = cfg.images_per_round * cfg.rounds
        if need > len(self.train.y) or not len(self.val.y):
            raise ConfigError(f"--images-per-round x --rounds = {need} fooling images need as "
                              f"many training images of the first {self.K} classes: the data "
                              f"has {len(self.train.y)} (and {len(self.val.y)} validation)")
        self.shift, self.scale = softmax.channel_stats(
            manifest[schema.M_PIXEL_MEAN], manifest[schema.M_PIXEL_STD], self.train.X.shape[1])
        self.yv = torch.from_numpy(self.val.y)
        self.order = np.random.default_rng(cfg.seed).permutation(len(self.train.y))
        self.files: list[dict] = []

    def classes(self, mode: str) -> tuple[list[str], list[str]]:
        """The model's WNIDs and names: the data's first K, and ``background`` last in that
        mode."""
        names = schema.class_names(self.m)[: self.K]
        wnids = self.m[schema.M_CLASSES][: self.K]
        if mode == "background":
            return [*wnids, schema.BACKGROUND], [*names, schema.BACKGROUND]
        return wnids, names

    def fit(self, mode: str, r: int, X: torch.Tensor, y: np.ndarray):
        """Train round r's model, write it as a model output; returns it for the attack."""
        from training import weights

        t0 = time.perf_counter()
        uri = lifecycle.absolute(model_uri(self.cfg.output, mode, r))
        wnids, names = self.classes(mode)
        tcfg = train_settings(self.cfg, uri)
        fitted = rounds.fit(X, torch.from_numpy(y), self.val.X, self.yv, len(wnids), self.shift,
                            self.scale, tcfg, self.device)
        out = lifecycle.Output(uri, "train", owns=(schema.WEIGHTS_FILE, schema.METRICS_FILE,
                                                   schema.TEMPLATES_FILE),
                               inputs={"data": self.cfg.data},
                               identity={"inputs": {"data": lifecycle.input_identity(
                                   self.cfg.data)}, "settings": {"mode": mode, "round": r}})
        out.prepare(False, resumable=False)
        data = {**self.m, schema.M_CLASSES: wnids, schema.M_CLASS_NAMES: names}
        config = {**asdict(tcfg), "lr": tcfg.peak_lr, "harden": {"mode": mode, "round": r}}
        seconds = round(time.perf_counter() - t0, 3)
        weights.write_model(out, data, fitted.state, config, {"train_s": seconds,
                                                              "total_s": seconds})
        return uri, LinearModel(fitted.W, fitted.b, self.device)

    def row(self, mode: str, r: int, uri: str, model, added: int, total: int,
            trained: np.ndarray | None = None, fresh: dict | None = None) -> HardenRow:
        """Round r's measurements on the validation split (rounds.accuracy, rounds.minimal_linf)
        and, from round 1, the shares of this round's fooling images and of fresh ones."""
        m = {**rounds.accuracy(model, self.val.X, self.yv),
             **rounds.minimal_linf(model, self.val.X[: self.cfg.limit_images], self.K)}
        bg = mode == "background"
        caught = rounds.shares(model, trained, {"bg": self.K}) if trained is not None else {}
        f = rounds.shares(model, fresh["images"], {"bg": self.K, "target": fresh["targets"],
                                                   "label": fresh["labels"]}) if fresh else {}
        return HardenRow(mode=mode if r else schema.HARDEN_PLAIN, round=r, reg=self.cfg.reg,
                         classes=model.C, val_top1=m["val_top1"], val_top5=m["val_top5"],
                         background_trained=caught.get("bg") if bg else None,
                         background_fresh=f.get("bg") if bg else None,
                         fresh_target=f.get("target"), fresh_label=f.get("label"),
                         median_linf=m["median_linf"], p90_linf=m["p90_linf"],
                         success_rate=m["success_rate"], pairs=m["pairs"], fooled_added=added,
                         fooled_total=total, model=uri)

    def attack(self, model, mode: str, r: int, X: torch.Tensor, y: np.ndarray, ids,
               pick: np.ndarray, fresh: bool) -> dict:
        """Fooling images of the images ``pick`` against round r-1's model, written as round
        r's file; the ones that had to move and were fooled."""
        rng = np.random.default_rng([self.cfg.seed, r, int(fresh)])
        S = model.scores(X[pick]).cpu().numpy()
        targets = rounds.draw_targets(y[pick], S, self.K, self.cfg.sampling, rng)
        images, ok, linf = rounds.fool(model, X[pick], targets)
        keep = pick[ok]
        path = fooling_path(mode, r, fresh)
        entry = write_fooling(storage.join(self.cfg.output, path), ids[keep], y[keep],
                              targets[ok], r - 1, linf[ok], images[ok],
                              self.m[schema.M_IMAGE_SHAPE])
        self.files.append({"path": path, **entry})
        return {"images": images[ok], "labels": y[keep], "targets": targets[ok]}

    def mode(self, mode: str, plain: tuple) -> list[HardenRow]:
        """Rounds 1..R of one mode, from the round 0 model."""
        cfg, out, N = self.cfg, [], self.cfg.images_per_round
        (uri, model), X, y = plain, self.train.X, self.train.y
        for r in range(1, cfg.rounds + 1):
            pick = self.order[(r - 1) * N: r * N]
            made = self.attack(model, mode, r, self.train.X, self.train.y, self.train.ids, pick,
                               fresh=False)
            val_pick = np.random.default_rng([cfg.seed, r]).permutation(len(self.val.y))[:N]
            fresh = self.attack(model, mode, r, self.val.X, self.val.y, self.val.ids, val_pick,
                                fresh=True)
            X = torch.cat([X, torch.from_numpy(made["images"])])
            y = np.concatenate([y, rounds.training_labels(mode, made["labels"], self.K)])
            uri, model = self.fit(mode, r, X, y)
            out.append(self.row(mode, r, uri, model, len(made["images"]),
                                len(y) - len(self.train.y), made["images"], fresh))
            log.info("%s round %d: %s", mode, r, _line(out[-1]))
        return out


def _line(r: HardenRow) -> str:
    bg = "" if r.background_fresh is None else (
        f", background: {r.background_trained:.0%} of its fooling images, "
        f"{r.background_fresh:.0%} of fresh ones")
    med = "none fooled" if r.median_linf is None else f"{r.median_linf:g}"
    return f"val top-1 {r.val_top1:.1%}, exact's median L-inf {med}{bg}"


def run(cfg: Settings) -> dict:
    """Round 0, then --rounds rounds of each mode; writes the models, the table and the
    manifest, which it returns."""
    t0 = time.perf_counter()
    manifest = check(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = output(cfg)
    job = Job(cfg, manifest)
    out.prepare(cfg.overwrite, resumable=False)
    plain = job.fit(schema.HARDEN_PLAIN, 0, job.train.X, job.train.y)
    rows = [job.row(schema.HARDEN_PLAIN, 0, plain[0], plain[1], 0, 0)]
    log.info("round 0: %s", _line(rows[0]))
    for mode in cfg.modes:
        rows += job.mode(mode, plain)
    files = write_harden(cfg.output, rows)
    result = out.finish({
        schema.M_KIND: "harden", schema.M_DATA: lifecycle.absolute(cfg.data),
        schema.M_CLASSES: manifest[schema.M_CLASSES][: job.K],
        "rows": [asdict(r) for r in rows], schema.M_FILES: [*files, *job.files],
        **schema.stamp(asdict(cfg), {"total_s": round(time.perf_counter() - t0, 3)})})
    log.info("%d rounds written to %s:\n%s", len(rows), cfg.output, harden_markdown(rows))
    return result


def main(argv=None) -> None:
    cli.main(Settings, run, argv, __doc__, uses_ray=False)


if __name__ == "__main__":
    main()
