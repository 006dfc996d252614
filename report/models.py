"""The report's comparison of models: the frontier's section and the transfer matrix.

    >>> sections, figures = model_sections(frontier_uri, transfer_uris, page.img)
    >>> html = transfer_matrix(rows)             # <table>: source model x scoring model
    >>> html = same_pairs(frontier_rows, names, shape)   # a few pairs under each model ("": none)

``rows`` are the transfer table's rows (attacks/tables.py, ``TransferRow``); the frontier's figure
is the one its job draws (attacks/frontier.py).
"""

from __future__ import annotations

import functools
import html

from attacks import frontier, tables
from attacks.figures import to_png
from attacks.pairs import Pairs, open_attack
from attacks.tables import FrontierRow, TransferRow
from common import schema
from report import examples, page

SAME_PAIRS = 3  # pairs shown under every model of the L2 curve


def model_sections(frontier_uri: str | None, transfers: tuple[str, ...], img
                 ) -> tuple[list[tuple[str, str]], dict[str, bytes]]:
    """The report's sections for a frontier output and transfer outputs: (title, HTML) pairs and
    the figures (name -> PNG); ``img(name, png, caption)`` is the report's embedded figure."""
    sections, figures = [], {}
    if frontier_uri:
        rows = tables.read_frontier(frontier_uri)
        figures[frontier.FIGURE] = to_png(frontier.frontier_figure(rows, frontier.templates(rows)))
        hardened = [r for r in rows if r.series in frontier.HARDENED]
        caption = ("Validation top-1 against the median minimal L-inf strength that fools each "
                   "model (fooled pairs that had to move, validation images): L2 regularization "
                   "against the robust objective"
                   + (", a background class of fooling images and retraining on them (each "
                      "round's model, from the plain one)" if hardened else "")
                   + ", each point's templates beside it.")
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


def same_pairs(rows: list[FrontierRow], names: list[str], shape, count: int = SAME_PAIRS) -> str:
    """A few validation pairs fooled under every model of the frontier's L2 curve, side by side:
    each model's own minimal fooling image of the same (image, target), least regularized first;
    "" when the curve has one model or its attacks kept no images."""
    l2 = frontier.curves(rows).get("L2", [])
    manifests = [open_attack(r.attack, (schema.M_FILES, schema.M_IDENTITY)) for r in l2]
    if len(l2) < 2 or any(m[schema.M_IDENTITY]["settings"].get("keep_images") != "all"
                          for m in manifests):
        return ""
    attacks = [Pairs(r.attack, m[schema.M_FILES]) for r, m in zip(l2, manifests)]
    targets = manifests[0][schema.M_IDENTITY]["settings"]["targets"]
    picks = common_picks(attacks, l2[0].method, targets, count)
    columns = []
    for r, m, pairs in zip(l2, manifests, attacks):
        model = examples.attack_model(r.attack, m, r.model)
        exs = examples.examples_of(examples.stored_rows(pairs, picks), m, model)
        label = f"reg={r.reg:g} ({page.percent(r.val_top1)} top-1)"
        columns.append([{**ex, "method": label} for ex in exs])
    return page.compare([list(pair) for pair in zip(*columns)], names, shape)


def common_picks(attacks: list[Pairs], method: str, targets, count: int
                 ) -> list[tuple[str, int, str]]:
    """(image_id, target, method) of up to ``count`` validation pairs that had to move and were
    fooled under every attack: those nearest the median L-inf of the first, each of its own
    target and image."""
    frames = [examples.moved(p, method, targets)[[schema.IMAGE_ID, "target", schema.LINF]]
              .rename(columns={schema.LINF: i}) for i, p in enumerate(attacks)]
    both = functools.reduce(lambda a, b: a.merge(b, on=[schema.IMAGE_ID, "target"]), frames)
    both = both.iloc[(both[0] - both[0].median()).abs().argsort()]
    picks, images, seen = [], set(), set()
    for r in both.itertuples():
        if r.target not in seen and r.image_id not in images and len(picks) < count:
            picks.append((r.image_id, int(r.target), method))
            images.add(r.image_id)
            seen.add(r.target)
    return picks

