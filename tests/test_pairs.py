"""The attack's pairs/ (attacks/pairs.py): written by TargetFiles, read back by Pairs exactly as
pyarrow reads the files alone, and every listed file checked before a finished output is read."""

from __future__ import annotations

import os
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from attacks.pairs import Pairs, TargetFiles, pair_file, pair_tables
from common import schema, storage
from common.errors import ConfigError

SHAPE = (2, 2, 3)
D = int(np.prod(SHAPE))
CLASSES = ["n01440764", "n01443537", "n01484850", "n01491361"]
NAMES = ["tench, Tinca tinca", "goldfish, Carassius auratus", "great white shark", "tiger shark"]


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
        files.add(pair_tables(cols[chunk], [1, 3], NAMES, keep_images=True))
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


def test_names_in_every_row_are_the_manifests_joined_by_index(tmp_path):
    """Read with pyarrow and pandas alone, every row's target_name and source_name are the names
    of its target and label (null for noise's -1), joined from the names list by index, and
    had_to_move is pred != target; the columns are dictionary-encoded strings."""
    out = str(tmp_path / "fooling")
    cols = columns(["a", "b", "c", "noise-000000"], [0, 2, 3], seed=2)
    noise = cols[schema.IMAGE_ID] == "noise-000000"
    cols[schema.ORIGIN][noise], cols[schema.LABEL][noise] = "noise", -1
    files = TargetFiles(out, "exact", [0, 2, 3], "val-00000", SHAPE)
    files.add(pair_tables(cols, [0, 2, 3], NAMES, keep_images=False))
    files.close()
    table = ds.dataset(os.path.join(out, "pairs"), format="parquet",
                       partitioning=schema.pairs_partitioning()).to_table()
    for name in (schema.TARGET_NAME, schema.SOURCE_NAME):
        assert table.schema.field(name).type == pa.dictionary(pa.int16(), pa.string())
    df = table.to_pandas()
    by_index = pd.DataFrame({"index": range(len(NAMES)), "name": NAMES})
    for index, name in ((schema.TARGET, schema.TARGET_NAME), (schema.LABEL, schema.SOURCE_NAME)):
        joined = df[[index, name]].astype({index: int, name: object}).merge(
            by_index, how="left", left_on=index, right_on="index")  # no name: -1, noise
        assert len(joined) == len(df) == 12
        assert joined[name].fillna("-").tolist() == joined["name"].fillna("-").tolist()
    assert df[schema.SOURCE_NAME].isna().tolist() == (df[schema.LABEL] == -1).tolist()
    assert df[schema.HAD_TO_MOVE].tolist() == (df[schema.PRED] != df[schema.TARGET]).tolist()


def test_a_file_written_before_the_names_reads_without_them(written):
    """A pairs file of an older output (no target_name, source_name, had_to_move) reads as
    before; a read that asks for them is one line naming it; one lacking a part of them is
    damaged."""
    out, listing, _ = written
    path = os.path.join(out, pair_file("sign", 3, "val-00000"))
    full = pq.read_table(path)

    def rewrite(table):
        pq.write_table(table, path, write_page_checksum=True)
        finished(out, [{**f, "bytes": os.path.getsize(os.path.join(out, f["path"]))}
                       for f in listing])
        return Pairs.open(out)

    pairs = rewrite(full.drop_columns(list(schema.PAIRS_NAMED)))
    assert pairs.read("sign", 3, [schema.IMAGE_ID, schema.LINF]).num_rows == 5
    assert pairs.take("sign", 3, ["b"])["b"].keys() == {
        *schema.PAIRS_FILE_SCHEMA.names} - {*schema.PAIRS_NAMED}
    assert sum(b.num_rows for b in pairs.batches([schema.IMAGE_ID, schema.TARGET], 2)) == 10
    message = rf"^{path} was written before pairs files carried target_name: rerun the attack"
    for read in (lambda: pairs.read("sign", 3, [schema.TARGET_NAME]),
                 lambda: pairs.take("sign", 3, ["a"], [schema.IMAGE_ID, schema.TARGET_NAME]),
                 lambda: list(pairs.batches([schema.TARGET_NAME], 2))):
        with pytest.raises(ConfigError, match=message) as e:
            read()
        assert "\n" not in str(e.value)
    pairs = rewrite(full.drop_columns([schema.HAD_TO_MOVE]))
    with pytest.raises(ConfigError, match=r"damaged, or not a pairs file \(its had_to_move "):
        pairs.read("sign", 3, [schema.LINF])


