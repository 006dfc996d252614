"""The accuracy/robustness frontier and the transfer matrix, drawn for the report: plain functions.

    >>> fig = frontier_figure(rows, templates)   # matplotlib Figure: top-1 vs median strength
    >>> html = transfer_matrix(rows)             # <table>: source model x scoring model

``rows`` are the frontier table's rows (attacks/frontier.py) or the transfer table's rows
(attacks/transfer.py); ``templates`` maps a model's URI to its templates.png bytes. No pyplot,
no Ray, no storage.
"""

from __future__ import annotations

import html
import io

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

THUMB = 240  # pixels across each point's templates thumbnail


def curves(rows: list[dict]) -> dict[str, list[dict]]:
    """{label: points in order}: "L2" (robust_eps 0, by reg) and "robust, reg=r" (by robust_eps,
    starting from the plain model of that reg when the sweep has it)."""
    out = {"L2": sorted((r for r in rows if r["robust_eps"] == 0), key=lambda r: r["reg"])}
    for reg in sorted({r["reg"] for r in rows if r["robust_eps"] > 0}):
        points = [r for r in rows if r["reg"] == reg]
        out[f"robust, reg={reg:g}"] = sorted(points, key=lambda r: r["robust_eps"])
    return {k: v for k, v in out.items() if v}


def _label(r: dict) -> str:
    return f"E={r['robust_eps']:g}" if r["robust_eps"] else f"reg={r['reg']:g}"


def _thumb(png: bytes) -> np.ndarray:
    im = Image.open(io.BytesIO(png)).convert("RGB")
    im.thumbnail((THUMB, THUMB))
    return np.asarray(im)


def frontier_figure(rows: list[dict], templates: dict[str, bytes] | None = None) -> Figure:
    """Validation top-1 against the median minimal fooling strength, one curve per objective,
    each point labelled with its setting; when given, each point's templates in a strip below,
    in the curves' order."""
    rows = [r for r in rows if r["median_linf"] is not None]  # None: nothing was fooled
    series = curves(rows)
    shown = [p for points in series.values() for p in points
             if (templates or {}).get(p["model"]) is not None]
    shown = list({p["model"]: p for p in shown}.values())  # a plain model starts two curves
    fig = Figure(figsize=(max(9.0, 1.4 * len(shown)), 8.5 if shown else 6))
    grid = fig.add_gridspec(2 if shown else 1, max(1, len(shown)),
                            height_ratios=[3, 1.1] if shown else [1])
    ax = fig.add_subplot(grid[0, :])
    styles = {"L2": ("o-", "tab:blue")}
    others = iter(["tab:red", "tab:green", "tab:purple", "tab:brown"])
    for name, points in series.items():
        marker, color = styles.get(name, ("s-", next(others, "black")))
        x = [p["median_linf"] for p in points]
        y = [100 * p["val_top1"] for p in points]
        ax.plot(x, y, marker, color=color, label=name)
        for p, xi, yi in zip(points, x, y):
            ax.annotate(_label(p), (xi, yi), textcoords="offset points", xytext=(5, -12),
                        fontsize=8, color=color)
    method = ", ".join(sorted({r["method"] for r in rows}))
    ax.set_xlabel(f"median minimal L-inf strength that fools ({method}, pixel levels)")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title("harder to fool vs accurate: L2 regularization against the robust objective")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    for i, p in enumerate(shown):
        thumb = fig.add_subplot(grid[1, i])
        thumb.imshow(_thumb(templates[p["model"]]))
        thumb.set_title(f"reg={p['reg']:g}, E={p['robust_eps']:g}\n{100 * p['val_top1']:.1f}%, "
                        f"{p['median_linf']:g}", fontsize=7)
        thumb.axis("off")
    return fig


def transfer_matrix(rows: list[dict], origin: str = "val") -> str:
    """A small HTML table per method: source model (rows) x scoring model (columns), each cell
    the fraction classified as the intended target (and moved off the original prediction)."""
    rows = [r for r in rows if r["origin"] == origin]
    out = []
    for method in sorted({r["method"] for r in rows}):
        sel = [r for r in rows if r["method"] == method]
        sources = sorted({r["source_model"] for r in sel})
        scorers = list(dict.fromkeys(r["scoring_model"] for r in sel))
        cell = {(r["source_model"], r["scoring_model"]): r for r in sel}
        head = "".join(f"<th>{html.escape(_short(s))}</th>" for s in scorers)
        lines = [f"<table><caption>{html.escape(method)}, {origin} images: to target "
                 "(moved off the original class)</caption>",
                 f"<tr><th>made for \\ scored by</th>{head}</tr>"]
        for s in sources:
            tds = []
            for c in scorers:
                r = cell.get((s, c))
                text = "" if r is None else f"{r['target_rate']:.1%} ({r['moved_rate']:.1%})"
                bold = r is not None and r["same_model"]
                tds.append(f"<td>{'<b>' if bold else ''}{text}{'</b>' if bold else ''}</td>")
            lines.append(f"<tr><th>{html.escape(_short(s))}</th>{''.join(tds)}</tr>")
        out.append("\n".join([*lines, "</table>"]))
    return "\n".join(out)


def _short(uri: str) -> str:
    """The last part of a model's URI (``reg=0.1_eps=8``), what tells the sweep's models apart."""
    return uri.rstrip("/").rsplit("/", 1)[-1]
