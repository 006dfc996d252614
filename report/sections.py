"""The report's sections, in order: each a function of the run's facts that returns its parts.

    >>> f = Facts(results, manifest, frames, model, names)
    >>> parts = [s for builder in SECTIONS for s in builder(f)]   # page.Section each
    >>> f.files                                  # the PNGs the sections link: figures/<name>

A new part of the page is one more function in SECTIONS; one with nothing to show returns [].
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from attacks import figures
from attacks.pairs import Pairs, kept_ids
from attacks.tables import read_frontier
from common import schema, storage
from common.errors import ConfigError
from common.model import Model, read_model
from common.sweep import read_sweep
from common.templates import render as render_templates
from common.templates import short_name, to_images
from report import charts, examples, models, page, story
from report.confident import gallery as confident_gallery

SAMPLE_MARK = "sample.json"  # pipelines.sample writes it beside the images it makes
TEMPLATES_SHOWN = 48  # templates drawn inline; all of them are in figures/templates.png
GALLERY = 6  # pairs in each gallery (the smallest changes, the most confident images)
COMPARED = 3  # pairs shown under every method
ORIGIN_NAMES = {"val": "validation", "noise": "noise starts"}
Q50, Q90 = (schema.quantile_column(schema.LINF, q) for q in (0.5, 0.9))


@dataclass
class Facts:
    """What the sections draw from; they add the files they link to ``files``."""

    results: str  # the attack output
    manifest: dict  # its manifest
    frames: dict[str, pd.DataFrame]  # its summary tables
    model: Model
    names: list[str]  # a name per class (the WNID where the data has none)
    top: int = 8  # classes in the easiest and hardest lists
    sweep: str | None = None  # a training.sweep output
    frontier: str | None = None  # an attacks.frontier output
    transfer: tuple[str, ...] = ()  # attacks.transfer outputs
    confident: str | None = None  # an attack output run with --confidence, same model
    files: dict[str, bytes] = field(default_factory=dict)  # figures/<name> -> PNG

    @functools.cached_property
    def pairs(self) -> Pairs:
        """The pairs, as the manifest lists them (checked by summary.read_summary)."""
        return Pairs(self.results, self.manifest[schema.M_FILES])

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.manifest[schema.M_IMAGE_SHAPE])

    @property
    def method(self) -> str:
        return story.headline_method(self.manifest[schema.M_COUNTS]["methods"])

    @property
    def kept(self) -> bool:
        return (self.manifest.get(schema.M_IDENTITY, {}).get("settings", {})
                .get("keep_images", "all") != "none")

    @functools.cached_property
    def kept_ids(self) -> set[str] | None:
        """The images whose pairs hold their fooling image (None: all of them)."""
        return kept_ids(self.manifest)

    def figure(self, name: str, png: bytes, caption: str, narrow: bytes | None = None) -> str:
        """The chart on the page (``narrow``: drawn for a phone too) and as figures/<name>."""
        self.files[name] = png
        return page.img(name, png, caption, narrow=narrow)

    def name(self, k: int) -> str:
        return short_name(self.names[k])


def template_grid(W: np.ndarray, shape, names: list[str], shown: int) -> str:
    """Up to ``shown`` classes' templates (spread over the classes), each its own small image."""
    ks = examples.spread(range(len(W)), shown)
    pics = to_images(W[ks], shape)
    return '<div class="tgrid">' + "".join(
        f'<div><img alt="" src="{page.data_uri(figures.png(p, shape))}">'
        f"{page.esc(short_name(names[k]))}</div>" for k, p in zip(ks, pics)) + "</div>"


def full_templates(uri: str, W: np.ndarray, shape, names: list[str]) -> bytes:
    """The model's own templates.png (training wrote it), drawn here when it has none."""
    try:
        return storage.read_bytes(storage.join(uri, schema.TEMPLATES_FILE))
    except FileNotFoundError:
        return render_templates(W, shape, names)


def _data(f: Facts) -> tuple[dict | None, str | None]:
    """The ingest manifest the attack read, and the kind of pipelines.sample's output it is
    ("photos", "shapes"; None when it is not the sample)."""
    uri = f.manifest[schema.M_SOURCE]["data"]
    try:
        ingest = storage.read_manifest(uri, "ingest output")
    except (ConfigError, OSError):
        return None, None
    source = str(ingest.get(schema.M_SOURCE) or "")
    if not source:
        return ingest, None
    try:
        info = json.loads(storage.read_bytes(storage.join(source, SAMPLE_MARK)))
    except (OSError, ValueError):
        return ingest, None
    return ingest, info.get("kind", "shapes")  # samples before --kind were all shapes


