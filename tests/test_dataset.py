"""The ingested dataset's contract (common/dataset.py): a manifest that disagrees with its data is
one line, found before any cluster work starts."""

from __future__ import annotations

import re
import shutil
import types

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common import dataset, schema, storage
from common.errors import ConfigError
from pipelines import decoded, ingest, sink
from training import train

CLASSES = ["n01440764", "n01443537", "n01484850", "n01491361"]
SIDE = 4  # write_ingest's images: 4x4x3


def write_ingest(out: str) -> dict:
    """A small ingest output: the sink's files (its write task, without Ray), the quarantine
    file and a manifest as pipelines.ingest writes them."""
    rng = np.random.default_rng(0)
    D = SIDE * SIDE * 3
    files, counts, results = [], {}, []
    for split, n in (("train", 9), ("val", 6)):
        labels = np.arange(n) % len(CLASSES)
        X = rng.integers(0, 256, (n, D), dtype=np.uint8)
        sums = X.reshape(n, -1, 3).astype(np.int64)
        table = pa.Table.from_pydict({
            schema.IMAGE_ID: [f"{split}_{i:03d}" for i in range(n)],
            schema.LABEL: labels.astype(np.int16), schema.WNID: [CLASSES[k] for k in labels],
            schema.IMAGE: [x.tobytes() for x in X], schema.SOURCE: [f"{split}/{i}.JPEG"
                                                                    for i in range(n)],
            schema.ORIG_WIDTH: [500] * n, schema.ORIG_HEIGHT: [375] * n, schema.REASON: [None] * n,
            decoded.PX_SUM: sums.sum(1).tolist(), decoded.PX_SUMSQ: (sums**2).sum(1).tolist(),
            decoded.DECODE_START: [0.0] * n, decoded.DECODE_END: [1.0] * n,
            decoded.DECODE_CPU: [0.5] + [0.0] * (n - 1)}, schema=decoded.DECODED_SCHEMA)
        writer = sink.ImagesDatasink(out, split, rows_per_file=4, size=SIDE)
        r = writer.write([table], types.SimpleNamespace(task_idx=0))
        files.append({"path": r["file"], "rows": r["rows"], "bytes": r["bytes"]})
        counts[split] = {"seen": n + 1, "written": n, "quarantined": 1}
        results += [r] if split == "train" else []
    files.append(ingest._write_quarantine(out, [
        {schema.SOURCE: f"{s}/bad.JPEG", schema.SPLIT: s, schema.REASON: "truncated"}
        for s in ("train", "val")]))
    mean, std = ingest._pixel_stats(results, SIDE)
    manifest = {schema.M_KIND: "ingest", schema.M_SOURCE: "/sources/imagenet",
                schema.M_CLASSES: CLASSES, schema.M_CLASS_NAMES: ["tench", "goldfish", "", "ray"],
                schema.M_IMAGE_SHAPE: [SIDE, SIDE, 3], schema.M_COUNTS: counts,
                schema.M_PIXEL_MEAN: mean, schema.M_PIXEL_STD: std,
                schema.M_RESIZE: {"mode": "squash", "filter": "box", "draft": False},
                schema.M_FILES: files, **schema.stamp({"size": SIDE}, {"total_s": 1.0})}
    storage.write_manifest(out, manifest)
    return manifest


@pytest.fixture()
def data(ingested, tmp_path) -> str:
    out = str(tmp_path / "data")
    shutil.copytree(ingested, out)
    return out


def _edit_manifest(data: str, **changes) -> None:
    m = storage.read_manifest(data)
    storage.write_manifest(data, {**m, **changes})


def test_the_real_ingest_passes(ingested):
    assert dataset.open_ingest(ingested, splits=schema.SPLITS)[schema.M_KIND] == "ingest"


