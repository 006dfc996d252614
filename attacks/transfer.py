"""Do fooling images transfer? Score one attack run's stored images with other models.

    python -m attacks.transfer --results out/fooling --models out/sweep/reg=0.1,out/sweep/reg=1 \\
        --output out/transfer

The blog: "fooling images generalize across models". The attack run (attacks.fool) made its
images for one model; every model of --models scores the pairs that store their image (all of
them with --keep-images all; the pairs of its first --sample-images validation images and of its
noise starts with the default, sample), and the table says, per (source model, scoring model,
method, origin):
- ``target_rate``: the fraction of pairs the scoring model classifies as the intended target;
- ``moved_rate``: the fraction it classifies differently from the original image (its own
  prediction of the original: the validation image of the attack's data, or the seeded noise);
- ``median_p_target``: the median softmax probability of the target (from a histogram of
  log10 p in bins of 0.01 decades, so within a factor 10 ** 0.01 = 1.023).
``same_model`` marks the row whose scoring model is the attack's own (its weights' sha256): its
target_rate is the attack's success rate. The pairs are read one Parquet fragment at a time,
local or s3://, and scored in batches of at least --pairs-per-batch gathered across files (under
--keep-images sample a file holds few images): memory does not grow with the run. Plain Python
(no Ray): scoring is one matrix product per model and batch.

Writes ``transfer.parquet``, ``transfer.md`` and, last, ``manifest.json`` under --output.
"""
# The code: the table's rows in attacks/tables.py (TransferRow).

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from attacks import tables
from attacks.methods.linear import LinearModel
from attacks.methods.noise import noise_ids, noise_images
from attacks.pairs import Pairs, open_attack
from common import cli, dataset, lifecycle, schema
from common.errors import ConfigError
from common.model import Model, read_model

log = logging.getLogger(__name__)

TABLE = schema.TRANSFER_TABLE
LOG_STEP = 0.01  # decades per bin of the p_target histogram (the module docstring says 0.01)
LOG_MIN = -45.0  # log10 p below this (float32 underflows near 1e-45) counts in the first bin
BINS = int(-LOG_MIN / LOG_STEP) + 1


