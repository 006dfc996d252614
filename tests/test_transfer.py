"""Transfer (attacks/transfer.py): one attack run's stored images scored by two small models,
checked against the attack's own summary and a numpy scoring of every stored pair."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pyarrow.dataset as ds
import pytest

from attacks import summary, tables, transfer
from attacks.methods.linear import LinearModel
from attacks.methods.noise import noise_images
from benchmarks.attack_models import load_split
from common import schema, storage
from common.errors import ConfigError
from common.model import read_model


def stored_pairs(results: str) -> dict:
    """Every stored pair, read whole (the test's run is small), images as (P, D) uint8."""
    t = ds.dataset(f"{results}/{schema.PAIRS_DIR}", format="parquet", partitioning=ds.partitioning(
        schema.PAIRS_PARTITION_SCHEMA, flavor="hive")).to_table()
    cols = {c: t.column(c).to_numpy(zero_copy_only=False) for c in t.column_names
            if c != schema.IMAGE}
    cols[schema.IMAGE] = np.stack([np.frombuffer(b, np.uint8) for b in
                                   t.column(schema.IMAGE).to_pylist()])
    return cols


@pytest.mark.slow
def test_transfer_of_two_models(attacked_sweep, ingested, bucket, tmp_path):
    models = attacked_sweep["models"]
    results = attacked_sweep["manifest"]["rows"][0]["attack"]  # made for the first model
    out = f"{bucket}/transfer-{tmp_path.name}"  # written to the S3 server, read locally
    manifest = transfer.run(transfer.Settings(results=results, models=tuple(models), output=out,
                                              pairs_per_batch=5))  # several batches per fragment
    table = tables.read_transfer(out)
    assert [asdict(r) for r in table] == manifest["rows"]
    assert len(table) == 2  # 2 models x validation images

    # the diagonal is the attack's own success rate, origin by origin
    own = summary.read_summary(results)["methods"].to_pylist()
    for r in (r for r in table if r.same_model):
        want = next(o for o in own if o[schema.ORIGIN] == r.origin)
        assert r.scoring_model == models[0] and r.pairs == want[schema.S_PAIRS]
        assert r.target_rate == want[schema.S_SUCCESS_RATE]

    # every row against numpy: float64 scores of each stored image and of its original
    pairs = stored_pairs(results)
    val_X, _, val_ids = load_split(ingested, "val")
    originals = dict(zip(val_ids, val_X))
    X0 = np.stack([originals[i] for i in pairs[schema.IMAGE_ID]]).astype(np.float64)
    t = pairs[schema.TARGET].astype(int)
    for r in table:
        m = read_model(r.scoring_model)
        W, b = m.W.astype(np.float64), m.b.astype(np.float64)
        S = pairs[schema.IMAGE].astype(np.float64) @ W.T + b
        sel = pairs[schema.ORIGIN] == r.origin
        pred = S.argmax(1)
        assert r.target_rate == pytest.approx(np.mean((pred == t)[sel]))
        assert r.moved_rate == pytest.approx(np.mean((pred != (X0 @ W.T + b).argmax(1))[sel]))
        logp = S - S.max(1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(1, keepdims=True))
        p = np.sort(np.exp(logp[np.arange(len(t)), t])[sel])
        lower_median = max(p[(len(p) - 1) // 2], 1e-45)
        assert r.median_p_target == pytest.approx(lower_median, rel=10 ** transfer.LOG_STEP - 1)
    assert any(r.target_rate < 1 for r in table if not r.same_model)  # a real measurement


def test_transfer_refuses_what_it_cannot_score(tmp_path):
    with pytest.raises(ConfigError, match="distinct"):
        transfer.run(transfer.Settings(results=str(tmp_path), models=("m", "m"),
                                       output=str(tmp_path / "t")))
    with pytest.raises(ConfigError, match="no manifest.json"):
        transfer.run(transfer.Settings(results=str(tmp_path), models=("m",),
                                       output=str(tmp_path / "t")))
    storage.write_manifest(str(tmp_path), {schema.M_KIND: "attack",
                                           schema.M_CONFIG: {"keep_images": "none"}})
    with pytest.raises(ConfigError, match="kept no images"):
        transfer.run(transfer.Settings(results=str(tmp_path), models=("m",),
                                       output=str(tmp_path / "t")))


def test_median_of_the_histogram_is_the_lower_median():
    tally = transfer.Tally()
    p = np.array([1e-3, 0.2, 0.5, 0.9])
    tally.add(np.zeros(4), np.zeros(4), np.ones(4), p)
    assert tally.median_p() == pytest.approx(0.2, rel=10 ** transfer.LOG_STEP - 1)
    assert tally.to_target == 4 and tally.moved == 4 and tally.pairs == 4


def test_noise_originals_are_the_seeded_images():
    """The originals of noise pairs are regenerated from the attack's seed, not stored."""
    W = np.random.default_rng(0).normal(size=(3, 12)).astype(np.float32)
    m = {schema.M_IMAGE_SHAPE: [2, 2, 3], schema.M_SOURCE: {"data": "unused"},
         schema.M_COUNTS: {"val_images": 0, "noise_images": 3}, schema.M_CONFIG: {"seed": 4}}
    ids, preds = transfer.predictions(m, [LinearModel(W, np.zeros(3, np.float32))], 2)
    assert ids.to_pylist() == ["noise-00000", "noise-00001", "noise-00002"]
    X = noise_images(3, 4, (2, 2, 3)).astype(np.float64)
    assert preds[0].tolist() == (X @ W.T.astype(np.float64)).argmax(1).tolist()
