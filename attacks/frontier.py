"""The trade-off frontier of a sweep: attack every model, then accuracy against fooling strength.

    python -m attacks.frontier --sweeps out/sweep-l2,out/sweep-robust --output out/frontier
    python -m attacks.frontier --sweeps out/sweep --output out/frontier --methods sign,exact \\
        --limit-images 200 --use-gpu
    python -m attacks.frontier --sweeps out/sweep-l2,out/sweep-robust --harden out/harden \\
        --output out/frontier

For every model of the sweeps (training.sweep outputs on the same data) this runs the attack job
(attacks.fool; by default exact, the images kept for attacks.transfer) on its first
--limit-images validation images and every target, into ``<output>/attacks/<sweep
index>_<trial>/``; an attack already finished there is kept, an unfinished one resumes. Then it
writes ``frontier.parquet`` and ``frontier.md``: per model, its setting (reg, robust_eps),
validation top-1 and top-5 (from the sweep), and the median minimal L-inf strength that fools it
over the fooled pairs that had to move (``exact`` when it is among --methods: the true minimum;
else ``sign``), with the success rate, and with exact-l2 among --methods the median minimal L2
(``median_l2``, null without it) over the same pairs; ``frontier.png``: top-1 against that
L-inf median, one curve for L2 regularization and one per robust series, each point's templates
beside it; and last ``manifest.json``.

With --harden (outputs of the hardening job, which trains with a background class of fooling
images or retrains on them, on the same data, measured with exact on the same first
--limit-images validation images x every real target) each round joins the table as it is,
unattacked here: its ``series`` is its mode (``plain`` for round 0), one curve per mode from
round 0, beside L2 and the robust objective.
"""
# The code: the table's rows in attacks/tables.py (FrontierRow), the figure in report/models.py.

from __future__ import annotations

import io
import logging
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from attacks import summary, tables
from attacks.figures import to_png
from attacks.pairs import Pairs
from attacks.tables import FrontierRow
from common import cli, lifecycle, schema, storage
from common.errors import ConfigError
from common.sweep import HardenRow, SweepRow, read_harden, read_sweep

log = logging.getLogger(__name__)

TABLE = schema.FRONTIER_TABLE
ATTACKS_DIR = "attacks"
FIGURE = f"{TABLE}.png"


@dataclass(frozen=True)
class Settings:
    output: str = field(metadata={"help": "where to write the attacks and the table"})
    sweeps: tuple[str, ...] = field(default=(), metadata={
        "help": "training.sweep outputs on the same data"})
    harden: tuple[str, ...] = field(default=(), metadata={
        "help": "outputs of the hardening job (a background class, adversarial retraining) on "
                "the same data, measured with exact on as many images: their rounds join the "
                "table as they are, one series per mode"})
    methods: tuple[str, ...] = field(default=("exact",), metadata={
        "help": "attacks to run on each model; the median is exact's when given, else sign's"})
    limit_images: int = field(default=100, metadata={
        "help": "validation images attacked per model (x every target)"})
    keep_images: str = field(default="all", metadata={
        "help": "store the fooling images (all: what attacks.transfer scores); none saves space",
        "choices": ("all", "none")})
    use_gpu: bool = field(default=False, metadata={"help": "attack on GPUs (attacks.fool)"})
    num_workers: int | None = field(default=None, metadata={
        "help": "attack actors per model (default: one per CPU, or per GPU with --use-gpu)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing frontier"})

    RENAMED = {"workers": "num_workers"}  # the old name, refused in one line


def measured_method(methods: tuple[str, ...]) -> str:
    """The method whose median is the frontier's: the exact minimum where available."""
    for m in ("exact", "sign"):
        if m in methods:
            return m
    raise ConfigError(f"--methods must include sign or exact, got {','.join(methods)}")


@dataclass(frozen=True)
class Model:
    """A model of the sweeps: its sweep, its row there and the folder its attack goes to."""

    sweep: str
    row: SweepRow
    attack: str


