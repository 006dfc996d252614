"""The report's HTML pieces: numbers for people, tables that fit, images, pairs, the page.

    >>> number(3000), percent(0.0312), number(0.006911)      # '3,000', '3.12%', '0.00691'
    >>> table(rows, [("method", "method"), ("success_rate", "fooled", percent)])
    >>> levels.same([24, 35.5])                              # ['24.0', '35.5']: one precision
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
CHART_MIN = 0.6  # a chart is drawn no smaller than this share of its pixels: 10 pt stays ~9 px
PAGE_MARGIN = 40  # pixels of the screen's width around the page's content (STYLE's padding)
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


@dataclass(frozen=True)
class Measure:
    """Numbers of one kind (pixel levels, percentages, ratios). One value alone prints with three
    significant digits; the values of one table column or one sentence print with the same
    decimals, the most any of them needs (26.0 beside 26.2, never 26).

        >>> percent(0.998), levels.same([24, 35.5])      # '99.8%', ['24.0', '35.5']
    """

    scale: float = 1
    suffix: str = ""
    top: float | None = None  # a bound no smaller value may print as (99.97% is not 100%)

    def __call__(self, v) -> str:
        return self.same([v])[0]

    def same(self, values) -> list[str]:
        """The values as text, every finite one with the same decimals ('–' for none or NaN)."""
        xs = [None if _missing(v) else self.scale * float(v) for v in values]
        d = max((self._decimals(x) for x in xs if x is not None), default=0)
        return ["–" if x is None else f"{x:,.{d}f}{self.suffix}" for x in xs]

    def _decimals(self, x: float) -> int:
        """The fewest decimals that show ``x`` to three significant digits (at most MAX_DECIMALS),
        and keep a value below ``top`` below it."""
        if x == 0 or not math.isfinite(x):
            return 0
        d = min(MAX_DECIMALS, max(0, 2 - math.floor(math.log10(abs(x)))))
        while d > 0 and round(x, d - 1) == round(x, d):
            d -= 1
        while self.top is not None and x < self.top <= round(x, d) and d < MAX_DECIMALS:
            d += 1
        return d


MAX_DECIMALS = 3
levels = Measure()  # a distance in pixel levels (of 255)
percent = Measure(100, "%", top=100)
ratio = Measure()


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


Column = tuple  # (key, header) or (key, header, format)


def table(rows: list[dict], columns: list[Column]) -> str:
    """An HTML table of the rows, one column per (key, header[, format]); numbers right-aligned,
    a Measure's column with the same decimals throughout. It scrolls sideways in its own box
    where the screen is narrower than it."""
    first = rows[0] if rows else {}
    head = "".join(f'<th class="{"l" if isinstance(first.get(c[0]), str) else "n"}">'
                   f"{esc(c[1])}</th>" for c in columns)
    texts = [_column([r.get(c[0]) for r in rows], c[2] if len(c) > 2 else number)
             for c in columns]
    body = []
    for i, r in enumerate(rows):
        cells = [f'<td class="{"l" if isinstance(r.get(c[0]), str) else "n"}">'
                 f"{esc(texts[j][i])}</td>" for j, c in enumerate(columns)]
        body.append(f"<tr>{''.join(cells)}</tr>")
    return scroll(f'<table class="t"><tr>{head}</tr>{"".join(body)}</table>')


def _column(values: list, fmt: Callable) -> list[str]:
    """A column's cells as text: strings as they are, numbers by ``fmt`` (a Measure: together)."""
    numbers = [v for v in values if not isinstance(v, str)]
    shown = iter(fmt.same(numbers) if isinstance(fmt, Measure) else [fmt(v) for v in numbers])
    return [v if isinstance(v, str) else next(shown) for v in values]


def scroll(html_: str) -> str:
    """A box that scrolls sideways when its content is wider than the screen (tables, grids)."""
    return f'<div class="scroll">{html_}</div>'


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def png_width(png: bytes) -> int:
    """A PNG's width in pixels, from its header (IHDR)."""
    return int.from_bytes(png[16:20], "big")


def img(name: str, png: bytes, caption: str, link: str | None = None,
        narrow: bytes | None = None) -> str:
    """A figure with its caption; ``link`` (a file beside the page) opens the full-size file.
    A chart shrinks with the screen down to CHART_MIN of its own size, where its labels stay
    legible; on a narrower screen ``narrow`` (the same chart drawn for a phone) takes its place
    when given, else it scrolls sideways in its box. The caption wraps to the screen."""
    small = png_width(narrow or png)
    tag = (f'<img alt="{esc(name)}" style="min-width:{round(CHART_MIN * small)}px" '
           f'src="{data_uri(png)}">')
    if narrow:
        screen = round(CHART_MIN * png_width(png)) + PAGE_MARGIN
        tag = (f'<picture><source media="(max-width:{screen}px)" srcset="{data_uri(narrow)}">'
               f"{tag}</picture>")
    more = f' <a href="{esc(link)}">Full size</a>.' if link else ""
    return f"<figure>{scroll(tag)}<figcaption>{esc(caption)}{more}</figcaption></figure>"


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
    return scroll(f'<table class="cmp"><tr>{head}</tr>{"".join(body)}</table>')


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
 line-height:1.45;overflow-wrap:break-word}
h1{margin-bottom:.2em}h2{margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
.lead{font-size:1.15em}.headline{font-size:1.35em;background:#f3f6fb;border-left:4px solid #36c;
 padding:.6em 1em;margin:1em 0}
img{max-width:100%}figure{margin:1em 0}figcaption{color:#555;font-size:90%}
.scroll{overflow-x:auto;max-width:100%}.ends{display:flex;gap:0 2em;flex-wrap:wrap}
.ends>div{min-width:0;max-width:100%}table:not([class]){display:block;overflow-x:auto}
table.t{border-collapse:collapse;font-size:90%;margin:.8em 0}
table.t td,table.t th{border-bottom:1px solid #ddd;padding:3px 10px}
table.t th{background:#fafafa}th.n{text-align:right}th.l{text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}td.l{text-align:left}
.pairs{display:flex;flex-wrap:wrap;gap:18px 26px}.pair{width:360px;max-width:100%}
.panels{display:flex;gap:6px}.panels div{flex:0 1 116px;min-width:0;text-align:center;
 font-size:12px}
.panels span{display:block;line-height:1.2;margin-top:2px}
img.px{width:116px;height:auto;aspect-ratio:1;image-rendering:pixelated;display:block}
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
