"""The attack's pairs/ (attacks/pairs.py): written by TargetFiles, read back by Pairs exactly as
pyarrow reads the files alone, and every listed file checked before a finished output is read."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.dataset as ds
import pytest

from attacks.pairs import Pairs, TargetFiles, pair_file, pair_tables
from common import schema, storage
from common.errors import ConfigError

SHAPE = (2, 2, 3)
D = int(np.prod(SHAPE))


def columns(ids: list[str], targets: list[int], seed: int) -> dict[str, np.ndarray]:
    """Image-major pair columns for ids x targets, random but valid."""
    rng = np.random.default_rng(seed)
    P = len(ids) * len(targets)
    t = np.tile(targets, len(ids))
    return {
        schema.IMAGE_ID: np.repeat(np.array(ids, dtype=object), len(targets)),
        schema.ORIGIN: np.full(P, "val", dtype=object), schema.LABEL: rng.integers(0, 4, P),
        schema.PRED: rng.integers(0, 4, P), schema.STRENGTH: rng.random(P) * 9,
        schema.LINF: rng.random(P) * 9, schema.L2: rng.random(P) * 20,
        schema.FOOLED_PRED: t, schema.SUCCESS: np.ones(P, bool), schema.P_TARGET: rng.random(P),
        schema.BOUND_LINF: rng.random(P), schema.BOUND_L2: rng.random(P),
        schema.IMAGE: rng.integers(0, 256, (P, D), dtype=np.uint8)}


@pytest.fixture()
def written(tmp_path):
    """Two chunks x two targets of one method, and the listing the job would record."""
    out, listing, cols = str(tmp_path / "fooling"), [], {}
    for chunk, ids, seed in (("val-00000", ["a", "b", "c"], 0), ("val-00001", ["d", "e"], 1)):
        cols[chunk] = columns(ids, [1, 3], seed)
        files = TargetFiles(out, "sign", [1, 3], chunk, SHAPE)
        files.add(pair_tables(cols[chunk], [1, 3], keep_images=True))
        listing += files.close()
    return out, listing, cols


def test_reads_agree_with_pyarrow_alone(written):
    out, listing, cols = written
    pairs = Pairs(out, listing)
    assert pairs.rows == 10 and sorted(pairs.files) == [("sign", 1), ("sign", 3)]
    got = pairs.read("sign", 3, [schema.IMAGE_ID, schema.LINF]).to_pydict()
    want = ds.dataset(os.path.join(out, "pairs", "method=sign", "target=3"),
                      format="parquet").to_table(columns=[schema.IMAGE_ID, schema.LINF])
    assert got == want.to_pydict() and got[schema.IMAGE_ID] == ["a", "b", "c", "d", "e"]
    # image-major columns: target 3 is every second pair
    want_linf = np.concatenate([cols[c][schema.LINF][1::2] for c in ("val-00000", "val-00001")])
    assert np.array_equal(np.float32(got[schema.LINF]), want_linf.astype(np.float32))
    row = pairs.take("sign", 1, ["d"])["d"]
    assert row[schema.IMAGE] == cols["val-00001"][schema.IMAGE][0].tobytes()
    assert pairs.take("sign", 1, ["nobody"]) == {}
    batches = list(pairs.batches([schema.IMAGE_ID, schema.METHOD, schema.TARGET], 3))
    seen = sorted((i, m, t) for b in batches for i, m, t in zip(*b.to_pydict().values()))
    assert seen == sorted((i, "sign", t) for i in "abcde" for t in (1, 3))
    assert batches[0].schema.field(schema.TARGET).type == schema.PAIRS_PARTITION_SCHEMA.field(
        schema.TARGET).type


def finished(out: str, listing: list[dict]) -> None:
    storage.write_manifest(out, {schema.M_KIND: "attack", schema.M_FILES: listing})


def test_a_finished_output_opens_with_its_files_checked(written):
    out, listing, _ = written
    finished(out, listing)
    assert Pairs.open(out).rows == 10


def test_a_missing_file_is_named(written):
    out, listing, _ = written
    finished(out, listing)
    os.remove(os.path.join(out, pair_file("sign", 3, "val-00001")))
    with pytest.raises(ConfigError, match=r"target=3/val-00001.parquet is missing"):
        Pairs.open(out)


def test_a_truncated_file_is_named(written):
    out, listing, _ = written
    finished(out, listing)
    path = os.path.join(out, pair_file("sign", 1, "val-00000"))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 1)
    with pytest.raises(ConfigError, match=r"target=1/val-00000.parquet has \d+ bytes"):
        Pairs.open(out)


def test_an_unlisted_file_is_named(written):
    out, listing, _ = written
    finished(out, listing[:-1])  # the last file written is not in the manifest
    with pytest.raises(ConfigError, match=rf"{listing[-1]['path']} is not listed"):
        Pairs.open(out)


def test_a_damaged_file_of_the_right_size_is_one_error(written):
    out, listing, _ = written
    finished(out, listing)
    path = os.path.join(out, pair_file("sign", 1, "val-00000"))
    data = bytearray(open(path, "rb").read())
    data[-8:-4] = b"\xff\xff\xff\x7f"  # the footer's length
    open(path, "wb").write(bytes(data))
    with pytest.raises(ConfigError, match="cannot read the pairs of"):
        Pairs.open(out).read("sign", 1, [schema.LINF])


def test_another_kind_of_output_is_refused(tmp_path):
    storage.write_manifest(str(tmp_path), {schema.M_KIND: "ingest"})
    with pytest.raises(ConfigError, match="is not an attack output"):
        Pairs.open(str(tmp_path))