def _models(cfg: Settings) -> tuple[str, list[Model], list[FrontierRow]]:
    """The sweeps' and harden outputs' common data, the sweeps' models and the harden rounds'
    rows."""
    given = (*cfg.sweeps, *cfg.harden)
    if not given or len(set(given)) != len(given) or cfg.limit_images < 1:
        raise ConfigError("--sweeps and --harden must list distinct outputs, at least one, and "
                          "--limit-images be positive")
    data, models, rounds = set(), [], []
    for i, sweep in enumerate(cfg.sweeps):
        data.add(storage.read_manifest(sweep, "sweep output")[schema.M_DATA])
        for r in read_sweep(sweep):
            name = f"{i}_{r.model.rstrip('/').rsplit('/', 1)[-1]}"
            models.append(Model(lifecycle.absolute(sweep), r, lifecycle.absolute(
                storage.join(cfg.output, ATTACKS_DIR, name))))
    for h in cfg.harden:
        m = storage.read_manifest(h, "harden output")
        data.add(m[schema.M_DATA])
        images = m.get(schema.M_CONFIG, {}).get("limit_images")
        if cfg.sweeps and measured_method(cfg.methods) != "exact" or images != cfg.limit_images:
            raise ConfigError(f"{h} measured exact on {images} validation images: the "
                              f"frontier's --methods must include exact and --limit-images be "
                              f"the same ({cfg.limit_images})")
        rounds += [harden_point(lifecycle.absolute(h), r) for r in read_harden(h)]
    if len(data) != 1:
        raise ConfigError(f"the sweeps and harden outputs were trained on different data: "
                          f"{', '.join(sorted(data))}")
    return data.pop(), models, rounds


def _attack(cfg: Settings, data: str, model: Model) -> None:
    """Run the attack on one model, unless it finished before."""
    from attacks import fool
    if storage.exists(storage.join(model.attack, storage.MANIFEST)):
        return
    fool.run(fool.Settings(data=data, model=model.row.model, output=model.attack,
                           methods=cfg.methods, limit_images=cfg.limit_images,
                           keep_images=cfg.keep_images, use_gpu=cfg.use_gpu,
                           num_workers=cfg.num_workers))


def point(model: Model, method: str) -> FrontierRow:
    """One frontier row from a sweep row and its attack's methods summary (validation images)."""
    table = summary.read_summary(model.attack)["methods"].to_pylist()
    s = next(t for t in table if t[schema.METHOD] == method and t[schema.ORIGIN] == "val")
    median = s[schema.quantile_column(schema.LINF, 0.5)]
    median_l2 = None
    if any(t[schema.METHOD] == "exact-l2" for t in table):
        median_l2 = summary.moved_median(Pairs.open(model.attack), "exact-l2", schema.L2)
    r = model.row
    return FrontierRow(sweep=model.sweep, reg=r.reg, robust_eps=r.robust_eps,
                       val_top1=r.val_top1, val_top5=r.val_top5, method=method,
                       median_linf=median if math.isfinite(median) else None,  # None: none fooled
                       success_rate=s[schema.S_SUCCESS_RATE], pairs=s[schema.S_PAIRS],
                       model=r.model, attack=model.attack, median_l2=median_l2)


def harden_point(harden: str, r: HardenRow) -> FrontierRow:
    """One frontier row from a round of a harden output (exact, as harden measured it)."""
    return FrontierRow(sweep=harden, reg=r.reg, robust_eps=0.0, val_top1=r.val_top1,
                       val_top5=r.val_top5, method="exact", median_linf=r.median_linf,
                       success_rate=r.success_rate, pairs=r.pairs, model=r.model, attack=harden,
                       series=r.mode, round=r.round)


def templates(rows: list[FrontierRow]) -> dict[str, bytes]:
    """Each row's model's templates.png, by the model's URI."""
    return {r.model: storage.read_bytes(storage.join(r.model, schema.TEMPLATES_FILE))
            for r in rows}


THUMB = 240  # pixels across each point's templates thumbnail


HARDENED = (schema.HARDEN_PLAIN, *schema.HARDEN_MODES)  # the series of harden rounds


def curves(rows: list[FrontierRow]) -> dict[str, list[FrontierRow]]:
    """{label: points in order}: "L2" (robust_eps 0, by reg) and "robust, reg=r" (by robust_eps,
    starting from the plain model of that reg when the sweep has it), from the sweeps' rows;
    one per mode of each harden output ("background", "adversarial"; with their output's number
    when there are several), by round from its round 0."""
    swept = [r for r in rows if r.series not in HARDENED]
    out = {"L2": sorted((r for r in swept if r.robust_eps == 0), key=lambda r: r.reg)}
    for reg in sorted({r.reg for r in swept if r.robust_eps > 0}):
        points = [r for r in swept if r.reg == reg]
        out[f"robust, reg={reg:g}"] = sorted(points, key=lambda r: r.robust_eps)
    hardened = list(dict.fromkeys(r.sweep for r in rows if r.series in HARDENED))
    for i, h in enumerate(hardened):
        mine = [r for r in rows if r.sweep == h and r.series in HARDENED]
        for mode in schema.HARDEN_MODES:
            points = [r for r in mine if r.series in (schema.HARDEN_PLAIN, mode)]
            if any(r.series == mode for r in points):
                label = mode + (f", {i}" if len(hardened) > 1 else "")
                out[label] = sorted(points, key=lambda r: r.round)
    return {k: v for k, v in out.items() if v}


def _label(r: FrontierRow) -> str:
    if r.series in HARDENED:
        return f"r={r.round}"
    return f"E={r.robust_eps:g}" if r.robust_eps else f"reg={r.reg:g}"


