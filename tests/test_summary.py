"""attacks/summary.py: the L2 budget table against a direct count, and outputs written before it."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest

from attacks import summary
from common import schema, storage
from common.errors import ConfigError
from tests.test_pairs import NAMES, SHAPE, columns, write_attack


def with_exact_l2(out: str) -> dict:
    """tests/test_pairs.py's small attack output (sign, targets 1 and 3) with exact-l2's pairs
    beside it, the summary tables of both, and its manifest saying so; returns the manifest."""
    from attacks import outputs
    from attacks.pairs import Pairs, TargetFiles, pair_tables

    m = write_attack(out)
    targets = [1, 3]
    listing = [f for f in m[schema.M_FILES] if f["path"].startswith(schema.PAIRS_DIR)]
    for chunk, ids, seed in (("val-00000", ["a", "b", "c"], 10), ("val-00001", ["d", "e"], 11)):
        files = TargetFiles(out, "exact-l2", targets, chunk, SHAPE)
        files.add(pair_tables(columns(ids, targets, seed), targets, NAMES, keep_images=True))
        listing += files.close()
    methods = ["sign", "exact-l2"]
    listing += outputs.write_summary(Pairs(out, listing), methods, targets, NAMES)
    m[schema.M_FILES] = listing
    m[schema.M_COUNTS] = {**m[schema.M_COUNTS], "methods": methods, "pairs": 20}
    storage.write_manifest(out, m)
    return m


def partition(seed: int, n: int = 40) -> pa.Table:
    """The STATS columns of one partition's pairs (target 1): val and noise rows, some not
    fooled, some already the target (at 0), L2 spread over three decades."""
    rng = np.random.default_rng(seed)
    origin = np.where(np.arange(n) % 4 == 0, "noise", "val")
    pred = rng.integers(0, 3, n)
    l2 = np.where(pred == 1, 0, rng.uniform(1, 3000, n)).astype(np.float32)
    bound = (l2 * rng.uniform(0.5, 1, n)).astype(np.float32)
    return pa.table({
        schema.ORIGIN: origin, schema.LABEL: np.where(origin == "val", pred, -1),
        schema.PRED: pred, schema.SUCCESS: rng.random(n) < 0.8,
        schema.STRENGTH: l2 / 50, schema.LINF: np.ceil(l2 / 50).astype(np.float32),
        schema.L2: l2, schema.BOUND_LINF: np.floor(l2 / 60).astype(np.float32),
        schema.BOUND_L2: bound})


def test_the_l2_curves_count_the_pairs_within_each_budget():
    parts = {("sign", 1): partition(0), ("exact-l2", 1): partition(1)}
    rows = [r for (m, t), table in parts.items() for r in summary.target_stats(table, m, t)]
    got = summary.method_tables(rows)["budget_l2"].to_pandas()
    for origin in schema.ORIGINS:
        mine = got[got[schema.ORIGIN] == origin]
        budgets = [g[schema.S_BUDGET].to_numpy() for _, g in mine.groupby(schema.METHOD)]
        assert all(np.array_equal(b, budgets[0]) for b in budgets)  # one grid per origin
        for (method, _), table in parts.items():
            d = table.filter(pa.compute.equal(table[schema.ORIGIN], origin)).to_pandas()
            fooled_l2 = d[schema.L2][d[schema.SUCCESS]]
            assert budgets[0][-1] >= max(fooled_l2.max(), d[schema.BOUND_L2].max())
            curve = mine[mine[schema.METHOD] == method]
            for b, fooled, bound in curve[[schema.S_BUDGET, schema.S_FOOLED_FRACTION,
                                           schema.S_BOUND_FRACTION]].itertuples(index=False):
                assert fooled == np.mean(d[schema.SUCCESS] & (d[schema.L2] <= b))
                assert bound == np.mean(d[schema.BOUND_L2] <= b)
            assert curve[schema.S_BOUND_FRACTION].iloc[-1] == 1


def test_the_targets_carry_the_l2_bound_and_ratio():
    table = partition(2)
    row = next(r for r in summary.target_stats(table, "exact-l2", 1) if r[schema.ORIGIN] == "val")
    d = table.to_pandas()
    ok = (d[schema.ORIGIN] == "val") & d[schema.SUCCESS] & (d[schema.PRED] != 1)
    bound, l2 = d[schema.BOUND_L2][ok].astype(float), d[schema.L2][ok].astype(float)
    assert row[schema.S_BOUND_L2_MEDIAN] == pytest.approx(np.median(bound))
    assert row[schema.S_L2_RATIO_MEDIAN] == pytest.approx(np.median(l2 / bound))


def test_an_output_written_before_the_l2_budget_reads_without_it(tmp_path):
    out = str(tmp_path / "attack")
    write_attack(out)
    assert summary.read_summary(out)["budget_l2"].num_rows > 0
    rel = f"{schema.SUMMARY_DIR}/{schema.SUMMARY_BUDGET_L2}"
    path = os.path.join(out, rel)
    os.remove(path)
    with pytest.raises(ConfigError, match=rf"^{path} is missing"):  # listed: still checked
        summary.read_summary(out)
    m = storage.read_manifest(out)
    m[schema.M_FILES] = [f for f in m[schema.M_FILES] if f["path"] != rel]
    storage.write_manifest(out, m)
    tables = summary.read_summary(out)
    assert "budget_l2" not in tables
    assert set(tables) == set(schema.SUMMARY_TABLES) - {"budget_l2"}
    assert "fooled" in summary.describe(out)


def moved_l2(out: str, method: str) -> np.ndarray:
    """The L2 of a method's fooled validation pairs that had to move, read with pyarrow alone."""
    import pyarrow.dataset as ds

    d = ds.dataset(os.path.join(out, schema.PAIRS_DIR), format="parquet",
                   partitioning=schema.pairs_partitioning()).to_table().to_pandas()
    ok = ((d[schema.METHOD] == method) & (d[schema.ORIGIN] == "val") & d[schema.SUCCESS]
          & (d[schema.PRED] != d[schema.TARGET]))
    return d[schema.L2][ok].to_numpy(np.float64)


def test_the_moved_median_is_numpys_over_the_fooled_pairs_that_had_to_move(tmp_path):
    from attacks.pairs import Pairs

    out = str(tmp_path / "attack")
    with_exact_l2(out)
    pairs = Pairs.open(out)
    for method in ("sign", "exact-l2"):
        want = np.median(moved_l2(out, method))
        assert summary.moved_median(pairs, method, schema.L2) == pytest.approx(want)
    assert summary.moved_median(pairs, "exact", schema.L2) is None  # it did not run
    tables = summary.read_summary(out)
    assert set(tables["budget_l2"].column(schema.METHOD).to_pylist()) == {"sign", "exact-l2"}