@dataclass(frozen=True)
class Settings:
    results: str = field(metadata={"help": "an attack output with its images kept"})
    models: tuple[str, ...] = field(metadata={"help": "model outputs that score the images"})
    output: str = field(metadata={"help": "where to write the table: local path or s3://"})
    pairs_per_batch: int = field(default=4096, metadata={"help": "pairs read and scored at a time"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing table"})

    RENAMED = {"batch_rows": "pairs_per_batch"}  # the old name, refused in one line


@dataclass
class Tally:
    """Counts for one (scoring model, method, origin)."""

    pairs: int = 0
    to_target: int = 0
    moved: int = 0
    hist: np.ndarray = field(default_factory=lambda: np.zeros(BINS, np.int64))

    def add(self, pred: np.ndarray, t: np.ndarray, before: np.ndarray, p: np.ndarray) -> None:
        self.pairs += len(t)
        self.to_target += int((pred == t).sum())
        self.moved += int((pred != before).sum())
        logp = np.log10(np.maximum(p.astype(np.float64), 1e-300))
        idx = np.clip(np.floor((logp - LOG_MIN) / LOG_STEP), 0, BINS - 1).astype(np.int64)
        self.hist += np.bincount(idx, minlength=BINS)

    def median_p(self) -> float:
        """The bin centre that holds the median of p_target (lower median for even counts)."""
        i = int(np.searchsorted(np.cumsum(self.hist), (self.pairs + 1) // 2))
        return float(min(1.0, 10 ** (LOG_MIN + (i + 0.5) * LOG_STEP)))


def _check(cfg: Settings) -> tuple[dict, Pairs, list[Model]]:
    """The attack's manifest (images kept), its pairs (their files checked) and the models,
    which must share its classes."""
    if cfg.pairs_per_batch < 1 or not cfg.models or len(set(cfg.models)) != len(cfg.models):
        raise ConfigError("--pairs-per-batch must be positive and --models list distinct models")
    m = open_attack(cfg.results)
    if m[schema.M_CONFIG].get("keep_images") == "none":
        raise ConfigError(f"{cfg.results} kept no images (--keep-images none): nothing to score")
    D = int(np.prod(m[schema.M_IMAGE_SHAPE]))
    models = [read_model(uri, D) for uri in cfg.models]
    for model in models:
        if model.classes != m[schema.M_CLASSES]:
            raise ConfigError(f"{model.uri}'s classes differ from those of {cfg.results}")
    return m, Pairs.open(cfg.results, m), models


def _originals(m: dict, batch_rows: int):
    """(ids, X (n, D) uint8) batches of every image the attack started from: validation, then
    the seeded noise."""
    D, counts = int(np.prod(m[schema.M_IMAGE_SHAPE])), m[schema.M_COUNTS]
    data = m[schema.M_SOURCE]["data"]
    if counts["val_images"]:
        im = dataset.open_ingest(data, splits=("val",))
        for t in dataset.read_rows(dataset.split_files(data, im, "val"),
                                   dataset.split_counts(im, "val"), 0, counts["val_images"],
                                   batch_rows, D):
            yield t.column(schema.IMAGE_ID).to_pylist(), dataset.pixels(t.column(schema.IMAGE), D)
    n = counts["noise_images"]
    if n:
        yield noise_ids(n), noise_images(n, m[schema.M_CONFIG]["seed"],
                                         tuple(m[schema.M_IMAGE_SHAPE]))


def predictions(m: dict, linear: list[LinearModel], batch_rows: int) -> tuple[pa.Array, list]:
    """The ids of the originals and each model's class for them ((n,) int64 per model)."""
    ids, preds = [], [[] for _ in linear]
    for chunk, X in _originals(m, batch_rows):
        ids += chunk
        for i, lin in enumerate(linear):
            preds[i].append(lin.scores(torch.from_numpy(X)).argmax(1).numpy())
    return pa.array(ids, pa.string()), [np.concatenate(p) for p in preds]


def _stored(pairs: Pairs, ids: pa.Array, D: int, batch_rows: int):
    """(X (n, D) uint8, original's row in ``ids``, target, method, origin) of the pairs that
    store their image, at least ``batch_rows`` at a time (the last batch excepted): files hold
    few kept pairs under --keep-images sample, and each batch costs a pass over the weights."""
    columns = [schema.IMAGE_ID, schema.ORIGIN, schema.METHOD, schema.TARGET, schema.IMAGE]
    held, count = [], 0
    for batch in pairs.batches(columns, batch_rows):
        batch = batch.filter(pc.is_valid(batch.column(schema.IMAGE)))  # --keep-images sample
        if not batch.num_rows:
            continue
        row = pc.index_in(batch.column(schema.IMAGE_ID), value_set=ids)
        if row.null_count:
            raise ConfigError(f"{pairs.results} holds pairs of images that the attack's manifest "
                              "does not list: it is not one run's output")
        held.append((dataset.pixels(batch.column(schema.IMAGE), D, batch.column(schema.IMAGE_ID),
                                    pairs.results),
                     row.to_numpy().astype(np.int64),
                     batch.column(schema.TARGET).to_numpy().astype(np.int64),
                     *(batch.column(c).to_numpy(zero_copy_only=False).astype(str)
                       for c in (schema.METHOD, schema.ORIGIN))))
        count += batch.num_rows
        if count >= batch_rows:
            yield tuple(np.concatenate(part) for part in zip(*held))
            held, count = [], 0
    if held:
        yield tuple(np.concatenate(part) for part in zip(*held))


def score(pairs: Pairs, m: dict, models: list[Model], batch_rows: int) -> dict:
    """{(model index, method, origin): Tally} over every pair that stores its image."""
    linear = [LinearModel(model.W, model.b) for model in models]
    ids, before = predictions(m, linear, batch_rows)
    tallies = {}
    for X, row, t, *keys in _stored(pairs, ids, models[0].D, batch_rows):
        X = torch.from_numpy(X)
        for i, lin in enumerate(linear):
            S = lin.scores(X)
            pred = S.argmax(1).numpy()
            p = torch.log_softmax(S, 1).gather(1, torch.from_numpy(t)[:, None])[:, 0].exp()
            for method, origin in set(zip(*keys)):
                sel = (keys[0] == method) & (keys[1] == origin)
                tallies.setdefault((i, method, origin), Tally()).add(
                    pred[sel], t[sel], before[i][row[sel]], p.numpy()[sel])
    return tallies


def rows(m: dict, models: list[Model], tallies: dict) -> list[tables.TransferRow]:
    """The table's rows, sorted by scoring model (in --models order), method and origin."""
    source = m[schema.M_SOURCE]
    return [tables.TransferRow(source_model=source["model"], scoring_model=models[i].uri,
                               same_model=models[i].sha256 == source["model_sha256"],
                               method=method, origin=origin, pairs=tally.pairs,
                               target_rate=tally.to_target / tally.pairs,
                               moved_rate=tally.moved / tally.pairs,
                               median_p_target=tally.median_p())
            for (i, method, origin), tally in sorted(tallies.items())]


def output(cfg: Settings, m: dict, models: list[Model]) -> lifecycle.Output:
    inputs = {"results": cfg.results, **{f"model {i}": u for i, u in enumerate(cfg.models)}}
    return lifecycle.Output(
        cfg.output, "transfer", owns=(f"{TABLE}.parquet", f"{TABLE}.md"), inputs=inputs,
        identity={"inputs": {"results": lifecycle.input_identity(cfg.results),
                             "models": [{"uri": lifecycle.absolute(x.uri),
                                         "weights_sha256": x.sha256} for x in models]},
                  "settings": {}})


def run(cfg: Settings) -> dict:
    """Score the attack's stored images with every model; returns the manifest written."""
    t0 = time.perf_counter()
    m, pairs, models = _check(cfg)
    out = output(cfg, m, models)
    out.prepare(cfg.overwrite, resumable=False)
    table = rows(m, models, score(pairs, m, models, cfg.pairs_per_batch))
    files = tables.write_transfer(cfg.output, table)
    manifest = out.finish({
        schema.M_KIND: "transfer", schema.M_SOURCE: out.identity["inputs"],
        "rows": [asdict(r) for r in table], schema.M_FILES: files,
        **schema.stamp(asdict(cfg), {"total_s": round(time.perf_counter() - t0, 3)})})
    log.info("transfer of %s to %d models:\n%s", cfg.results, len(models),
             tables.transfer_markdown(table))
    return manifest


def main(argv=None) -> None:
    cli.main(Settings, run, argv, __doc__, uses_ray=False)


if __name__ == "__main__":
    main()