def _thumb(png: bytes) -> np.ndarray:
    im = Image.open(io.BytesIO(png)).convert("RGB")
    im.thumbnail((THUMB, THUMB))
    return np.asarray(im)


def frontier_figure(rows: list[FrontierRow], templates: dict[str, bytes] | None = None
                    ) -> Figure:
    """Validation top-1 against the median minimal fooling strength, one curve per objective,
    each point labelled with its setting; when given, each point's templates in a strip below,
    in the curves' order."""
    rows = [r for r in rows if r.median_linf is not None]  # None: nothing was fooled
    series = curves(rows)
    shown = [p for points in series.values() for p in points
             if (templates or {}).get(p.model) is not None]
    shown = list({p.model: p for p in shown}.values())  # a plain model starts two curves
    fig = Figure(figsize=(max(9.0, 1.4 * len(shown)), 8.5 if shown else 6), layout="constrained")
    grid = fig.add_gridspec(2 if shown else 1, max(1, len(shown)),
                            height_ratios=[3, 1.1] if shown else [1])
    ax = fig.add_subplot(grid[0, :])
    styles = {"L2": ("o-", "tab:blue"), "background": ("^-", "tab:orange"),
              "adversarial": ("v-", "tab:gray")}
    others = iter(["tab:red", "tab:green", "tab:purple", "tab:brown"])
    for name, points in series.items():
        marker, color = styles.get(name.split(",")[0], None) or ("s-", next(others, "black"))
        x = [p.median_linf for p in points]
        y = [100 * p.val_top1 for p in points]
        ax.plot(x, y, marker, color=color, label=name)
        for p, xi, yi in zip(points, x, y):
            ax.annotate(_label(p), (xi, yi), textcoords="offset points", xytext=(5, -12),
                        fontsize=8, color=color)
    method = ", ".join(sorted({r.method for r in rows}))
    ax.set_xlabel(f"median minimal L-inf strength that fools ({method}, pixel levels)")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title("harder to fool vs accurate: L2 regularization against the robust objective"
                 + (",\na background class of fooling images, and retraining on them"
                    if any(r.series in HARDENED for r in rows) else ""))
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    for i, p in enumerate(shown):
        thumb = fig.add_subplot(grid[1, i])
        thumb.imshow(_thumb(templates[p.model]))
        setting = (f"{p.series} r={p.round}" if p.series in HARDENED
                   else f"reg={p.reg:g}, E={p.robust_eps:g}")
        thumb.set_title(f"{setting}\n{100 * p.val_top1:.1f}%, {p.median_linf:g}", fontsize=7)
        thumb.axis("off")
    return fig


def output(cfg: Settings) -> lifecycle.Output:
    inputs = {**{f"sweep {i}": s for i, s in enumerate(cfg.sweeps)},
              **{f"harden output {i}": h for i, h in enumerate(cfg.harden)}}
    given = {"sweeps": [lifecycle.input_identity(s) for s in cfg.sweeps]}
    if cfg.harden:  # a frontier of sweeps alone keeps the identity it had before --harden
        given["harden"] = [lifecycle.input_identity(h) for h in cfg.harden]
    return lifecycle.Output(
        cfg.output, "frontier", owns=(ATTACKS_DIR, f"{TABLE}.parquet", f"{TABLE}.md", FIGURE),
        inputs=inputs,
        identity={"inputs": given,
                  "settings": {"methods": list(cfg.methods), "limit_images": cfg.limit_images,
                               "keep_images": cfg.keep_images}})


def run(cfg: Settings) -> dict:
    """Attack every model of the sweeps, then write the table and the figure."""
    t0 = time.perf_counter()
    method = measured_method(cfg.methods)
    data, models, rounds = _models(cfg)
    out = output(cfg)
    out.prepare(cfg.overwrite)
    rows = []
    for model in models:
        _attack(cfg, data, model)
        rows.append(point(model, method))
    rows += rounds
    files = tables.write_frontier(cfg.output, rows)
    storage.write_bytes(storage.join(cfg.output, FIGURE),
                        to_png(frontier_figure(rows, templates(rows))))
    manifest = out.finish({
        schema.M_KIND: "frontier", schema.M_DATA: lifecycle.absolute(data),
        "rows": [asdict(r) for r in rows], schema.M_FILES: [*files, {"path": FIGURE}],
        **schema.stamp(asdict(cfg), {"total_s": round(time.perf_counter() - t0, 3)})})
    log.info("frontier of %d models written to %s:\n%s", len(rows), cfg.output,
             tables.frontier_markdown(rows))
    return manifest


def main(argv=None) -> None:
    cli.main(Settings, run, argv, __doc__)


if __name__ == "__main__":
    main()
