"""Fooling images for every validation image x every target class, as a Ray Data batch job.

    python -m attacks.fool --data out/imagenet64 --model out/model --output out/fooling
    python -m attacks.fool --data DATA --model MODEL --output OUT --methods sign \\
        --targets 0,1,2 --limit-images 100 --noise-images 8 --confidence 0.9 --keep-images none
    ray job submit --working-dir . -- python -m attacks.fool --data s3://b/imagenet64 \\
        --model s3://b/model --output s3://b/fooling --use-gpu

Writes, under the output (layout in docs/design.md, "Fooling results"):
- ``pairs/method=<m>/target=<t>/<chunk>.parquet``: one row per (image, target, method): the
  image's id, label and predicted class, the change's strength, L-inf and L2, the class the
  fooling image gets and the target's probability, the certified bounds and the fooling image
  (method and target are the folder names); ``<chunk>`` is ``val-NNNNN`` (a run of validation
  images sized so the file is about --file-size-mb) or ``noise-00000``. One method or one target
  is one folder: read it without the rest (3 x 1,000 folders for the full run).
  The fooling image is stored for the pairs --keep-images says: by default (sample) those of the
  first --sample-images (100) validation images and of every noise start, null for the others,
  so that the full run's three methods take about 10 GB (50,000 x ~40 bytes of measurements
  and 100 x 12 KB of images per folder, one file each) where --keep-images all takes 1.8 TB
  (files of ~128 MB, ~10,900 rows, 15,000 files in all).
- ``summary/``: per target, per method, and success vs L-inf budget (what attacks.summary prints).
- ``figures/``: contact sheets, original | amplified perturbation | fooling image.
- ``manifest.json`` last.

The work is split into parts (chunk x method x --targets-per-part targets), each a row of a
small Ray Data dataset; an actor pool of --num-workers workers (CPU, or one GPU each with
--use-gpu) reads its chunk's images, attacks them in batches of --pairs-per-batch pairs and
writes its files itself, then a marker. The pairs never pass through the object store, and a
rerun after a crash skips the parts with markers.
"""
# The code: attacks/parts.py plans the parts, attacks/worker.py is the actor, columns in
# common/schema.py.

from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import asdict, dataclass, field

from attacks import outputs, parts
from attacks.methods.linear import LinearModel
from attacks.pairs import Pairs
from attacks.worker import ATTACKS, CPU_BATCH, GPU_BATCH_MAX, FoolWorker, Job
from common import cli, dataset, lifecycle, progress, schema
from common.errors import ConfigError
from common.model import Model, read_model

log = logging.getLogger(__name__)

ROW_OVERHEAD = 80  # bytes of a row besides its image, for sizing files
ATTEMPTS = 3  # runs of the parts not done, when workers are lost
# What the job writes under --output besides manifest.json (what --overwrite may remove).
OWNS = (schema.PAIRS_DIR, schema.SUMMARY_DIR, schema.FIGURES_DIR, parts.PARTS_DIR)


@dataclass(frozen=True)
class Settings:
    data: str = field(metadata={"help": "an ingest output (local path or s3://)"})
    model: str = field(metadata={"help": "a training output holding weights.npz and manifest.json"})
    output: str = field(metadata={"help": "where to write the fooling results"})
    methods: tuple[str, ...] = field(
        default=("template", "sign", "exact"),
        metadata={"help": f"some of {','.join(schema.METHODS)} (exact: the true minimum, "
                          "certified; iterative: the BIM baseline of the literature)"})
    targets: tuple[str, ...] = field(
        default=(), metadata={"help": "target classes, as indices or WNIDs (default: all)"})
    limit_images: int | None = field(
        default=None, metadata={"help": "attack only the first N validation images (default: all)"})
    noise_images: int = field(
        default=0, metadata={"help": "also start from K seeded random-noise images"})
    seed: int = field(default=0, metadata={"help": "seed of the noise images"})
    confidence: float | None = field(
        default=None, metadata={"help": "push until the target's probability is at least P "
                                        "(default: off, the first image classified as the "
                                        "target; noise starts always go to P or 0.99)"})
    keep_images: str = field(default="sample", metadata={
        "help": "which pairs store their fooling image: all (about 12 KB a pair: 1.8 TB for all "
                "of ImageNet's pairs of three methods), sample (those of the first "
                "--sample-images validation images and of every noise start: what the report's "
                "galleries and report.show draw from) or none; every pair keeps its measurements",
        "choices": ("all", "sample", "none")})
    sample_images: int = field(default=100, metadata={
        "help": "with --keep-images sample: the validation images whose pairs keep their images"})
    use_gpu: bool = field(default=False, metadata={"help": "one GPU actor per GPU, torch on cuda"})
    pairs_per_batch: int | None = field(default=None, metadata={
        "help": f"(image, target) pairs per matrix batch (default {CPU_BATCH} on a CPU; with "
                "--use-gpu as many as half the GPU's free memory holds at 48 bytes a pixel, at "
                f"most {GPU_BATCH_MAX}); a CPU worker's memory is about batch x 12288 x 32 bytes "
                "(400 MB at 1024); exact splits a batch into chunks that fit the GPU"})
    targets_per_part: int = field(default=8, metadata={"help": "targets per unit of work"})
    file_size_mb: float = field(default=128, metadata={
        "help": "target size of the pair files, MiB"})
    num_workers: int | None = field(default=None, metadata={
        "help": "attack actors (default: one per CPU, or per GPU with --use-gpu)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output"})

    RENAMED = {"batch_size": "pairs_per_batch", "workers": "num_workers"}  # refused in one line


