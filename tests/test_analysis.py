"""docs/analysis.py, the analysts' notebook, run as a plain script on the shared attack output:
its methods table is the summary's, its headline the report's (computed from the budget table
by report/story.py), its gallery the smallest changes with the manifest's class names."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
from PIL import Image

from attacks.summary import read_summary
from common import schema
from report import story
from tests.attacked import METHODS

NOTEBOOK = Path(__file__).resolve().parent.parent / "docs" / "analysis.py"
Q50, Q90 = (schema.quantile_column(schema.LINF, q) for q in (0.5, 0.9))


@pytest.fixture(scope="module")
def ran(attacked, tmp_path_factory):
    """(settings, manifest, the script's printout, its gallery PNG)."""
    cfg, manifest = attacked
    png = tmp_path_factory.mktemp("analysis") / "gallery.png"
    run = subprocess.run([sys.executable, str(NOTEBOOK), cfg.output, "--png", str(png)],
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    return cfg, manifest, run.stdout, png


def number(text: str) -> float | None:
    return None if text == "None" else float(text)


def test_the_methods_table_is_the_summarys(ran):
    cfg, _, out, _ = ran
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["origin", "method"])
    printed = {}
    for line in lines[start + 1:]:
        if line.startswith("headline"):
            break
        origin, method, *values = line.split()
        printed[(origin, method)] = [float(v) for v in values]
    summary = read_summary(cfg.output)["methods"].to_pylist()
    assert len(printed) == len(summary) == 2 * len(METHODS)  # val and noise
    for r in summary:
        want = [r[schema.S_PAIRS], r[schema.S_SUCCESS_RATE], r[Q50], r[Q90], r[schema.S_L2_MEAN]]
        assert printed[(r[schema.ORIGIN], r[schema.METHOD])] == pytest.approx(
            want, rel=1e-4, nan_ok=True), r


def test_the_headline_is_the_reports(ran):
    cfg, manifest, out, _ = ran
    got = re.search(r"^headline \((\w+)\): median L-inf (\S+), 90% (\S+), over ([\d,]+) of "
                    r"([\d,]+) validation pairs that had to move$", out, re.M)
    assert got, out
    method, half, most, moved, pairs = got.groups()
    budget = read_summary(cfg.output)["budget"].to_pandas()
    c = manifest[schema.M_COUNTS]
    total = c["val_images"] * c["targets"]
    assert method == story.headline_method(c["methods"]) == "exact"
    assert int(pairs.replace(",", "")) == total
    assert int(moved.replace(",", "")) == story.moved_within(budget, method, total)[2] < total
    assert half != "None"  # the sample's model: every pair is fooled
    for printed, q in ((half, 0.5), (most, 0.9)):
        want = story.moved_quantile(budget, method, q, total)
        assert number(printed) == (None if want is None else pytest.approx(want, abs=1e-3))


def test_the_gallery_shows_the_smallest_changes_with_their_names(ran):
    cfg, manifest, out, png = ran
    shown = re.findall(r"^(\S+): (.+) -> (.+), L-inf (\S+), p (\S+)$", out, re.M)
    assert len(shown) == 6 and len({i for i, *_ in shown}) == 6
    names = manifest[schema.M_CLASS_NAMES]
    pairs = ds.dataset(f"{cfg.output}/pairs", format="parquet",
                       partitioning=schema.pairs_partitioning()).to_table(
        columns=[schema.IMAGE_ID, schema.LABEL, schema.PRED, schema.TARGET, schema.LINF,
                 schema.SUCCESS],
        filter=(ds.field(schema.METHOD) == "exact") & (ds.field(schema.ORIGIN) == "val")
    ).to_pandas()
    moved = pairs[pairs.success & (pairs.pred != pairs.target)]
    smallest = np.sort(moved.groupby(schema.IMAGE_ID).linf.min().to_numpy())[:6]
    assert sorted(float(linf) for *_, linf, _ in shown) == smallest.tolist()
    for image_id, source, target, linf, _ in shown:  # the names, joined back to the indices
        row = moved[(moved.image_id == image_id) & (moved.target == names.index(target))]
        assert len(row) == 1 and row.linf.item() == float(linf)
        assert names[row.label.item()] == source
    image = Image.open(png)
    assert image.format == "PNG" and image.width > 600 and image.height > 300
