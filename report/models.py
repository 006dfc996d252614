"""The report's comparison of models: the frontier's section and the transfer matrix.

    >>> sections, figures = model_sections(frontier_uri, transfer_uris, page.img)
    >>> html = transfer_matrix(rows)             # <table>: source model x scoring model

``rows`` are the transfer table's rows (attacks/tables.py, ``TransferRow``); the frontier's figure
is the one its job draws (attacks/frontier.py).
"""

from __future__ import annotations

import html

from attacks import frontier, tables
from attacks.figures import to_png
from attacks.tables import TransferRow


def model_sections(frontier_uri: str | None, transfers: tuple[str, ...], img
                 ) -> tuple[list[tuple[str, str]], dict[str, bytes]]:
    """The report's sections for a frontier output and transfer outputs: (title, HTML) pairs and
    the figures (name -> PNG); ``img(name, png, caption)`` is the report's embedded figure."""
    sections, figures = [], {}
    if frontier_uri:
        rows = tables.read_frontier(frontier_uri)
        figures[frontier.FIGURE] = to_png(frontier.frontier_figure(rows, frontier.templates(rows)))
        caption = ("Validation top-1 against the median minimal L-inf strength that fools each "
                   "model (fooled pairs that had to move, validation images): L2 regularization "
                   "against the robust objective, each point's templates beside it.")
        table = "<pre>" + tables.frontier_markdown(rows) + "</pre>"
        sections.append(("The frontier: regularize or change the objective",
                         img("frontier", figures[frontier.FIGURE], caption) + table))
    if transfers:
        rows = [r for t in transfers for r in tables.read_transfer(t)]
        sections.append(("Do fooling images transfer?", transfer_matrix(rows)))
    return sections, figures


def transfer_matrix(rows: list[TransferRow], origin: str = "val") -> str:
    """A small HTML table per method: source model (rows) x scoring model (columns), each cell
    the fraction classified as the intended target (and moved off the original prediction)."""
    rows = [r for r in rows if r.origin == origin]
    out = []
    for method in sorted({r.method for r in rows}):
        sel = [r for r in rows if r.method == method]
        sources = sorted({r.source_model for r in sel})
        scorers = list(dict.fromkeys(r.scoring_model for r in sel))
        cell = {(r.source_model, r.scoring_model): r for r in sel}
        head = "".join(f"<th>{html.escape(_short(s))}</th>" for s in scorers)
        lines = [f"<table><caption>{html.escape(method)}, {origin} images: to target "
                 "(moved off the original class)</caption>",
                 f"<tr><th>made for \\ scored by</th>{head}</tr>"]
        for s in sources:
            tds = []
            for c in scorers:
                r = cell.get((s, c))
                text = "" if r is None else f"{r.target_rate:.1%} ({r.moved_rate:.1%})"
                bold = r is not None and r.same_model
                tds.append(f"<td>{'<b>' if bold else ''}{text}{'</b>' if bold else ''}</td>")
            lines.append(f"<tr><th>{html.escape(_short(s))}</th>{''.join(tds)}</tr>")
        out.append("\n".join([*lines, "</table>"]))
    return "\n".join(out)


def _short(uri: str) -> str:
    """The last part of a model's URI (``reg=0.1_eps=8``), what tells the sweep's models apart."""
    return uri.rstrip("/").rsplit("/", 1)[-1]