@pytest.mark.parametrize("change, message", [
    (lambda m: {schema.M_CLASSES: m[schema.M_CLASSES][:2],
                schema.M_CLASS_NAMES: (m.get(schema.M_CLASS_NAMES) or [None] * 2)[:2] if m.get(
                    schema.M_CLASS_NAMES) else None},
     r"has labels 0\.\.3, but the manifest lists 2 classes"),
    (lambda m: {schema.M_CLASSES: ["n0", "n1", "n2", "n3"]},
     "disagree with the manifest's class list"),
    (lambda m: {schema.M_IMAGE_SHAPE: [32, 32, 3]}, "is 12288 bytes, not the 3072 bytes"),
    (lambda m: {schema.M_IMAGE_SHAPE: [64, 64]}, r"image_shape must be \[H, W, 3\]"),
    (lambda m: {schema.M_CLASSES: ["n1", "n1"]}, "distinct WNIDs"),
    (lambda m: {schema.M_FILES: [{**f, "rows": f.get("rows", 0) + 1} for f in m[schema.M_FILES]],
                schema.M_COUNTS: {s: {**c, "seen": c["seen"] + 1, "written": c["written"] + 1}
                                  for s, c in m[schema.M_COUNTS].items()}},
     "rows, its manifest says"),
])
def test_a_manifest_that_disagrees_with_the_data_is_one_line(data, change, message):
    _edit_manifest(data, **change(storage.read_manifest(data)))
    with pytest.raises(ConfigError, match=message) as e:
        dataset.open_ingest(data, splits=schema.SPLITS)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=message):  # the training job checks it before Ray
        train.check(train.Settings(data=data, output=data + "-model"))


def test_a_missing_or_foreign_file_is_one_line(data):
    m = storage.read_manifest(data)
    path = dataset.split_files(data, m, "val")[0]
    pq.write_table(pq.read_table(path).drop_columns([schema.WNID]), path)
    with pytest.raises(ConfigError, match="column 'wnid' is missing"):
        dataset.open_ingest(data, splits=("val",))
    storage.delete_file(path)
    with pytest.raises(ConfigError, match="is listed in the manifest but missing"):
        dataset.open_ingest(data, splits=("val",))


def test_a_flipped_bit_in_a_page_is_named_by_the_attacks_read(data):
    """A bit flipped inside a data page of the images (the file keeps its size and its footer):
    the attack's read (read_rows) checks each page against its CRC-32 and stops in one line
    naming the file, as do the other reads of the split."""
    m = dataset.open_ingest(data, splits=("val",))
    files, counts = dataset.split_files(data, m, "val"), dataset.split_counts(m, "val")
    meta = pq.ParquetFile(files[0]).metadata
    chunk = meta.row_group(0).column(meta.schema.to_arrow_schema().get_field_index(schema.IMAGE))
    with open(files[0], "r+b") as f:  # the middle of the chunk: past its one page's header
        f.seek(chunk.data_page_offset + chunk.total_compressed_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x04]))
    with pytest.raises(ConfigError) as e:
        list(dataset.read_rows(files, counts, 0, sum(counts), 64, dataset.num_features(m)))
    assert str(e.value).startswith(f"{files[0]}: damaged, or not Parquet (could not verify page "
                                   "integrity, CRC checksum verification failed")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=f"^{files[0]}: damaged"):  # the report's read
        dataset.rows_by_id(files, [pq.read_table(files[0]).column(schema.IMAGE_ID)[-1].as_py()],
                           [schema.IMAGE])
    with pytest.raises(ConfigError, match=f"^{files[0]}: damaged"):  # its first row: that page
        dataset.open_ingest(data, splits=("val",))


# --- a small ingest output, without Ray ------------------------------------------------------


@pytest.fixture()
def small(tmp_path) -> str:
    out = str(tmp_path / "small")
    write_ingest(out)
    return out


def test_the_small_ingest_reads_back(small):
    m = dataset.open_ingest(small, splits=schema.SPLITS)
    rows = list(dataset.read_rows(dataset.split_files(small, m, "val"),
                                  dataset.split_counts(m, "val"), 1, 5, 3, SIDE * SIDE * 3))
    assert [t.num_rows for t in rows] == [3, 1]
    assert rows[0].column(schema.IMAGE_ID).to_pylist() == ["val_001", "val_002", "val_003"]