def _targets(cfg: Settings, classes: list[str]) -> list[int]:
    if not cfg.targets:
        return list(range(len(classes)))
    out = []
    for t in cfg.targets:
        if t.isdigit() and int(t) < len(classes):
            out.append(int(t))
        elif t in classes:
            out.append(classes.index(t))
        else:
            raise ConfigError(f"unknown target {t!r}: give class indices 0..{len(classes) - 1} "
                              "or WNIDs of the data")
    return sorted(set(out))


def _check_settings(cfg: Settings) -> None:
    unknown = [m for m in cfg.methods if m not in ATTACKS]
    if unknown or not cfg.methods:
        raise ConfigError(f"unknown method {','.join(unknown) or '(none)'}: choose from "
                          f"{','.join(schema.METHODS)}")
    if cfg.keep_images not in ("all", "sample", "none"):
        raise ConfigError(f"--keep-images must be all, sample or none, got {cfg.keep_images!r}")
    if cfg.sample_images < 0:
        raise ConfigError(f"--sample-images must not be negative, got {cfg.sample_images}")
    if cfg.confidence is not None and not 0 < cfg.confidence < 1:
        raise ConfigError(f"--confidence must be between 0 and 1, got {cfg.confidence}")
    if cfg.limit_images is not None and cfg.limit_images < 1:
        raise ConfigError(f"--limit-images must be positive, got {cfg.limit_images}")
    if (min(1 if cfg.pairs_per_batch is None else cfg.pairs_per_batch, cfg.targets_per_part) < 1
            or cfg.noise_images < 0 or cfg.file_size_mb <= 0):
        raise ConfigError("--pairs-per-batch, --targets-per-part and --file-size-mb must be "
                          "positive, "
                          "--noise-images not negative")


@dataclass(frozen=True)
class Inputs:
    """What the job reads, checked before any work: the data's manifest, the model, the targets."""

    manifest: dict
    model: Model
    targets: tuple[int, ...]
    n_val: int  # validation images to attack (the first n_val rows)


def _check(cfg: Settings) -> Inputs:
    """Everything that can fail before work starts."""
    _check_settings(cfg)
    m = dataset.open_ingest(cfg.data, splits=("val",))
    model = read_model(cfg.model, dataset.num_features(m))
    if model.classes != m[schema.M_CLASSES]:
        raise ConfigError(f"the model's classes differ from the data's ({cfg.model} vs {cfg.data})")
    total = sum(dataset.split_counts(m, "val"))
    return Inputs(m, model, tuple(_targets(cfg, m[schema.M_CLASSES])),
                  min(total, cfg.limit_images or total))