def write_attack(out: str) -> dict:
    """A small attack output: pairs by TargetFiles, the summary tables by the job's writer, and a
    manifest as attacks.fool writes it."""
    listing, targets = [], [1, 3]
    for chunk, ids, seed in (("val-00000", ["a", "b", "c"], 0), ("val-00001", ["d", "e"], 1)):
        files = TargetFiles(out, "sign", targets, chunk, SHAPE)
        files.add(pair_tables(columns(ids, targets, seed), targets, NAMES, keep_images=True))
        listing += files.close()
    from attacks import outputs  # torch: only for the tests that need a whole output

    listing += outputs.write_summary(Pairs(out, listing), ["sign"], targets, NAMES)
    manifest = {
        schema.M_KIND: "attack",
        schema.M_SOURCE: {"data": "/data", "model": "/model", "model_sha256": "ab" * 32},
        schema.M_CLASSES: CLASSES, schema.M_CLASS_NAMES: NAMES, schema.M_IMAGE_SHAPE: list(SHAPE),
        schema.M_COUNTS: {"pairs": 10, "val_images": 5, "noise_images": 0, "targets": 2,
                          "methods": ["sign"]},
        "layout": "pairs/method=<method>/target=<target>/<chunk>.parquet",
        schema.M_FILES: listing, **schema.stamp({"seed": 0, "keep_images": "all"},
                                                {"total_s": 2.5}),
        schema.M_IDENTITY: {"kind": "attack", "settings": {"seed": 0}, "owns": ["pairs"]}}
    storage.write_manifest(out, manifest)
    return manifest


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
    with pytest.raises(ConfigError, match=r"target=1/val-00000.parquet: damaged, or not Parquet "
                                          r"\(Parquet file size is \d+ bytes, smaller"):
        Pairs.open(out).read("sign", 1, [schema.LINF])


def flip_in_value(path: str, value: bytes) -> None:
    """Flip one bit in the middle of the first copy of ``value`` in the file: inside a page's
    values, past its header (the file keeps its size)."""
    data = bytearray(open(path, "rb").read())
    at = data.find(value) + len(value) // 2
    assert at > len(value) // 2
    data[at] ^= 0x10
    open(path, "wb").write(bytes(data))


def test_a_flipped_bit_in_a_page_is_named_by_every_read(written):
    """Each page carries its CRC-32: read, take and batches each refuse the file in one line,
    where without the check the image would come back with one pixel changed."""
    out, listing, cols = written
    finished(out, listing)
    path = os.path.join(out, pair_file("sign", 3, "val-00000"))
    before = pq.read_table(path).column(schema.IMAGE).to_pylist()
    flip_in_value(path, before[1])
    after = pq.read_table(path).column(schema.IMAGE).to_pylist()  # unchecked: no error
    assert sum(a != b for a, b in zip(after, before)) == 1
    pairs = Pairs.open(out)  # the size is the manifest's: only the checksum can tell
    message = rf"^{path}: damaged, or not Parquet \(could not verify page integrity"
    for read in (lambda: pairs.read("sign", 3, [schema.IMAGE]),
                 lambda: pairs.take("sign", 3, ["a"]),
                 lambda: list(pairs.batches([schema.IMAGE, schema.TARGET], 4))):
        with pytest.raises(ConfigError, match=message) as e:
            read()
        assert "\n" not in str(e.value)
    assert pairs.read("sign", 1, [schema.IMAGE]).num_rows == 5  # the other files read as before