def about(f: Facts) -> list[page.Section]:
    ingest, sample_kind = _data(f)
    full = f"{schema.FIGURES_DIR}/{schema.TEMPLATES_FILE}"
    f.files[schema.TEMPLATES_FILE] = full_templates(f.model.uri, f.model.W, f.shape, f.names)
    C = f.model.C
    shown = "all" if C <= TEMPLATES_SHOWN else f"{TEMPLATES_SHOWN} of the {page.number(C)}"
    body = (story.data_text(ingest, sample_kind, f.manifest[schema.M_SOURCE]["data"])
            + story.model_text(f.model.manifest, C, f.model.D)
            + f"<p>The templates: each class's weights W[c] drawn as an image, stretched to "
              f"0..255 ({shown} classes; <a href=\"{full}\">all, full size</a>).</p>"
            + template_grid(f.model.W, f.shape, f.names, TEMPLATES_SHOWN))
    return [page.Section("The model and its data", body, "model")]


def methods(f: Facts) -> list[page.Section]:
    order = {m: k for k, m in enumerate(schema.METHODS)}
    rows = sorted(f.frames["methods"].to_dict("records"),
                  key=lambda r: (r[schema.ORIGIN] != "val", order.get(r[schema.METHOD], 9)))
    rows = [{**r, "images": ORIGIN_NAMES.get(r[schema.ORIGIN], r[schema.ORIGIN])} for r in rows]
    cols = [(schema.METHOD, "method"), ("images", "images"), (schema.S_PAIRS, "pairs"),
            (schema.S_SUCCESS_RATE, "fooled", page.percent),
            (Q50, "median L-inf", page.levels), (Q90, "90% L-inf", page.levels),
            (schema.S_L2_MEAN, "mean L2", page.levels)]
    body = (story.methods_text(f.manifest[schema.M_COUNTS]["methods"]) + page.table(rows, cols)
            + f"<p>L-inf and L2 over the fooled pairs that had to move ({story.HAD_TO_MOVE}).</p>")
    return [page.Section("The methods", body, "methods")]


def budget(f: Facts) -> list[page.Section]:
    png, narrow = (charts.budget_curves(f.frames["budget"], n) for n in (False, True))
    return [page.Section("Success against the L-inf budget", f.figure(
        "budget.png", png, "Fraction of all (image, target) pairs fooled within each L-inf "
        "budget; dashed: the certified bound, which no attack can beat.", narrow)
        + story.HOW_TO_READ, "budget")]


def budget_l2(f: Facts) -> list[page.Section]:
    """Success against the L2 budget, when exact-l2 ran (the summary's budget_l2 table; outputs
    written before it have none)."""
    frame = f.frames.get("budget_l2")
    if frame is None or "exact-l2" not in f.manifest[schema.M_COUNTS]["methods"]:
        return []
    png, narrow = (charts.budget_curves(frame, n, "L2") for n in (False, True))
    return [page.Section("Success against the L2 budget", f.figure(
        "budget_l2.png", png, "Fraction of all (image, target) pairs fooled within each L2 "
        "budget; dashed: exact-l2's certified bound, which no attack can beat.", narrow)
        + story.HOW_TO_READ_L2, "budget-l2")]


HOW_TO_SEE = ("<p>Each pair: the original with the model's class and probability, the change "
              "amplified to the full grey range (mid-grey: no change; its L-inf and, in "
              "brackets, how much it is amplified), and the fooling image with the target's "
              "probability.</p>")


def galleries(f: Facts) -> list[page.Section]:
    """The fooling images: the same pairs under every method, the smallest changes and the most
    confident images of the headline method, and the noise starts."""
    sheets = _sheet_files(f.results, f.manifest)
    f.files.update(sheets)
    sampled = "" if f.kept_ids is None else (
        f"<p>The attack stored the fooling images of the pairs of its first "
        f"{page.number(f.manifest[schema.M_IDENTITY]['settings']['sample_images'])} validation "
        "images and of its noise starts (<code>--keep-images sample</code>): the galleries "
        "draw from those, the tables and curves from every pair.</p>")
    links = sampled + "<p>Contact sheets of the attack job: " + ", ".join(
        f'<a href="{schema.FIGURES_DIR}/{page.esc(k)}">{page.esc(k)}</a>' for k in sheets) + ".</p>"
    if not f.kept:
        return [page.Section("Fooling images", "<p>This attack was run with --keep-images none: "
                             "only its own contact sheets show images.</p>" + links, "images")]
    targets = f.manifest[schema.M_IDENTITY]["settings"]["targets"]
    picks = examples.extremes(f.pairs, f.method, targets, GALLERY, kept=f.kept_ids)
    out = _compare(f, examples.distinct_targets(picks["confident"], COMPARED))
    for key, title, text in (
            ("smallest", "The smallest changes", "the pairs fooled with the least L-inf change"),
            ("confident", "The most confident fooling images",
             "the fooling images the model is surest of")):
        out.append(page.Section(title, f"<p>{story.method_name(f.method).capitalize()}: {text} "
                                f"(from up to {examples.SCAN_TARGETS} targets).</p>"
                                + _pairs(f, picks[key]), key))
    if f.manifest[schema.M_COUNTS].get("noise_images"):
        noise = examples.extremes(f.pairs, f.method, targets, 4, "noise",
                                  f.kept_ids)["confident"]
        out.append(page.Section("Starting from random noise", "<p>The same attack from images "
                                "of uniform noise, pushed until the model is confident.</p>"
                                + _pairs(f, noise), "noise"))
    first, last = out[0], out[-1]
    out[0] = page.Section(first.title, HOW_TO_SEE + first.body, first.key)
    out[-1] = page.Section(last.title, out[-1].body + links, last.key)
    return out


