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
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

import pandas as pd

from attacks import charts, frontier, summary
from common import cli, lifecycle, schema, storage
from common.errors import ConfigError
from common.model import Model, read_model
from common.sweep import read_sweep

log = logging.getLogger(__name__)

INDEX = "index.html"


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
    top: int = field(default=8, metadata={"help": "classes shown as easiest and hardest"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing report"})


def summary_frames(results: str) -> dict[str, pd.DataFrame]:
    return {k: t.to_pandas() for k, t in summary.read_summary(results).items()}


def sweep_frame(sweep: str, shape, names: list[str]) -> tuple[pd.DataFrame, dict[str, bytes]]:
    """The sweep's table (its job measured the median sign strength of each model) and each
    model's templates."""
    from training.templates import render as render_templates

    frame = read_sweep(sweep).to_pandas().sort_values("reg")
    templates = {f"reg={reg:g}": render_templates(read_model(uri).W, tuple(shape), names)
                 for reg, uri in zip(frame["reg"], frame["model"])}
    return frame, templates


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


def _model_parts(model: Model, names: list[str], shape) -> tuple[list, dict]:
    """The templates figure (drawn from weights.npz) and the model's final metrics."""
    from training.templates import render as render_templates

    final = model.manifest.get(schema.M_FINAL) or {}
    acc = pd.DataFrame([{"metric": k, "value": v} for k, v in final.items()])
    png = render_templates(model.W, tuple(shape), names)
    caption = (f"Every class's weights W[c] as an image, stretched to 0..255 ({len(names)} "
               "classes): the templates that the fooling steps add.")
    return [("The classifier's templates", img("templates", png, caption)
             + (table_html(acc) if len(acc) else ""))], {"templates.png": png}


def _attack_model(cfg: Settings, m: dict) -> Model:
    """The model the attack used: --model must be that one (the weights' sha256 is checked)."""
    uri = cfg.model or m[schema.M_SOURCE]["model"]
    model = read_model(uri)
    used = m[schema.M_SOURCE].get("model_sha256")
    if model.sha256 != used:
        raise ConfigError(f"{uri} is not the model the attack {cfg.results} used (weights sha256 "
                          f"{model.sha256[:12]}, the attack's {str(used)[:12]})")
    return model


def _figure_files(results: str, manifest: dict) -> dict[str, bytes]:
    """The attack job's contact sheets (original | amplified perturbation | fooling image)."""
    rels = [f["path"] for f in manifest[schema.M_FILES]
            if f["path"].startswith(f"{schema.FIGURES_DIR}/") and f["path"].endswith(".png")]
    return {rel.split("/")[-1]: storage.read_bytes(storage.join(results, rel)) for rel in rels}


def build(cfg: Settings) -> tuple[str, dict[str, bytes]]:
    """The page's HTML and its figures (name -> PNG bytes)."""
    frames = summary_frames(cfg.results)  # refuses anything but a complete attack output
    m = storage.read_manifest(cfg.results, "attack output")
    names = m.get(schema.M_CLASS_NAMES) or m[schema.M_CLASSES]
    figures: dict[str, bytes] = {}
    sections: list[tuple[str, str]] = []
    parts, files = _model_parts(_attack_model(cfg, m), names, m[schema.M_IMAGE_SHAPE])
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
        sweep, templates = sweep_frame(cfg.sweep, m[schema.M_IMAGE_SHAPE], names)
        figures["tradeoff.png"] = charts.tradeoff(sweep)
        figures.update({f"templates_{k}.png": v for k, v in templates.items()})
        sections.append(("The regularization trade-off", img(
            "tradeoff", figures["tradeoff.png"], "Stronger L2: lower accuracy, and larger steps "
            "needed to fool (sign method, median over the first validation images and all "
            "targets, measured by the sweep job).")
            + table_html(sweep.drop(columns=["model"]))
            + "".join(img(k, v, f"templates at {k}") for k, v in templates.items())))
    extra, files = frontier.report_parts(cfg.frontier, cfg.transfer, img)
    sections += extra
    figures.update(files)
    run_info = {k: m.get(k) for k in (schema.M_COUNTS, schema.M_CONFIG, schema.M_TIMINGS,
                                      schema.M_VERSIONS, schema.M_CREATED)}
    sections.append(("The run", f"<pre>{html.escape(json.dumps(run_info, indent=1))}</pre>"))
    return render(sections, f"Fooling a linear classifier: {cfg.results}"), figures


def output(cfg: Settings) -> lifecycle.Output:
    """The report's lifecycle: it owns its page and figures, and reads the outputs it shows."""
    inputs = {"results": cfg.results, "model": cfg.model, "sweep": cfg.sweep,
              "frontier": cfg.frontier, **{f"transfer {i}": t for i, t in enumerate(cfg.transfer)}}
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
                schema.M_CONFIG: asdict(cfg),
                schema.M_TIMINGS: {"total_s": took}, schema.M_VERSIONS: schema.versions(),
                schema.M_CREATED: datetime.now(UTC).isoformat(timespec="seconds")}
    manifest = out.finish(manifest)
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
