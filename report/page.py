"""The report's HTML pieces: numbers for people, tables that fit, images, pairs, the page.

    >>> number(3000), percent(0.0312), number(0.006911)      # '3,000', '3.1%', '0.00691'
    >>> table(rows, [("method", "method"), ("success_rate", "fooled", percent)])
    >>> render([Section("Results", "<p>...</p>")], "Fooling a linear classifier")

Everything is escaped here; images are embedded as data: URIs, so the page opens offline.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Callable
from dataclasses import dataclass

from attacks import figures
from common.templates import short_name

esc = html.escape
SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


@dataclass(frozen=True)
class Section:
    """One part of the page: a heading (its anchor from ``key``) and its HTML."""

    title: str
    body: str
    key: str = ""

    @property
    def anchor(self) -> str:
        return self.key or "".join(c if c.isalnum() else "-" for c in self.title.lower())


def number(v) -> str:
    """Integers with thousands separators, other numbers with three significant digits."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int) or abs(v) >= 100 or (float(v).is_integer() and v != 0):
        return f"{round(v):,}"
    if abs(v) >= 1e-3 or v == 0:
        return f"{v:.3g}"
    mantissa, exponent = f"{v:.2e}".split("e")
    return f"{float(mantissa):g}×10{str(int(exponent)).translate(SUPERSCRIPT)}"


def percent(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{100 * v:.3g}%" if v < 0.9995 or v == 1 else f"{100 * v:.2f}%"


def levels(v) -> str:
    """A distance in pixel levels (of 255)."""
    return number(v)


Column = tuple  # (key, header) or (key, header, format)


def table(rows: list[dict], columns: list[Column]) -> str:
    """An HTML table of the rows, one column per (key, header[, format]); numbers right-aligned."""
    first = rows[0] if rows else {}
    head = "".join(f'<th class="{"l" if isinstance(first.get(c[0]), str) else "n"}">'
                   f"{esc(c[1])}</th>" for c in columns)
    body = []
    for r in rows:
        cells = []
        for c in columns:
            fmt: Callable = c[2] if len(c) > 2 else number
            v = r.get(c[0])
            text = v if isinstance(v, str) else fmt(v)
            cells.append(f'<td class="{"l" if isinstance(v, str) else "n"}">{esc(text)}</td>')
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f'<table class="t"><tr>{head}</tr>{"".join(body)}</table>'


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def img(name: str, png: bytes, caption: str, link: str | None = None) -> str:
    """A figure with its caption; ``link`` (a file beside the page) opens the full-size file."""
    tag = f'<img alt="{esc(name)}" src="{data_uri(png)}">'
    more = f' <a href="{esc(link)}">Full size</a>.' if link else ""
    return f"<figure>{tag}<figcaption>{esc(caption)}{more}</figcaption></figure>"


def panel(pixels, shape, label: str) -> str:
    """One small image at its own pixels, shown enlarged without smoothing, captioned."""
    return (f'<div><img class="px" alt="" src="{data_uri(figures.png(pixels, shape))}">'
            f"<span>{esc(label)}</span></div>")


def compare(rows: list[list[dict]], names: list[str], shape) -> str:
    """One row per (image, target) pair: the original once, then each method's amplified change
    and fooling image (``rows[i]``: the pair's examples, one per method, in the same order)."""
    if not rows:
        return ""
    head = "<th>original</th>" + "".join(f'<th colspan="2">{esc(ex["method"])}</th>'
                                         for ex in rows[0])
    body = []
    for exs in rows:
        first = exs[0]
        cells = [panel(first["original"], shape, figures.labels(first, names)[0])]
        for ex in exs:
            _, change, fooled = figures.labels(ex, names)
            cells += [panel(figures.amplify(ex["original"], ex["stored"]), shape, change),
                      panel(ex["stored"], shape, fooled)]
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f'<table class="cmp"><tr>{head}</tr>{"".join(body)}</table>'


def pair(ex: dict, names: list[str], shape, note: str = "") -> str:
    """One (image, target) pair in the blog's layout: original | amplified change | fooling image,
    each captioned with the class name and probability, as small pixel-exact images."""
    panels = (ex["original"], figures.amplify(ex["original"], ex["stored"]), ex["stored"])
    cells = "".join(panel(p, shape, label) for p, label in zip(panels, figures.labels(ex, names)))
    title = f"{ex['image_id']} → {short_name(names[ex['target']])}"
    return (f'<div class="pair"><div class="panels">{cells}</div>'
            f'<div class="note">{esc(note or title)}</div></div>')


def pairs(examples: list[dict], names: list[str], shape) -> str:
    return ('<div class="pairs">' + "".join(pair(ex, names, shape) for ex in examples)
            + "</div>")


def details(summary: str, body: str) -> str:
    return f"<details><summary>{esc(summary)}</summary>{body}</details>"


STYLE = """
body{font-family:system-ui,sans-serif;max-width:1180px;margin:1.5em auto;padding:0 1em;color:#222;
 line-height:1.45}
h1{margin-bottom:.2em}h2{margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
.lead{font-size:1.15em}.headline{font-size:1.35em;background:#f3f6fb;border-left:4px solid #36c;
 padding:.6em 1em;margin:1em 0}
img{max-width:100%}figure{margin:1em 0}figcaption{color:#555;font-size:90%}
table.t{border-collapse:collapse;font-size:90%;margin:.8em 0}
table.t td,table.t th{border-bottom:1px solid #ddd;padding:3px 10px}
table.t th{background:#fafafa}th.n{text-align:right}th.l{text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}td.l{text-align:left}
.pairs{display:flex;flex-wrap:wrap;gap:18px 26px}.pair{width:360px}
.panels{display:flex;gap:6px}.panels div{width:116px;text-align:center;font-size:12px}
.panels span{display:block;line-height:1.2;margin-top:2px}
img.px{width:116px;height:116px;image-rendering:pixelated;display:block}
table.cmp{border-collapse:collapse}table.cmp td{vertical-align:top;padding:0 3px 10px 3px}
table.cmp th{font-size:13px;text-align:center;border-bottom:1px solid #ddd}
table.cmp td div{width:112px;text-align:center;font-size:12px}
table.cmp img.px{width:112px;height:112px}
.note{font-size:11px;color:#666;margin-top:2px}
.tgrid{display:flex;flex-wrap:wrap;gap:8px}.tgrid div{width:96px;text-align:center;font-size:11px}
.tgrid img{width:96px;height:96px;image-rendering:pixelated;display:block}
details{margin:1em 0}summary{cursor:pointer;font-weight:600}
pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:80%}
nav{font-size:90%;color:#555}nav a{margin-right:.8em}
"""


def render(sections: list[Section], title: str, lead: str) -> str:
    """The whole page: title, the lead (HTML), a table of contents, then the sections."""
    nav = "".join(f'<a href="#{s.anchor}">{esc(s.title)}</a>' for s in sections)
    body = "\n".join(f'<section id="{s.anchor}"><h2>{esc(s.title)}</h2>\n{s.body}</section>'
                     for s in sections)
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8>"
            f'<meta name="viewport" content="width=device-width"><title>{esc(title)}</title>'
            f"<style>{STYLE}</style></head><body><h1>{esc(title)}</h1>{lead}"
            f"<nav>{nav}</nav>\n{body}</body></html>")
