"""The analysts' report: a static, self-contained HTML page built from the summary tables.

    python -m attacks.report --results out/fooling --output out/report \\
        [--model out/model] [--sweep out/sweep]

Reads the attack job's output (local or s3://; refused without its manifest), its summary tables
and contact sheets, the model's templates and metrics, and a regularization sweep when given, and
writes ``index.html`` (every figure embedded: it opens offline, from anywhere), the figures as PNG
files beside it, and ``manifest.json``. It reads summary tables, never every pair, so it takes
about as long on 50M pairs as on a thousand.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from attacks import charts
from common import cli, schema, storage
from common.errors import ConfigError

log = logging.getLogger(__name__)

SWEEP_IMAGES = 64  # validation images per sweep model for the median strength to fool
INDEX = "index.html"


@dataclass(frozen=True)
class Settings:
    results: str = field(metadata={"help": "an attack output (attacks.fool): local or s3://"})
    output: str = field(metadata={"help": "folder to write the report into: local or s3://"})
    model: str | None = field(default=None, metadata={
        "help": "the model's training output (default: the one the attack used)"})
    sweep: str | None = field(default=None, metadata={
        "help": "a training.sweep output, for the regularization trade-off"})
    top: int = field(default=8, metadata={"help": "classes shown as easiest and hardest"})


def read_frame(uri: str) -> pd.DataFrame:
    fs, path = storage.filesystem(uri)
    return pq.read_table(path, filesystem=fs).to_pandas()


def summary_frames(results: str) -> dict[str, pd.DataFrame]:
    names = {"targets": schema.SUMMARY_TARGETS, "methods": schema.SUMMARY_METHODS,
             "budget": schema.SUMMARY_BUDGET, "sources": schema.SUMMARY_SOURCES,
             "strength": schema.SUMMARY_STRENGTH}
    return {k: read_frame(storage.join(results, schema.SUMMARY_DIR, v)) for k, v in names.items()}


def sweep_frame(sweep: str, data: str, names: list[str]) -> tuple[pd.DataFrame, dict[str, bytes]]:
    """The sweep's table with the median sign eps that fools each model on a few val images,
    and each model's templates."""
    from attacks.linear import LinearModel
    from attacks.sign import Sign
    from common import dataset
    from training.templates import render as render_templates

    storage.read_manifest(sweep, "sweep output")
    frame = read_frame(storage.join(sweep, f"{schema.SWEEP_TABLE}.parquet")).sort_values("reg")
    m = dataset.open_ingest(data)
    fs, path = storage.filesystem(dataset.split_files(data, m, "val")[0])
    val = pq.ParquetFile(path, filesystem=fs).iter_batches(SWEEP_IMAGES, columns=[schema.IMAGE])
    X = np.stack([np.frombuffer(v, np.uint8) for v in next(val).column(0).to_pylist()])
    medians, templates = [], {}
    X = torch.from_numpy(X)
    for reg, model in zip(frame["reg"], frame["model"]):
        with np.load(io.BytesIO(storage.read_bytes(storage.join(model, schema.WEIGHTS_FILE)))) as z:
            lin = LinearModel(z[schema.W_KEY], z[schema.B_KEY])
        targets = torch.arange(lin.C)
        fooled = Sign(lin)(X, lin.scores(X), targets)
        ok = (fooled.scores.argmax(1) == targets.repeat(len(X))).numpy()
        medians.append(float(np.median(fooled.strength.numpy()[ok])) if ok.any() else np.nan)
        templates[f"reg={reg:g}"] = render_templates(lin.W.numpy(), m[schema.M_IMAGE_SHAPE], names)
    return frame.assign(median_eps=medians), templates


def table_html(frame: pd.DataFrame, digits: int = 3) -> str:
    return frame.to_html(index=False, float_format=lambda v: f"{v:.{digits}g}", border=0,
                         classes="t", na_rep="")


def img(name: str, png: bytes, caption: str) -> str:
    data = base64.b64encode(png).decode()
    return (f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def render(sections: list[tuple[str, str]], title: str) -> str:
    body = "\n".join(f"<section><h2>{html.escape(h)}</h2>\n{content}</section>"
                     for h, content in sections)
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}"
             "img{max-width:100%}figure{margin:1em 0}figcaption{color:#555;font-size:90%}"
             "table.t{border-collapse:collapse;font-size:85%}table.t td,table.t th"
             "{border-bottom:1px solid #ddd;padding:3px 8px;text-align:right}"
             "pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:80%}"
             ".row{display:flex;flex-wrap:wrap;gap:1em}.row figure{max-width:32%}")
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}"
            f"</title><style>{style}</style></head><body><h1>{html.escape(title)}</h1>"
            f"{body}</body></html>")


def _model_parts(model: str, names: list[str], shape) -> tuple[list, dict]:
    """The templates figure (drawn from weights.npz) and the model's final metrics."""
    from training.templates import render as render_templates

    m = storage.read_manifest(model, "training output")
    final = m.get(schema.M_FINAL) or {}
    acc = pd.DataFrame([{"metric": k, "value": v} for k, v in final.items()])
    with np.load(io.BytesIO(storage.read_bytes(storage.join(model, schema.WEIGHTS_FILE)))) as z:
        png = render_templates(z[schema.W_KEY], tuple(shape), names)
    caption = (f"Every class's weights W[c] as an image, stretched to 0..255 ({len(names)} "
               "classes): the templates that the fooling steps add.")
    return [("The classifier's templates", img("templates", png, caption)
             + (table_html(acc) if len(acc) else ""))], {"templates.png": png}


