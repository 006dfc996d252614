"""The ingest job end to end (pipelines/ingest.py): real files, local Ray, the real local S3."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from common import schema, storage
from common.errors import ConfigError
from pipelines import images, ingest, sample, sources
from tests.trees import tree_digest

pytestmark = pytest.mark.slow


def read_split(out: str, split: str):
    """All rows of one split, with pyarrow alone, sorted by image id."""
    fs, path = storage.filesystem(storage.join(out, split))
    return pads.dataset(path, filesystem=fs, format="parquet").to_table().sort_by(schema.IMAGE_ID)


def manifest_of(out: str) -> dict:
    return storage.read_manifest(out)


def test_schema_and_manifest_follow_the_contract(ingested, sample_dir):
    m = manifest_of(ingested)
    for key in (schema.M_CLASSES, schema.M_CLASS_NAMES, schema.M_IMAGE_SHAPE, schema.M_COUNTS,
                schema.M_PIXEL_MEAN, schema.M_PIXEL_STD, schema.M_RESIZE, schema.M_VERSIONS,
                schema.M_TIMINGS, schema.M_FILES, schema.M_CONFIG):
        assert key in m, key
    assert m[schema.M_IMAGE_SHAPE] == [64, 64, 3]
    assert m[schema.M_CLASSES] == sorted(json.loads((sample_dir / "sample.json").read_text())
                                         ["classes"])
    for split in schema.SPLITS:
        table = read_split(ingested, split)
        assert table.schema.equals(schema.IMAGES_SCHEMA, check_metadata=False)
        assert all(len(v) == 64 * 64 * 3 for v in table.column(schema.IMAGE).to_pylist())
        # each file says how to decode its images, without the manifest
        assert schema.image_shape_of(table.schema.field(schema.IMAGE)) == (64, 64, 3)
    for f in m[schema.M_FILES]:  # sizes in the manifest are the real ones
        assert os.path.getsize(os.path.join(ingested, f["path"])) == f["bytes"]


def test_every_input_is_accounted_for(ingested, sample_dir):
    m = manifest_of(ingested)
    quarantine = pq.read_table(os.path.join(ingested, schema.QUARANTINE_DIR)).to_pylist()
    for split in schema.SPLITS:
        c = m[schema.M_COUNTS][split]
        on_disk = sum(len(f) for _, _, f in os.walk(sample_dir / split))
        assert c["seen"] == on_disk == c["written"] + c["quarantined"]
        assert c["written"] == read_split(ingested, split).num_rows
        assert c["quarantined"] == sum(q[schema.SPLIT] == split for q in quarantine)


def test_hostile_files_are_quarantined_with_their_reason(ingested, sample_dir):
    info = json.loads((sample_dir / "sample.json").read_text())
    quarantine = {q[schema.SOURCE]: q[schema.REASON]
                  for q in pq.read_table(os.path.join(ingested, "quarantine")).to_pylist()}
    expected = {"empty": "empty file", "truncated": "truncated", "random bytes": "not an image",
                "text": "not an image", "decompression bomb": "decompression bomb",
                "unlabelled": "no label"}
    assert set(quarantine) == {h["path"] for h in info["hostile"]}
    for h in info["hostile"]:
        assert expected[h["why"]] in quarantine[h["path"]], (h, quarantine[h["path"]])


def test_odd_formats_become_rows_equal_to_an_independent_decode(ingested, sample_dir):
    info = json.loads((sample_dir / "sample.json").read_text())
    rows = {r[schema.SOURCE]: r for split in schema.SPLITS
            for r in read_split(ingested, split).to_pylist()}
    assert {o["kind"] for o in info["odd"]} == {"cmyk", "gray", "png", "rgba_png"}
    for odd in info["odd"]:
        row = rows[odd["path"]]
        data = (sample_dir / odd["path"]).read_bytes()
        full, (w, h) = images.to_pixels(data, 64, draft=False)
        got = np.frombuffer(row[schema.IMAGE], np.uint8).reshape(64, 64, 3)
        assert (row[schema.ORIG_WIDTH], row[schema.ORIG_HEIGHT]) == (w, h)
        assert np.abs(got.astype(int) - full).mean() <= 4.0, odd  # the draft-decoding bound


def test_labels_match_folders_and_val_csv(ingested, sample_dir):
    classes = manifest_of(ingested)[schema.M_CLASSES]
    for row in read_split(ingested, "train").to_pylist():
        assert row[schema.SOURCE].split("/")[1] == row[schema.WNID]
        assert classes[row[schema.LABEL]] == row[schema.WNID]
    csv_rows = (sample_dir / sources.VAL_CSV).read_text().splitlines()[1:]
    truth = {line.split(",")[0]: line.split(",")[1].split()[0] for line in csv_rows}
    for row in read_split(ingested, "val").to_pylist():
        assert row[schema.WNID] == truth[row[schema.IMAGE_ID]]
        assert classes[row[schema.LABEL]] == row[schema.WNID]


def test_pixel_statistics_match_numpy(ingested):
    train = read_split(ingested, "train")
    px = np.frombuffer(b"".join(train.column(schema.IMAGE).to_pylist()), np.uint8).reshape(-1, 3)
    m = manifest_of(ingested)
    np.testing.assert_allclose(m[schema.M_PIXEL_MEAN], px.mean(0), atol=1e-3)
    np.testing.assert_allclose(m[schema.M_PIXEL_STD], px.std(0), atol=1e-3)


def test_rerun_refuses_and_overwrite_replaces(ingested, sample_dir, tmp_path):
    with pytest.raises(ConfigError, match="already holds a finished ingest output.*--overwrite"):
        ingest.run(ingest.Settings(source=str(sample_dir), output=ingested))
    stale = tmp_path / "stale"
    (stale / "train").mkdir(parents=True)  # data no ingest recorded writing: never adopted
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match="holds train without _identity.json"):
            ingest.run(ingest.Settings(source=str(sample_dir), output=str(stale),
                                       overwrite=overwrite))
    assert os.listdir(stale) == ["train"]
    out = str(tmp_path / "partial")
    cfg = ingest.Settings(source=str(sample_dir), output=out, splits=("val",), size=32)
    ingest.output(cfg).prepare(False)  # what a killed run leaves: its record and some data
    os.makedirs(os.path.join(out, "val"))
    open(os.path.join(out, "val", "part-09999.parquet"), "wb").write(b"half a file")
    open(os.path.join(out, "notes.txt"), "w").write("the user's own")
    m = ingest.run(cfg)  # the same ingest starts again from scratch
    assert m[schema.M_IMAGE_SHAPE] == [32, 32, 3] and set(m[schema.M_COUNTS]) == {"val"}
    assert "part-09999.parquet" not in os.listdir(os.path.join(out, "val"))
    m = ingest.run(ingest.Settings(source=str(sample_dir), output=out, overwrite=True,
                                   splits=("val",), resize="crop", size=16))
    assert m[schema.M_IMAGE_SHAPE] == [16, 16, 3]
    assert sorted(os.listdir(out)) == ["_identity.json", "manifest.json", "notes.txt",
                                       "quarantine", "val"]


@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_an_output_overlapping_the_source_is_refused_and_the_source_untouched(
        sample_dir, tmp_path, where):
    src = tmp_path / "src"
    shutil.copytree(sample_dir / "val", src / "val")
    before = tree_digest(src)
    output = {"same": src, "inside": src / "val" / "out", "parent": tmp_path}[where]
    with pytest.raises(ConfigError, match="choose an output apart from the job's inputs"):
        ingest.run(ingest.Settings(source=str(src), output=str(output), overwrite=True))
    assert tree_digest(src) == before


def test_file_size_option_splits_files(sample_dir, ray_local, tmp_path):
    """At 16x16 (768 bytes a row) and 1 MiB files the split needs several files."""
    big = tmp_path / "big"
    sample.generate(sample.Settings(output=str(big), kind="shapes", classes=2,
                                    train_per_class=1500,
                                    val_per_class=0, oddities=False, num_workers=2))
    out = str(tmp_path / "out")
    m = ingest.run(ingest.Settings(source=str(big), output=out, splits=("train",), size=16,
                                   file_size_mb=1, images_per_task=256))
    files = [f for f in m[schema.M_FILES] if f["path"].startswith("train/")]
    assert len(files) >= 2
    assert all(f["rows"] <= 1365 + 256 for f in files)  # 1 MiB / 768 B, plus at most one batch
    assert sum(f["rows"] for f in files) == m[schema.M_COUNTS]["train"]["written"] == 3000
    assert len(set(read_split(out, "train").column(schema.IMAGE_ID).to_pylist())) == 3000


def test_local_and_s3_give_identical_rows(ingested, sample_dir, bucket):
    prefix = f"{bucket}/ingest-{uuid.uuid4().hex[:8]}"
    fs, path = storage.filesystem(prefix)
    pafs.copy_files(str(sample_dir), f"{path}/src", destination_filesystem=fs)
    ingest.run(ingest.Settings(source=f"{prefix}/src", output=f"{prefix}/out"))
    local, remote = manifest_of(ingested), manifest_of(f"{prefix}/out")
    assert remote[schema.M_COUNTS] == local[schema.M_COUNTS]
    assert remote[schema.M_PIXEL_MEAN] == local[schema.M_PIXEL_MEAN]
    for split in schema.SPLITS:
        assert read_split(f"{prefix}/out", split).equals(read_split(ingested, split))
    q = [pq.read_table(f"{path}/out/quarantine", filesystem=fs), pq.read_table(
        os.path.join(ingested, "quarantine"))]
    assert q[0].sort_by(schema.SOURCE).equals(q[1].sort_by(schema.SOURCE))


def test_fails_fast_before_any_work(sample_dir, tmp_path):
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no images found"):
        ingest.run(ingest.Settings(source=str(empty), output=str(tmp_path / "o1")))
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ConfigError, match="cannot write to"):
        ingest.run(ingest.Settings(source=str(sample_dir), output=str(tmp_path / "a-file" / "o")))
    with pytest.raises(ConfigError, match="--splits"):
        ingest.run(ingest.Settings(source=str(sample_dir), output=str(tmp_path / "o2"),
                                   splits=("test",)))


def test_command_line_error_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.ingest", "--source", str(tmp_path / "none"),
         "--output", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_unreadable_file_stops_the_job_with_its_uri(sample_dir):
    """A listed file that storage cannot deliver is a storage error, not a bad image."""
    batch = sources.scan(str(sample_dir), ("val",)).files["val"].slice(0, 2)
    rows = ingest.decode_batch(batch, str(sample_dir), 64, "squash", True)
    assert rows.num_rows == 2 and rows.column(schema.REASON).null_count == 2
    missing = batch.set_column(0, schema.SOURCE, pa.array(["val/gone.JPEG", "val/x.JPEG"]))
    with pytest.raises(OSError, match=f"cannot read {sample_dir}/val/gone.JPEG"):
        ingest.decode_batch(missing, str(sample_dir), 64, "squash", True)


def test_pixel_sums_and_image_column_match_numpy_and_python():
    """The batch's statistics and image column, built from one buffer, equal the plain ones."""
    rng = np.random.default_rng(0)
    X = rng.integers(0, 256, (5, 7 * 7, 3), dtype=np.uint8)
    X[0] = 255  # the largest squares
    sums, squares = ingest.pixel_sums(X)
    wide = X.astype(np.int64)
    assert (sums == wide.sum(1)).all() and (squares == (wide * wide).sum(1)).all()
    good = np.array([True, False, True, True, False, False, True, True])
    column = ingest.image_array(X.reshape(5, -1), good)
    rows = iter(X.reshape(5, -1))
    expected = pa.array([next(rows).tobytes() if g else None for g in good], pa.binary())
    assert column.equals(expected) and column.null_count == 3
    column.validate(full=True)