def output(cfg: Settings, inputs: Inputs) -> lifecycle.Output:
    """The attack output's lifecycle: identified by the data, the model's sha256 and the
    settings that decide the rows; a rerun with the same resumes from the parts' markers."""
    kept = {"all": 1.0, "none": 0.0}.get(cfg.keep_images, min(1.0, cfg.sample_images / max(
        1, inputs.n_val)))  # the share of the pairs that store an image
    row_bytes = ROW_OVERHEAD + int(kept * inputs.model.D)
    settings = {"methods": list(cfg.methods), "targets": list(inputs.targets),
                "val_images": inputs.n_val, "noise_images": cfg.noise_images, "seed": cfg.seed,
                "confidence": cfg.confidence, "keep_images": cfg.keep_images,
                **({"sample_images": cfg.sample_images} if cfg.keep_images == "sample" else {}),
                "rows_per_chunk": max(1, int(cfg.file_size_mb * 2**20) // row_bytes),
                "targets_per_part": cfg.targets_per_part}
    return lifecycle.Output(
        cfg.output, "attack", owns=OWNS, inputs={"data": cfg.data, "model": cfg.model},
        identity={"inputs": {"data": lifecycle.input_identity(cfg.data),
                             "model": {"uri": lifecycle.absolute(cfg.model),
                                       "weights_sha256": inputs.model.sha256}},
                  "settings": settings})


def _connect(cfg: Settings) -> None:
    """Ray, once the output passed its checks; --use-gpu needs a GPU in the cluster."""
    import ray

    cli.connect_ray()
    if cfg.use_gpu and ray.cluster_resources().get("GPU", 0) < 1:
        raise ConfigError("--use-gpu was given but the Ray cluster has no GPU")


def _run_parts(cfg: Settings, todo: list[dict], job: Job, model: Model, facts: dict) -> None:
    """Run the parts on an actor pool with Ray Data; each writes its files and marker.

    A worker that dies (its node gone, out of memory) ends the pool's run; the parts without a
    marker then run again, up to ATTEMPTS times in all. Ray's own actor restarts are off: with
    them Ray prints an error line on every run (ray-project/ray#53727), and the markers make a
    rerun of what is left as good as a restart.
    """
    import ray

    if not todo:
        return
    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    workers = cfg.num_workers or (gpus if cfg.use_gpu else cpus)
    refs = ray.put((model.W, model.b, facts))
    resources = {"num_gpus": 1} if cfg.use_gpu else {"num_cpus": 1}
    pairs = sum(p.pairs for p in todo)
    with progress.watch(log, "attack", pairs, "pairs") as counter:
        for attempt in range(1, ATTEMPTS + 1):
            ds = ray.data.from_items([{"part": p.to_json()} for p in todo],
                                     override_num_blocks=len(todo))
            with warnings.catch_warnings():  # Ray's own way to turn restarts off (its comment
                # in actor_pool_map_operator.py) also warns that extra arguments are deprecated
                warnings.simplefilter("ignore", DeprecationWarning)
                out = ds.map_batches(
                    RayFoolWorker, batch_size=1, batch_format="numpy", max_restarts=0,
                    compute=ray.data.ActorPoolStrategy(size=max(1, min(workers, len(todo)))),
                    fn_constructor_kwargs={"refs": refs, "job": job, "counter": counter},
                    **resources)
            try:
                results = [json.loads(row["result"]) for row in out.take_all()]
                break
            except ray.exceptions.RayActorError as e:
                done = parts.done_keys(cfg.output)
                todo = [p for p in todo if p.key not in done]
                if attempt == ATTEMPTS:
                    raise
                log.warning("a worker was lost (%s); running the %d parts not done again",
                            str(e).splitlines()[0], len(todo))
    errors = [r["error"] for r in results if "error" in r]
    if errors:  # bad data a worker found: its one line (the parts without it are kept)
        raise ConfigError(errors[0])


class RayFoolWorker(FoolWorker):
    """FoolWorker that fetches the model from Ray's object store (once per actor)."""

    def __init__(self, refs, job: Job, counter=None):
        import ray
        import torch

        if not logging.getLogger().handlers:  # the worker's lines (its batch, each part) into
            cli.setup_logging()  # Ray's log files, as training's workers do
        if job.device == "cpu":  # one core per actor: threads beyond it only contend
            torch.set_num_threads(1)
        W, b, facts = ray.get(refs)
        super().__init__(W, b, facts, job, counter)


def run(cfg: Settings, *, kill_worker_once: str | None = None) -> dict:
    """Attack ``cfg.data`` with ``cfg.model`` into ``cfg.output``; returns the manifest written.

    ``kill_worker_once`` (tests only): a local path; the first part run kills its worker process
    and leaves the file, so that the parts run again once.
    """
    t0 = time.perf_counter()
    inputs = _check(cfg)
    out = output(cfg, inputs)
    out.prepare(cfg.overwrite, ready=lambda: _connect(cfg))
    timings = {"check_s": round(time.perf_counter() - t0, 3)}  # Ray's start included
    m, settings = inputs.manifest, out.identity["settings"]
    job = Job(output=lifecycle.absolute(cfg.output),
              val_files=tuple(dataset.split_files(cfg.data, m, "val")),
              val_counts=tuple(dataset.split_counts(m, "val")),
              n_val=inputs.n_val, image_shape=tuple(m[schema.M_IMAGE_SHAPE]),
              class_names=tuple(schema.class_names(m)), keep_images=cfg.keep_images,
              sample_images=cfg.sample_images,
              confidence=cfg.confidence, noise_seed=cfg.seed, batch_size=cfg.pairs_per_batch,
              device="cuda" if cfg.use_gpu else "cpu", kill_once=kill_worker_once)
    chunks = parts.val_chunks(inputs.n_val, settings["rows_per_chunk"]) + parts.noise_chunk(
        cfg.noise_images)
    all_parts = parts.plan_parts(chunks, cfg.methods, inputs.targets, cfg.targets_per_part)
    done = parts.done_keys(cfg.output)
    todo = [p for p in all_parts if p.key not in done]
    log.info("%d parts (%d done before), %d pairs per method", len(all_parts),
             len(all_parts) - len(todo), (inputs.n_val + cfg.noise_images) * len(inputs.targets))
    t = time.perf_counter()
    facts = LinearModel(inputs.model.W, inputs.model.b).facts(list(inputs.targets))
    timings["facts_s"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    _run_parts(cfg, todo, job, inputs.model, facts)
    timings["attack_s"] = round(time.perf_counter() - t, 3)
    markers = parts.read_markers(cfg.output, [p.key for p in all_parts])
    files = _check_rows(all_parts, markers)
    t = time.perf_counter()
    pairs = Pairs(job.output, files)  # what the summary and the figures read back
    files += outputs.write_summary(pairs, cfg.methods, inputs.targets, job.class_names)
    model = LinearModel(inputs.model.W, inputs.model.b, facts=facts)
    files += outputs.write_figures(job, pairs, model, list(inputs.targets), m, cfg.methods,
                                   cfg.noise_images)
    timings["summary_s"] = round(time.perf_counter() - t, 3)
    timings["total_s"] = round(time.perf_counter() - t0, 3)
    manifest = out.finish(_manifest(cfg, inputs, files, timings))
    log.info("wrote %s: %d pairs in %.1f s", cfg.output, manifest[schema.M_COUNTS]["pairs"],
             timings["total_s"])
    return manifest


def _check_rows(all_parts: list[parts.Part], markers: list[parts.Marker]) -> list[dict]:
    """Every part wrote exactly its chunk x targets rows; returns the pair files."""
    by_key = {mk.key: mk for mk in markers}
    files = []
    for p in all_parts:
        got = by_key[p.key].rows
        if got != p.pairs:  # a lost or doubled row is a bug, never an output
            raise RuntimeError(f"part {p.key} wrote {got} rows, expected {p.pairs}")
        files += by_key[p.key].files
    return files


def _manifest(cfg: Settings, inputs: Inputs, files: list[dict], timings: dict) -> dict:
    m = inputs.manifest
    pair_rows = sum(f["rows"] for f in files if f["path"].startswith(schema.PAIRS_DIR + "/"))
    return {
        schema.M_KIND: "attack",
        schema.M_SOURCE: {"data": lifecycle.absolute(cfg.data),
                          "model": lifecycle.absolute(cfg.model),
                          "model_sha256": inputs.model.sha256},
        schema.M_CLASSES: m[schema.M_CLASSES],
        schema.M_CLASS_NAMES: m.get(schema.M_CLASS_NAMES),
        schema.M_IMAGE_SHAPE: m[schema.M_IMAGE_SHAPE],
        schema.M_COUNTS: {"pairs": pair_rows, "val_images": inputs.n_val,
                          "noise_images": cfg.noise_images, "targets": len(inputs.targets),
                          "methods": list(cfg.methods)},
        "layout": f"{schema.PAIRS_DIR}/{schema.METHOD}=<method>/{schema.TARGET}=<target>/"
                  "<val-NNNNN|noise-00000>.parquet (Hive partitions)",
        schema.M_FILES: files,
        **schema.stamp(asdict(cfg), timings),
    }


def main(argv=None) -> None:
    cli.main(Settings, run, argv, __doc__)


if __name__ == "__main__":
    main()