def test_another_kind_of_output_is_refused(tmp_path):
    storage.write_manifest(str(tmp_path), {schema.M_KIND: "ingest"})
    with pytest.raises(ConfigError, match="is not an attack output"):
        Pairs.open(str(tmp_path))


# --- a whole attack output: its manifest and its summary tables ---------------------------------


@pytest.fixture()
def attack_output(tmp_path) -> str:
    out = str(tmp_path / "attack")
    write_attack(out)
    return out


def _counts(**change):
    return lambda m: {**m, schema.M_COUNTS: {**m[schema.M_COUNTS], **change}}


@pytest.mark.parametrize("change, message", [
    (_counts(pairs="10"), r"'counts' must hold pairs, val_images, noise_images, targets"),
    (_counts(pairs=11), r"counts 11 pairs of 10 \(images x targets x methods\), its files hold 10"),
    (_counts(methods=["sgin"]), "'counts' must hold"),
    (lambda m: {**m, schema.M_FILES: [{k: v for k, v in f.items() if k != "bytes"}
                                      for f in m[schema.M_FILES]]},
     r"a file entry is not \{path, rows, bytes\} of a file inside the output"),
    (lambda m: {**m, schema.M_FILES: [{**f, "path": f["path"].replace("target=", "t=")}
                                      for f in m[schema.M_FILES]]},
     r"lists pairs/method=sign/t=1/val-00000.parquet is not a pairs/method=<m>/target=<t>/"),
    (lambda m: {**m, schema.M_SOURCE: "/data"}, "'source' must be an object"),
    (lambda m: {**m, schema.M_SOURCE: {"data": "/data"}}, "the source's data, model and"),
    (lambda m: {**m, schema.M_TIMINGS: {"total_s": "2.5"}}, "timings' total_s must be seconds"),
    (lambda m: {**m, schema.M_IMAGE_SHAPE: [2, 2]}, r"image_shape must be \[H, W, 3\]"),
])
def test_an_attack_manifest_of_the_wrong_shape_is_one_line(attack_output, change, message):
    from attacks.summary import describe

    storage.write_manifest(attack_output, change(storage.read_manifest(attack_output)))
    with pytest.raises(ConfigError) as e:
        describe(attack_output)
    assert "\n" not in str(e.value) and re.search(message, str(e.value)), str(e.value)
    assert str(e.value).startswith(f"{attack_output}")


def test_a_damaged_summary_table_is_named(attack_output):
    from attacks.summary import read_summary

    path = os.path.join(attack_output, schema.SUMMARY_DIR, schema.SUMMARY_METHODS)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-1])
    with pytest.raises(ConfigError, match=rf"^{path} has {len(data) - 1} bytes, its manifest "
                                          rf"says {len(data)}: the file is damaged$"):
        read_summary(attack_output)
    open(path, "wb").write(data[:40] + bytes([data[40] ^ 1]) + data[41:])
    with pytest.raises(ConfigError, match=rf"^{path}: damaged: its sha256 is not the one its "
                                          "manifest records$"):
        read_summary(attack_output)
    open(path, "wb").write(data)
    m = storage.read_manifest(attack_output)
    m[schema.M_FILES] = [{k: v for k, v in f.items() if k != "sha256"}
                         for f in m[schema.M_FILES]]
    storage.write_manifest(attack_output, m)
    with pytest.raises(ConfigError, match=rf"{schema.SUMMARY_TARGETS}: the manifest records no "
                                          "sha256 of it"):
        read_summary(attack_output)


def test_the_summary_tables_name_their_classes(attack_output):
    from attacks.summary import read_summary

    tables = read_summary(attack_output)
    names = schema.class_names(storage.read_manifest(attack_output))
    for table, index, name in (("targets", schema.TARGET, schema.TARGET_NAME),
                               ("sources", schema.LABEL, schema.SOURCE_NAME)):
        t = tables[table]
        assert t.schema.field(name).type == schema.CLASS_NAME and t.num_rows > 0
        assert t.column(name).to_pylist() == [names[k] for k in t.column(index).to_pylist()]
        assert t.column_names.index(name) == t.column_names.index(index) + 1