def test_the_decode_phase_is_timed_in_the_manifest(ingested):
    """Each split's decode phase: its span (first batch's start to last one's end, within the
    split's time) and the decode tasks' CPU seconds."""
    timings = manifest_of(ingested)[schema.M_TIMINGS]
    for split in schema.SPLITS:
        assert 0 < timings[f"{split}_decode_s"] <= timings[f"{split}_s"]
        assert timings[f"{split}_decode_cpu_s"] > 0
    assert timings["ray_s"] >= 0


@contextlib.contextmanager
def as_user_nobody():
    """Drop the effective uid to nobody when running as root (root reads a chmod 000 file);
    the saved uid stays root, so it is restored afterwards."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


def test_a_local_file_without_read_permission_is_quarantined(sample_dir):
    """chmod 000 on a local file is a bad input: a quarantine row, and the batch goes on."""
    batch = sources.scan(str(sample_dir), ("val",)).files["val"].slice(0, 2)
    rels = batch.column(schema.SOURCE).to_pylist()
    with tempfile.TemporaryDirectory() as tmp:  # not under pytest's 0700 folders: nobody walks it
        os.chmod(tmp, 0o755)
        for rel in rels:
            os.makedirs(os.path.join(tmp, os.path.dirname(rel)), mode=0o755, exist_ok=True)
            with open(os.path.join(tmp, rel), "wb") as f:
                f.write((sample_dir / rel).read_bytes())
        os.chmod(os.path.join(tmp, rels[0]), 0)
        with as_user_nobody():
            rows = ingest.decode_batch(batch, tmp, 64, "squash", True)
    assert rows.column(schema.REASON).to_pylist() == ["unreadable: Permission denied", None]


def test_a_missing_object_on_s3_stops_the_job_with_its_uri(sample_dir, bucket):
    """On S3 a listed object that cannot be fetched (after the SDK's retries) is a storage
    failure, never a quarantined image."""
    root = f"{bucket}/missing-object-{uuid.uuid4().hex[:8]}"
    batch = sources.scan(str(sample_dir), ("val",)).files["val"].slice(0, 1)
    rel = batch.column(schema.SOURCE)[0].as_py()
    storage.write_bytes(storage.join(root, rel), (sample_dir / rel).read_bytes())
    assert ingest.decode_batch(batch, root, 64, "squash", True).column(schema.REASON)[0].as_py() \
        is None
    missing = batch.set_column(0, schema.SOURCE, pa.array(["val/gone.JPEG"]))
    with pytest.raises(OSError, match=f"cannot read {root}/val/gone.JPEG"):
        ingest.decode_batch(missing, root, 64, "squash", True)


def test_a_hostile_tree_is_written_or_quarantined_entry_by_entry(sample_dir, ray_local, tmp_path):
    """A symlink loop, a dangling link, a FIFO, a non-UTF-8 name and a stem in two classes:
    each real image written once with its folder's label, every other entry a quarantine row."""
    src = tmp_path / "src"
    classes = sorted(os.listdir(sample_dir / "train"))[:2]
    for wnid in classes:
        os.makedirs(src / "train" / wnid)
        for n in range(3):
            name = f"{wnid}_{n}.JPEG"
            (src / "train" / wnid / name).write_bytes((sample_dir / "train" / wnid / name)
                                                      .read_bytes())
    a, b = (src / "train" / w for w in classes)
    os.symlink("..", a / "loop")
    os.symlink("nowhere.JPEG", a / "dangling.JPEG")
    os.mkfifo(a / "fifo.JPEG")
    (b / f"{classes[0]}_0.JPEG").write_bytes((a / f"{classes[0]}_0.JPEG").read_bytes())
    with open(os.fsencode(b) + b"/\xff.JPEG", "wb") as f:
        f.write((a / f"{classes[0]}_1.JPEG").read_bytes())
    out = str(tmp_path / "out")
    m = ingest.run(ingest.Settings(source=str(src), output=out, splits=("train",)))
    assert m[schema.M_COUNTS]["train"] == {"seen": 11, "written": 5, "quarantined": 6}
    rows = read_split(out, "train").select([schema.SOURCE, schema.WNID]).to_pylist()
    assert all(r[schema.SOURCE].split("/")[1] == r[schema.WNID] for r in rows)
    q = pq.read_table(os.path.join(out, schema.QUARANTINE_DIR)).to_pylist()
    assert {r[schema.SOURCE]: r[schema.REASON].split(" (")[0] for r in q} == {
        f"train/{classes[0]}/loop": "folder already listed as train",
        f"train/{classes[0]}/dangling.JPEG": "dangling symlink",
        f"train/{classes[0]}/fifo.JPEG": "not a regular file",
        f"train/{classes[1]}/\\xff.JPEG": "file name is not valid UTF-8",
        f"train/{classes[0]}/{classes[0]}_0.JPEG":
            f"image_id '{classes[0]}_0' has conflicting labels",
        f"train/{classes[1]}/{classes[0]}_0.JPEG":
            f"image_id '{classes[0]}_0' has conflicting labels",
    }
