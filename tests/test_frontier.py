"""The frontier job (attacks/frontier.py): every model of a sweep attacked, one row each."""

from __future__ import annotations

import io
import os
from dataclasses import asdict

import numpy as np
import pyarrow.dataset as ds
import pytest
from PIL import Image

from attacks import frontier, tables
from common import schema, storage
from common.errors import ConfigError
from common.sweep import SweepRow
from report import models, page


@pytest.mark.slow
def test_frontier_attacks_every_model_of_the_sweep(attacked_sweep):
    out, sweep, manifest = (attacked_sweep[k] for k in ("frontier", "sweep", "manifest"))
    rows = tables.read_frontier(out)
    assert [(r.reg, r.robust_eps) for r in rows] == [(1e-4, 0.0), (1e-4, 8.0)]
    assert [asdict(r) for r in rows] == manifest["rows"]
    assert set(frontier.templates(rows)) == {r.model for r in rows}
    for r in rows:  # the median over the stored pairs that were fooled and had to move
        pairs = ds.dataset(os.path.join(r.attack, schema.PAIRS_DIR), format="parquet",
                           partitioning=ds.partitioning(schema.PAIRS_PARTITION_SCHEMA,
                                                        flavor="hive")).to_table().to_pandas()
        assert len(pairs) == 4 * 4 and (pairs[schema.METHOD] == "sign").all()
        moved = pairs[pairs[schema.SUCCESS] & (pairs[schema.PRED] != pairs[schema.TARGET])]
        assert r.median_linf == pytest.approx(np.quantile(moved[schema.LINF], 0.5), abs=1.0)
        assert r.method == "sign" and r.pairs == 16 and r.median_l2 is None  # no exact-l2
    Image.open(os.path.join(out, frontier.FIGURE)).verify()
    assert len(open(os.path.join(out, f"{frontier.TABLE}.md")).read().splitlines()) == 4

    sections, figures = models.model_sections(out, (), page.img)  # the report's section
    assert len(sections) == 1 and Image.open(io.BytesIO(figures[frontier.FIGURE])).size[0] > 500
    # an unfinished frontier resumes: the finished attacks are kept, not rerun
    os.remove(os.path.join(out, storage.MANIFEST))
    kept = os.path.join(rows[0].attack, storage.MANIFEST)
    before = os.stat(kept).st_mtime_ns
    again = frontier.run(frontier.Settings(**attacked_sweep["settings"]))
    assert again["rows"] == manifest["rows"] and os.stat(kept).st_mtime_ns == before


def test_a_point_with_exact_l2_carries_its_median_l2(tmp_path):
    """On a small attack output with exact-l2 beside sign: the row's median_l2 is exact-l2's
    median L2 over the fooled validation pairs that had to move, read back from its pairs."""
    from tests.test_summary import moved_l2, with_exact_l2

    out = str(tmp_path / "attack")
    with_exact_l2(out)
    row = SweepRow(reg=1e-3, robust_eps=0.0, val_top1=0.5, val_top5=0.9, val_loss=1.0,
                   train_loss=1.0, train_top1=0.6, w_norm=1.0, w_pixels_norm=1.0, epochs=1,
                   median_sign_eps=1.0, model="/m")
    p = frontier.point(frontier.Model("/s", row, out), "sign")
    assert p.method == "sign" and p.median_l2 == pytest.approx(np.median(moved_l2(out,
                                                                                    "exact-l2")))
    assert f"| {p.median_l2:.4g} |" in tables.frontier_markdown([p])


def test_frontier_refuses_bad_settings(tmp_path):
    with pytest.raises(ConfigError, match="sign or exact"):
        frontier.run(frontier.Settings(sweeps=("s",), output=str(tmp_path), methods=("template",)))
    with pytest.raises(ConfigError, match="no manifest.json"):
        frontier.run(frontier.Settings(sweeps=(str(tmp_path),), output=str(tmp_path / "f")))