def _without(key: str):
    return lambda m: {k: v for k, v in m.items() if k != key}


def _with(key: str, value):
    return lambda m: {**m, key: value(m) if callable(value) else value}


@pytest.mark.parametrize("change, message", [
    (_without(schema.M_FILES), "'files' must list the output's files, got None$"),
    (_with(schema.M_FILES, lambda m: {"val": m[schema.M_FILES]}), "'files' must list"),
    (_with(schema.M_FILES, lambda m: [{**f, "path": "/" + f["path"]} for f in m[schema.M_FILES]]),
     "a file entry is not {path, rows, bytes} of a file inside the output"),
    (_with(schema.M_FILES, lambda m: [{**f, "path": "val/../" + f["path"]}
                                      for f in m[schema.M_FILES]]), "a file entry is not"),
    (_with(schema.M_FILES, lambda m: [{**f, "rows": str(f["rows"])} for f in m[schema.M_FILES]]),
     "a file entry is not"),
    (_with(schema.M_FILES, lambda m: m[schema.M_FILES][1:]),
     r"the counts of 'train' .* disagree with each other or with its files' 0 rows"),
    (_with(schema.M_COUNTS, lambda m: {"val": m[schema.M_COUNTS]["val"]}),
     "lists train/part-00000.parquet of a split without counts"),
    (_with(schema.M_COUNTS, lambda m: {**m[schema.M_COUNTS], "val": {"written": -6}}),
     "'counts' must hold each split's written"),
    (_with(schema.M_COUNTS, lambda m: {**m[schema.M_COUNTS], "val": {"written": 6.0}}),
     "'counts' must hold"),
    (_with(schema.M_COUNTS, lambda m: {**m[schema.M_COUNTS], "val": {"written": True}}),
     "'counts' must hold"),
    (_with(schema.M_CLASS_NAMES, ["tench"]), "'class_names' must be null or name each"),
    (_with(schema.M_PIXEL_MEAN, [1, 2]), "'pixel_mean' must be null or 3 numbers"),
    (_with(schema.M_IMAGE_SHAPE, [4.0, 4, 3]), r"image_shape must be \[H, W, 3\]"),
    (_with(schema.M_CLASSES, "n01440764"), "'classes' must list distinct WNIDs"),
])
def test_a_manifest_of_the_wrong_shape_is_one_line_naming_it(small, change, message):
    storage.write_manifest(small, change(storage.read_manifest(small)))
    with pytest.raises(ConfigError) as e:
        dataset.open_ingest(small, splits=schema.SPLITS)
    assert str(e.value).startswith(f"{small}/manifest.json: ") and "\n" not in str(e.value)
    assert re.search(message, str(e.value)), str(e.value)


def test_files_without_rows_are_named_where_the_rows_are_needed(small):
    """The rows of each file are optional for training (Ray Data reads the footers) and needed
    by the attack, which reads rows by number."""
    m = storage.read_manifest(small)
    m[schema.M_FILES] = [{"path": f["path"]} for f in m[schema.M_FILES]]
    storage.write_manifest(small, m)
    m = dataset.open_ingest(small, splits=schema.SPLITS)
    with pytest.raises(ConfigError, match="the ingest manifest lists 'val' files without their "
                                          "rows"):
        dataset.split_counts(m, "val")


def test_an_unlisted_parquet_file_in_a_split_is_named(small):
    extra = f"{small}/val/part-00009.parquet"
    shutil.copy(f"{small}/val/part-00000.parquet", extra)
    with pytest.raises(ConfigError, match=rf"^{extra} is not listed in the manifest \(1 such "
                                          r"files\): not this ingest's$"):
        dataset.open_ingest(small, splits=("val",))
    shutil.move(extra, f"{small}/val/notes.txt")  # what is not Parquet is not a reader's business
    assert dataset.open_ingest(small, splits=("val",))
