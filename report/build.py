"""The analysts' report: one static HTML page that tells what the attack run found.

    python -m report --results out/fooling --output out/report \\
        [--model out/model] [--sweep out/sweep] [--frontier out/frontier] \\
        [--confident out/confident] [--transfer out/transfer]

Reads the attack job's output (local or s3://; refused without its manifest): its summary tables,
a few dozen of its stored pairs (the galleries) with the images they started from, the model's
weights and manifest, the data's manifest; and, when given, a regularization sweep, a frontier
(the same pairs under each of its models), an attack of the same model run with --confidence
(a gallery of confident fooling images) and transfer tables. Writes ``index.html`` (every
picture it shows embedded, so it opens offline, from anywhere; a few MB, also at 1,000 classes),
the full-size figures it links beside it under ``figures/``, and ``manifest.json``. It reads
summary tables and a bounded number of partitions, never every pair, so it takes about as long
on 50M pairs as on a thousand.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

from attacks import summary
from attacks.pairs import open_attack
from common import cli, lifecycle, schema, storage
from report import examples, page, sections, story

log = logging.getLogger(__name__)

INDEX = "index.html"
BUDGET_MB = 3  # MiB: index.html stays under this at 1,000 classes (tests/test_report.py checks)


@dataclass(frozen=True)
class Settings:
    results: str = field(metadata={"help": "an attack output (attacks.fool): local or s3://"})
    output: str = field(metadata={"help": "folder to write the report into: local or s3://"})
    model: str | None = field(default=None, metadata={
        "help": "the model's training output (default: the one the attack used)"})
    sweep: str | None = field(default=None, metadata={
        "help": "a training.sweep output, for the regularization trade-off"})
    frontier: str | None = field(default=None, metadata={
        "help": "an attacks.frontier output: accuracy against fooling strength"})
    transfer: tuple[str, ...] = field(default=(), metadata={
        "help": "attacks.transfer outputs, shown as one matrix"})
    confident: str | None = field(default=None, metadata={
        "help": "an attack output of the same model run with --confidence (e.g. 0.99): a "
                "gallery of fooling images the model is that sure of"})
    top: int = field(default=8, metadata={"help": "classes shown as easiest and hardest"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing report"})


def build(cfg: Settings) -> tuple[str, dict[str, bytes]]:
    """The page's HTML and the files beside it (figures/<name> -> PNG bytes)."""
    frames = {k: t.to_pandas() for k, t in summary.read_summary(cfg.results).items()}
    m = open_attack(cfg.results)
    model = examples.attack_model(cfg.results, m, cfg.model)
    f = sections.Facts(cfg.results, m, frames, model, schema.class_names(m), cfg.top, cfg.sweep,
                       cfg.frontier, cfg.transfer, cfg.confident)
    parts = [s for builder in sections.SECTIONS for s in builder(f)]
    counts = m[schema.M_COUNTS]
    pairs = counts["val_images"] * counts["targets"]
    lead = story.LEAD + story.headline(frames["budget"], f.method, pairs)
    if "budget_l2" in frames and "exact-l2" in counts["methods"]:
        lead += story.headline_l2(frames["budget_l2"], pairs)
    return page.render(parts, "Fooling a linear classifier", lead), f.files


def output(cfg: Settings) -> lifecycle.Output:
    """The report's lifecycle: it owns its page and figures, and reads the outputs it shows."""
    inputs = {"results": cfg.results, "model": cfg.model, "sweep": cfg.sweep,
              "frontier": cfg.frontier, "confident": cfg.confident,
              **{f"transfer {i}": t for i, t in enumerate(cfg.transfer)}}
    return lifecycle.Output(
        cfg.output, "report", owns=(INDEX, schema.FIGURES_DIR), inputs=inputs,
        identity={"inputs": {k: v and lifecycle.absolute(v) for k, v in inputs.items()},
                  "settings": {"top": cfg.top}})


def run(cfg: Settings) -> dict:
    """Write the report; returns its manifest."""
    t0 = time.perf_counter()
    storage.check_readable(cfg.results)
    out = output(cfg)
    out.check(cfg.overwrite, resumable=False)
    page, figures = build(cfg)
    out.prepare(cfg.overwrite, resumable=False)
    for name, png in figures.items():
        storage.write_bytes(storage.join(cfg.output, schema.FIGURES_DIR, name), png)
    storage.write_bytes(storage.join(cfg.output, INDEX), page.encode())
    took = round(time.perf_counter() - t0, 3)
    manifest = {schema.M_KIND: "report",
                schema.M_SOURCE: out.identity["inputs"],
                schema.M_FILES: [{"path": p} for p in
                                 [INDEX, *(f"{schema.FIGURES_DIR}/{n}" for n in figures)]],
                **schema.stamp(asdict(cfg), {"total_s": took})}
    manifest = out.finish(manifest)
    log.info("report with %d figures in %.1f s: %s", len(figures), took,
             storage.join(cfg.output, INDEX))
    return manifest


def main(argv=None) -> None:
    def run_and_show(cfg: Settings) -> None:
        run(cfg)
        print(f"report: {storage.join(cfg.output, INDEX)}")

    cli.main(Settings, run_and_show, argv, __doc__, uses_ray=False)


if __name__ == "__main__":
    main()
