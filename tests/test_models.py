"""The frontier figure and the transfer matrix (report/models.py), from hand-made rows."""

from __future__ import annotations

import dataclasses
import io
import os
import re

import numpy as np
from PIL import Image

from attacks import frontier, tables
from attacks.figures import to_png
from attacks.tables import FrontierRow, TransferRow
from common import schema, storage
from report import models, page


def row(reg: float, eps: float, top1: float, median: float | None) -> FrontierRow:
    model = f"/s/reg={reg:g}" + (f"_eps={eps:g}" if eps else "")
    return FrontierRow(sweep="/s", reg=reg, robust_eps=eps, val_top1=top1, val_top5=1.0,
                       method="sign", median_linf=median, success_rate=1.0, pairs=1, model=model,
                       attack=f"/f/attacks/0_{model[3:]}")


ROWS = [row(1.0, 0, 0.70, 30), row(1e-4, 0, 0.80, 10), row(0.1, 0, 0.78, 20),
        row(0.1, 8, 0.74, 40), row(0.1, 2, 0.77, 25), row(0.1, 16, 0.72, None)]


def test_curves_split_l2_from_robust_and_order_them():
    c = frontier.curves(ROWS)
    assert [r.reg for r in c["L2"]] == [1e-4, 0.1, 1.0]
    # the robust series starts at the plain model of its reg
    assert [r.robust_eps for r in c["robust, reg=0.1"]] == [0, 2, 8, 16]
    assert set(c) == {"L2", "robust, reg=0.1"}


def test_frontier_figure_draws_each_point_and_its_templates():
    thumb = io.BytesIO()
    Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(thumb, format="PNG")
    fig = frontier.frontier_figure(ROWS, {r.model: thumb.getvalue() for r in ROWS})
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["L2"].get_xdata()) == [10, 20, 30]
    assert list(lines["robust, reg=0.1"].get_ydata()) == [78.0, 77.0, 74.0]  # None left out
    assert len(fig.axes) == 1 + 5  # one templates thumbnail per measured model
    png = Image.open(io.BytesIO(to_png(fig)))
    assert png.size[0] > 500


def test_transfer_matrix_has_a_cell_per_pair_and_marks_the_diagonal():
    rows = [TransferRow(source_model="/s/a", scoring_model=s, same_model=s == "/s/a",
                        method="sign", origin=o, pairs=4, target_rate=rate, moved_rate=1.0,
                        median_p_target=0.5)
            for s, rate in (("/s/a", 0.9), ("/s/b", 0.25)) for o in ("val", "noise")]
    page = models.transfer_matrix(rows)
    assert page.count("<table>") == 1 and "<b>90.0% (100.0%)</b>" in page
    assert re.search(r"<th>a</th><td><b>90.0%.*</b></td><td>25.0% \(100.0%\)</td>", page)


def test_model_sections_read_the_frontier_and_transfer_tables(tmp_path):
    """The report's sections from a frontier and a transfer output on disk (the real files)."""
    thumb = io.BytesIO()
    Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(thumb, format="PNG")
    rows = [dataclasses.replace(r, model=str(tmp_path / r.model.lstrip("/"))) for r in ROWS]
    for r in rows:
        storage.write_bytes(storage.join(r.model, schema.TEMPLATES_FILE), thumb.getvalue())
    front, trans = str(tmp_path / "frontier"), str(tmp_path / "transfer")
    cells = [TransferRow(source_model=rows[0].model, scoring_model=r.model,
                         same_model=r is rows[0], method="sign", origin="val", pairs=4,
                         target_rate=0.5, moved_rate=0.75, median_p_target=0.5) for r in rows[:2]]
    os.makedirs(front)
    os.makedirs(trans)
    storage.write_manifest(front, {schema.M_KIND: "frontier",
                                   schema.M_FILES: tables.write_frontier(front, rows)})
    storage.write_manifest(trans, {schema.M_KIND: "transfer",
                                   schema.M_FILES: tables.write_transfer(trans, cells)})
    sections, figures = models.model_sections(front, (trans,), page.img)
    assert [title for title, _ in sections] == [
        "The frontier: regularize or change the objective", "Do fooling images transfer?"]
    assert Image.open(io.BytesIO(figures[frontier.FIGURE])).size[0] > 500
    assert tables.frontier_markdown(rows) in sections[0][1]
    assert "<b>50.0% (75.0%)</b>" in sections[1][1]


def test_the_same_pairs_under_each_model_are_each_models_stored_images(attacked_sweep):
    """The grid shows, for the same (image, target) pairs, each model's own stored fooling image,
    each classified as the target by its model (numpy scores), the pairs those that had to move
    and were fooled under both; with one model on the L2 curve there is no grid."""
    from attacks.figures import png
    from attacks.pairs import Pairs, open_attack
    from common.model import read_model

    rows = tables.read_frontier(attacked_sweep["frontier"])
    assert models.same_pairs(rows, ["c"] * 4, (64, 64, 3)) == ""  # one L2 model, one robust
    l2 = [dataclasses.replace(r, robust_eps=0.0, reg=10.0 ** i) for i, r in enumerate(rows)]
    m = [open_attack(r.attack) for r in l2]
    attacks = [Pairs(r.attack, mi[schema.M_FILES]) for r, mi in zip(l2, m)]
    picks = models.common_picks(attacks, "sign", m[0][schema.M_IDENTITY]["settings"]["targets"],
                                models.SAME_PAIRS)
    assert picks and len({t for _, t, _ in picks}) == len(picks)
    shape = tuple(m[0][schema.M_IMAGE_SHAPE])
    grid = models.same_pairs(l2, [f"class {k}" for k in range(4)], shape)
    for r, pairs in zip(l2, attacks):
        model = read_model(r.model)
        for image_id, t, method in picks:
            row = pairs.take(method, t, [image_id])[image_id]
            assert row[schema.SUCCESS] and row[schema.PRED] != t
            x = np.frombuffer(row[schema.IMAGE], np.uint8)
            assert int((x @ model.W.T.astype(np.float64) + model.b).argmax()) == t
            assert page.data_uri(png(x, shape)) in grid
    assert grid.count("<tr>") == len(picks) + 1