def _pairs(f: Facts, picks: list[tuple]) -> str:
    exs = examples.examples_of(examples.stored_rows(f.pairs, picks), f.manifest, f.model)
    return page.pairs(exs, f.names, f.shape)


def _compare(f: Facts, chosen: list[tuple]) -> list[page.Section]:
    """A few pairs under every method of the run, side by side (none with one method)."""
    run_methods = f.manifest[schema.M_COUNTS]["methods"]
    if not chosen or len(run_methods) < 2:
        return []
    rows = examples.stored_rows(f.pairs, [(i, t, m) for i, t, _ in chosen for m in run_methods])
    exs = examples.examples_of(rows, f.manifest, f.model)
    grouped = [exs[k:k + len(run_methods)] for k in range(0, len(exs), len(run_methods))]
    return [page.Section("Every method on the same pairs",
                         page.compare(grouped, f.names, f.shape), "compare")]


def strength(f: Facts) -> list[page.Section]:
    png, narrow = (charts.strength_histograms(f.frames["strength"], n) for n in (False, True))
    return [page.Section("How much it takes", f.figure(
        "strength.png", png,
        "How many fooled pairs needed each strength (the method's step size, in pixel levels).",
        narrow), "strength")]


def classes(f: Facts) -> list[page.Section]:
    """Which targets are easy to reach, and which source classes resist."""
    out = []
    for frame_name, key, value, title, cols in (
            ("targets", schema.TARGET, Q50, "Targets: easiest and hardest to fool into",
             [("class", "target"), (schema.S_SUCCESS_RATE, "fooled", page.percent),
              (Q50, "median L-inf", page.levels), (schema.S_L2_MEAN, "mean L2", page.levels),
              (schema.S_BOUND_LINF_MEDIAN, "median bound", page.levels),
              (schema.S_LINF_RATIO_MEDIAN, "L-inf / bound", page.ratio)]),
            ("sources", schema.LABEL, schema.S_LINF_MEAN, "Source classes that resist",
             [("class", "true class"), (schema.S_PAIRS, "pairs"),
              (schema.S_SUCCESS_RATE, "fooled", page.percent),
              (schema.S_LINF_MEAN, "mean L-inf", page.levels)])):
        frame = f.frames[frame_name]
        frame = frame[frame[schema.ORIGIN] == "val"]
        if frame.empty:
            continue
        png, narrow = (charts.ranked_bars(frame, key, value, f.names, title, f.top, n)
                       for n in (False, True))
        mine = frame[frame[schema.METHOD] == f.method]
        mine = mine.assign(**{"class": [f.name(k) for k in mine[key]]})
        tables = "".join(
            f"<div><b>{label}</b>{page.table(part.to_dict('records'), cols)}</div>"
            for label, part in zip(("easiest", "hardest"), charts.ends(mine, value, f.top))
            if len(part))
        out.append(page.Section(title, f.figure(f"{frame_name}.png", png, (
            f"By the L-inf needed ({'median' if value == Q50 else 'mean'} over the fooled "
            "validation pairs that had to move), per method."), narrow) + f"<p>"
            f"{story.method_name(f.method).capitalize()}:</p><div class=\"ends\">{tables}</div>",
            frame_name))
    return out


# The sweep's table on the page: (header, the row's value[, format]).
SWEEP_SHOWN: list[tuple] = [
    ("reg", lambda r: r.reg), ("robust ε", lambda r: r.robust_eps),
    ("val top-1", lambda r: r.val_top1, page.percent),
    ("val top-5", lambda r: r.val_top5, page.percent),
    ("median sign eps", lambda r: r.median_sign_eps), ("‖W‖", lambda r: r.w_pixels_norm),
    ("epochs", lambda r: r.epochs)]


