"""benchmarks/scale.py at a tiny size: every stage runs through the real jobs and tools, the
synthetic data passes the dataset's checks, the built attack output holds exactly --pairs-rows
rows per method and passes the attack's readers, and the figures are all there and sane."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest

from attacks import summary
from attacks.pairs import Pairs, kept_ids, open_attack
from benchmarks import scale, scale_data, scale_goals
from benchmarks.scale_pairs import kept
from common import dataset, schema
from common.errors import ConfigError

TINY = dict(train_rows=2000, val_rows=200, classes=10, attack_images=5, pairs_rows=2000)
KEYS = ("train_samples_per_s", "plain_samples_per_s", "train_peak_rss_mb",
        "object_store_spilled_mb", "attack_pairs_per_s", "pairs_bytes_per_row", "summary_s",
        "summary_peak_rss_mb", "report_s", "report_peak_rss_mb", "transfer_s",
        "transfer_peak_rss_mb", "show_s", "files_written")


@pytest.fixture(scope="module")
def rehearsal(ray_local, tmp_path_factory) -> tuple[str, dict, dict]:
    """(work folder, returned figures, figures read from --json) of one tiny rehearsal."""
    work = tmp_path_factory.mktemp("scale")
    out = work / "figures.json"
    figures = scale.run(scale.Settings(**TINY, work=str(work / "run"), json=str(out)))
    return str(work / "run"), figures, json.loads(out.read_text())


@pytest.mark.slow
def test_the_synthetic_data_is_a_valid_learnable_ingest_output(rehearsal):
    work, figures, _ = rehearsal
    m = dataset.open_ingest(f"{work}/data", splits=schema.SPLITS)
    assert m[schema.M_COUNTS]["train"]["written"] == TINY["train_rows"]
    assert m[schema.M_COUNTS]["val"]["written"] == TINY["val_rows"]
    assert m[schema.M_CLASSES] == [scale_data.wnid(k) for k in range(TINY["classes"])]
    assert all(0 < v < 255 for v in m[schema.M_PIXEL_MEAN] + m[schema.M_PIXEL_STD])
    assert figures["train_val_top1"] > 0.5  # one epoch learns it: templates, not noise


@pytest.mark.slow
def test_the_built_output_holds_pairs_rows_per_method_and_passes_the_readers(rehearsal):
    work, _, _ = rehearsal
    m = open_attack(f"{work}/pairs")
    pairs = Pairs.open(f"{work}/pairs", m)
    methods = m[schema.M_COUNTS]["methods"]
    assert set(methods) == set(scale.METHODS)
    for method in methods:
        assert sum(f.rows for (mt, _), files in pairs.files.items() if mt == method
                   for f in files) == TINY["pairs_rows"]
    assert pairs.rows == TINY["pairs_rows"] * len(methods)
    assert summary.read_summary(f"{work}/pairs", m)["methods"].num_rows == len(methods)
    table = pairs.read("exact", 3, [schema.IMAGE_ID, schema.LABEL, schema.SOURCE_NAME,
                                    schema.P_TARGET, schema.IMAGE])
    assert table.column(schema.IMAGE_ID).to_pylist() == [
        scale_data.val_id(i) for i in range(TINY["pairs_rows"] // TINY["classes"])]
    data = pq.read_table(f"{work}/data/val", columns=[schema.IMAGE_ID, schema.LABEL])
    labels = dict(zip(*(data.column(c).to_pylist() for c in (schema.IMAGE_ID, schema.LABEL))))
    assert table.column(schema.LABEL).to_pylist() == [
        labels[i] for i in table.column(schema.IMAGE_ID).to_pylist()]  # each image's own
    assert table.column(schema.SOURCE_NAME).to_pylist() == [
        f"synthetic class {k}" for k in table.column(schema.LABEL).to_pylist()]
    p = table.column(schema.P_TARGET).to_numpy()
    assert len(set(p.tolist())) > len(p) // 2  # as distinct as real measurements
    rows = table.to_pylist()
    keep = kept_ids(m)  # the attack's own answer: which images store their fooling image
    assert [r[schema.IMAGE] is not None for r in rows] == [
        keep is None or r[schema.IMAGE_ID] in keep for r in rows]
    images = [r[schema.IMAGE] for r in rows if r[schema.IMAGE] is not None]
    assert images and len(set(images)) == len(images)  # no two alike, as in the attack's files


@pytest.mark.slow
def test_every_figure_is_there_and_sane(rehearsal):
    _, figures, written = rehearsal
    assert written == json.loads(json.dumps(figures))
    for key in KEYS:
        values = figures[key].values() if isinstance(figures[key], dict) else [figures[key]]
        assert all(isinstance(v, int | float) and math.isfinite(v) and v >= 0 for v in values)
    assert set(figures["attack_pairs_per_s"]) == set(scale.METHODS)
    assert all(v > 0 for v in figures["attack_pairs_per_s"].values())
    work = figures["settings"]["work"]
    settings = open_attack(f"{work}/pairs")[schema.M_IDENTITY]["settings"]
    images = scale_data.D * kept(settings, np.arange(settings["val_images"])).mean()
    assert all(images < v < images + 1000 for v in figures["pairs_bytes_per_row"].values())
    assert figures["train_samples_per_s"] > 0 and figures["plain_samples_per_s"] > 0
    assert 100 < figures["train_peak_rss_mb"] < 24 * 1024
    assert all(0 < figures[f"{t}_s"] and 50 < figures[f"{t}_peak_rss_mb"] < 24 * 1024
               for t in scale_goals.TOOLS)
    assert figures["files_written"] > 50
    assert set(figures["goals"]) == set(scale_goals.goals(figures))
    assert figures["projection"]["total_s"] > 0


def test_a_run_the_disk_cannot_hold_is_refused_before_writing(tmp_path):
    with pytest.raises(ConfigError, match="GB free"):
        scale.check(scale.Settings(val_rows=10**7, pairs_rows=10**10), str(tmp_path))  # 372 TB
    with pytest.raises(ConfigError, match="multiple of --classes"):
        scale.check(scale.Settings(**{**TINY, "pairs_rows": 1995}), str(tmp_path))
    assert list(tmp_path.iterdir()) == []