def _figure_files(results: str, manifest: dict) -> dict[str, bytes]:
    """The attack job's contact sheets (original | amplified perturbation | fooling image)."""
    rels = [f["path"] for f in manifest[schema.M_FILES]
            if f["path"].startswith(f"{schema.FIGURES_DIR}/") and f["path"].endswith(".png")]
    return {rel.split("/")[-1]: storage.read_bytes(storage.join(results, rel)) for rel in rels}


def build(cfg: Settings) -> tuple[str, dict[str, bytes]]:
    """The page's HTML and its figures (name -> PNG bytes)."""
    m = storage.read_manifest(cfg.results, "attack output")
    if m.get(schema.M_KIND) != "attack":
        raise ConfigError(f"{cfg.results} is not an attack output (kind: {m.get(schema.M_KIND)!r})")
    names = m.get(schema.M_CLASS_NAMES) or m[schema.M_CLASSES]
    frames = summary_frames(cfg.results)
    figures: dict[str, bytes] = {}
    sections: list[tuple[str, str]] = []
    model = cfg.model or m[schema.M_SOURCE]["model"]
    parts, files = _model_parts(model, names, m[schema.M_IMAGE_SHAPE])
    sections += parts
    figures.update(files)
    sheets = _figure_files(cfg.results, m)
    figures.update(sheets)
    sections.append(("Fooling images", '<div class="row">' + "".join(
        img(k, v, k[:-4]) for k, v in sheets.items()) + "</div>"))
    figures["budget.png"] = charts.budget_curves(frames["budget"])
    figures["strength.png"] = charts.strength_histograms(frames["strength"])
    methods = frames["methods"]
    sections.append(("Success against the L-inf budget", img(
        "budget", figures["budget.png"], "Fraction of (image, target) pairs whose stored image is "
        "classified as the target within each L-inf budget; exact's curve is the true minimum "
        "(within one level). Dashed: the tightest certified lower bound's curve; no attack can "
        "fool more pairs within that budget.") + table_html(methods)))
    sections.append(("How much it takes", img("strength", figures["strength.png"],
                                             "Distribution of the strength each method needed.")))
    for key, frame_name, value, title in (
            ("target", "targets", "linf_q50", "Targets: easiest and hardest to fool into"),
            ("label", "sources", "linf_mean", "Source classes that resist")):
        frame = frames[frame_name]
        frame = frame[frame["origin"] == "val"]
        if not frame.empty:
            name = f"{frame_name}.png"
            figures[name] = charts.ranked_bars(frame, key, value, names, title, cfg.top)
            sections.append((title, img(name, figures[name], f"By {value} of the fooled pairs "
                                        "(validation images)") + table_html(frame.drop(
                                            columns=["origin"]).head(40))))
    if cfg.sweep:
        sweep, templates = sweep_frame(cfg.sweep, m[schema.M_SOURCE]["data"], names)
        figures["tradeoff.png"] = charts.tradeoff(sweep)
        figures.update({f"templates_{k}.png": v for k, v in templates.items()})
        sections.append(("The regularization trade-off", img(
            "tradeoff", figures["tradeoff.png"], "Stronger L2: lower accuracy, and larger steps "
            f"needed to fool (sign method, first {SWEEP_IMAGES} validation images, all targets).")
            + table_html(sweep.drop(columns=["model"]))
            + "".join(img(k, v, f"templates at {k}") for k, v in templates.items())))
    run_info = {k: m.get(k) for k in (schema.M_COUNTS, schema.M_CONFIG, schema.M_TIMINGS,
                                      schema.M_VERSIONS, schema.M_CREATED)}
    sections.append(("The run", f"<pre>{html.escape(json.dumps(run_info, indent=1))}</pre>"))
    return render(sections, f"Fooling a linear classifier: {cfg.results}"), figures


def run(cfg: Settings) -> dict:
    """Write the report; returns its manifest."""
    t0 = time.perf_counter()
    storage.check_readable(cfg.results)
    page, figures = build(cfg)
    storage.check_writable(cfg.output)
    for name, png in figures.items():
        storage.write_bytes(storage.join(cfg.output, schema.FIGURES_DIR, name), png)
    storage.write_bytes(storage.join(cfg.output, INDEX), page.encode())
    took = round(time.perf_counter() - t0, 3)
    manifest = {schema.M_KIND: "report", schema.M_SOURCE: {"results": cfg.results,
                                                           "model": cfg.model, "sweep": cfg.sweep},
                schema.M_FILES: [INDEX] + [f"{schema.FIGURES_DIR}/{n}" for n in figures],
                schema.M_TIMINGS: {"total_s": took}, schema.M_VERSIONS: schema.versions(),
                schema.M_CREATED: datetime.now(UTC).isoformat(timespec="seconds")}
    storage.write_manifest(cfg.output, manifest)
    log.info("report with %d figures in %.1f s: %s", len(figures), took,
             storage.join(cfg.output, INDEX))
    return manifest


def main(argv=None) -> None:
    def run_and_show(cfg: Settings) -> None:
        run(cfg)
        print(f"report: {storage.join(cfg.output, INDEX)}")

    cli.main(Settings, run_and_show, argv, __doc__)


if __name__ == "__main__":
    main()