def sweep(f: Facts) -> list[page.Section]:
    """Each trained setting's accuracy, strength and templates; the L2 curve over the trainings
    without a robust radius (the frontier, attacks.frontier, sets both objectives side by side)."""
    if not f.sweep:
        return []
    rows = sorted(read_sweep(f.sweep), key=lambda r: (r.robust_eps, r.reg))
    grids = []
    for r in rows:
        m, reg, eps = read_model(r.model), r.reg, r.robust_eps
        setting = f"reg={reg:g}" + (f"_eps={eps:g}" if eps else "")
        name = f"templates_{setting}.png"
        f.files[name] = full_templates(r.model, m.W, f.shape, f.names)
        label = f"reg = {page.number(reg)}" + (f", robust ε = {page.number(eps)}" if eps else "")
        grids.append(f'<p>{label} (<a href="{schema.FIGURES_DIR}/{name}">all templates</a>)</p>'
                     + template_grid(m.W, f.shape, f.names, 12))
    records = [{head: value(r) for head, value, *_ in SWEEP_SHOWN} for r in rows]
    cols = [(head, head, *fmt) for head, _, *fmt in SWEEP_SHOWN]
    l2 = pd.DataFrame([asdict(r) for r in rows if r.robust_eps == 0])  # charts.tradeoff's frame
    chart = f.figure("tradeoff.png", charts.tradeoff(l2), "Stronger L2: lower accuracy, and "
                     "larger steps needed to fool (sign method, median over the first validation "
                     "images and all targets, measured by the sweep job).") if len(l2) else ""
    body = chart + page.table(records, cols) + "".join(grids)
    return [page.Section("The regularization trade-off", body, "tradeoff")]


def tradeoff(f: Facts) -> list[page.Section]:
    """The frontier (accuracy against fooling strength), the same pairs under each of its
    models, and the transfer matrix, when given."""
    parts, files = models.model_sections(f.frontier, f.transfer, page.img)
    f.files.update(files)
    out = [page.Section(title, body) for title, body in parts]
    grid = models.same_pairs(read_frontier(f.frontier), f.names, f.shape) if f.frontier else ""
    if grid:
        out.insert(1, page.Section("The same pairs under each model", (
            "<p>Each model's own smallest fooling image of the same pairs (the original as the "
            "first model sees it): the stronger the regularization, the larger the change it "
            "takes, and the smoother it looks.</p>") + grid, "same-pairs"))
    return out


def confident(f: Facts) -> list[page.Section]:
    """Fooling images at the confidence of an attack run with --confidence, when given."""
    if not f.confident:
        return []
    title, body = confident_gallery(f.confident, f.manifest, f.names, GALLERY)
    return [page.Section(title, body, "confident-99")]


def the_run(f: Facts) -> list[page.Section]:
    m = f.manifest
    info = {"results": f.results, "model": f.model.uri,
            **{k: m.get(k) for k in (schema.M_COUNTS, schema.M_CONFIG, schema.M_TIMINGS,
                                     schema.M_VERSIONS, schema.M_CREATED)},
            "model_config": f.model.manifest.get(schema.M_CONFIG),
            "model_final": f.model.manifest.get(schema.M_FINAL)}
    c = m[schema.M_COUNTS]
    text = (f"<p>{page.number(c['pairs'])} pairs: {page.number(c['val_images'])} validation and "
            f"{page.number(c['noise_images'])} noise images × {page.number(c['targets'])} targets "
            f"× {len(c['methods'])} methods, in {page.number(m[schema.M_TIMINGS]['total_s'])} s."
            "</p>")
    return [page.Section("The run", text + page.details(
        "Configuration, versions and timings", f"<pre>{page.esc(json.dumps(info, indent=1))}"
        "</pre>"), "run")]


# The page, in order: each builder returns its sections (none when it has nothing to show).
SECTIONS: list[Callable[[Facts], list[page.Section]]] = [
    about, methods, budget, budget_l2, galleries, confident, strength, classes, sweep, tradeoff,
    the_run]


def _sheet_files(results: str, manifest: dict) -> dict[str, bytes]:
    """The attack job's contact sheets (original | amplified perturbation | fooling image)."""
    rels = [f["path"] for f in manifest[schema.M_FILES]
            if f["path"].startswith(f"{schema.FIGURES_DIR}/") and f["path"].endswith(".png")]
    return {rel.split("/")[-1]: storage.read_bytes(storage.join(results, rel)) for rel in rels}


