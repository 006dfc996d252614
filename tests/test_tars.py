"""ImageNet's tarballs read in place (pipelines/tars.py, sources.py, ingest.py).

The tests build the tarballs from real photographs in ImageNet's layout (a train tar of per-class
inner tars, a flat val tar, LOC_val_solution.csv) and compare with the same images as folders.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from benchmarks import photos
from common import schema, storage
from common.errors import ConfigError
from pipelines import devkit, ingest, sources, tars
from tests.test_ingest import manifest_of, read_split
from tests.trees import tree_digest

CLASSES, PER_CLASS, VAL = 3, 4, 6


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def folder_tree(root) -> None:
    """Photos as folders: train/<wnid>/, flat val/ with LOC_val_solution.csv, synset names."""
    rng = np.random.default_rng(5)
    wnids = [f"n{9_000_000 + k:08d}" for k in range(CLASSES)]
    for wnid in wnids:
        os.makedirs(root / "train" / wnid)
        for i in range(PER_CLASS):
            (root / "train" / wnid / f"{wnid}_{i}.JPEG").write_bytes(photos.jpeg(rng))
    os.makedirs(root / "val")
    lines = ["ImageId,PredictionString"]
    for i in range(1, VAL + 1):
        image_id = f"ILSVRC2012_val_{i:08d}"
        (root / "val" / f"{image_id}.JPEG").write_bytes(photos.jpeg(rng))
        lines.append(f"{image_id},{wnids[i % CLASSES]} 1 2 3 4")
    (root / sources.VAL_CSV).write_text("\n".join(lines) + "\n")
    (root / sources.SYNSETS).write_text("".join(f"{w} class {w}\n" for w in wnids))


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("tars")
    folder_tree(root / "folders")
    tars.pack(str(root / "folders"), str(root / "tars"), also=(sources.VAL_CSV, sources.SYNSETS))
    return root / "folders", root / "tars"


def test_index_gives_each_members_exact_bytes(layouts):
    """Oracle: tarfile's own extraction of every member, inner tars opened by tarfile too."""
    path = layouts[1] / sources.TARS["train"]
    data = path.read_bytes()
    members, problem = tars.index(pa.BufferReader(data), len(data))
    assert problem is None and all(m.problem is None for m in members)
    expected = {}
    with tarfile.open(path) as outer:
        for info in outer:
            with tarfile.open(fileobj=outer.extractfile(info)) as inner:
                for i in inner:
                    expected[f"{info.name}/{i.name}"] = inner.extractfile(i).read()
    assert len(expected) == CLASSES * PER_CLASS
    assert {m.name: data[m.offset:m.offset + m.size] for m in members} == expected


def test_a_truncated_tar_keeps_whole_members_and_names_the_cut_one(layouts):
    data = (layouts[1] / sources.TARS["train"]).read_bytes()
    whole, _ = tars.index(pa.BufferReader(data), len(data))
    cut = whole[5].offset + 100  # inside the sixth image
    members, problem = tars.index(pa.BufferReader(data[:cut]), cut)
    assert [m.name for m in members] == [m.name for m in whole[:6]]
    assert all(m.problem is None for m in members[:5])
    assert members[5].problem == f"truncated tar ({whole[5].name.split('/')[0]}): 100 of this " \
                                 f"member's {whole[5].size} bytes"
    members, problem = tars.index(pa.BufferReader(data[:300]), 300)
    assert members == [] and problem.startswith("damaged tar (archive) after 0 members")


def test_tar_listing_labels_the_rows_as_the_folders(layouts):
    folders, tarred = (sources.scan(str(p), schema.SPLITS) for p in layouts)
    assert tarred.classes == folders.classes and tarred.class_names == folders.class_names
    assert tarred.quarantine == []
    for split in schema.SPLITS:
        cols = [schema.IMAGE_ID, schema.WNID, schema.LABEL]
        assert tarred.files[split].select(cols).equals(folders.files[split].select(cols))
    first = tarred.files["train"].to_pylist()[0]
    assert first[schema.SOURCE] == f"{sources.TARS['train']}/n09000000.tar/n09000000_0.JPEG"


def same_rows(a: str, b: str) -> None:
    for split in schema.SPLITS:
        x, y = read_split(a, split), read_split(b, split)
        assert x.num_rows > 0
        assert x.drop_columns([schema.SOURCE]).equals(y.drop_columns([schema.SOURCE]))
    assert manifest_of(a)[schema.M_COUNTS] == manifest_of(b)[schema.M_COUNTS]
    assert manifest_of(a)[schema.M_PIXEL_MEAN] == manifest_of(b)[schema.M_PIXEL_MEAN]


@pytest.mark.slow
def test_tar_ingest_gives_the_folder_ingests_rows_local_and_s3(layouts, ray_local, bucket,
                                                                tmp_path):
    folders, tarred = layouts
    before = tree_digest(tarred)
    for src, out in ((folders, "folders"), (tarred, "tars")):
        ingest.run(ingest.Settings(source=str(src), output=str(tmp_path / out)))
    assert tree_digest(tarred) == before
    same_rows(str(tmp_path / "tars"), str(tmp_path / "folders"))
    prefix = f"{bucket}/tars-{uuid.uuid4().hex[:8]}"
    fs, path = storage.filesystem(prefix)
    pafs.copy_files(str(tarred), f"{path}/src", destination_filesystem=fs)
    ingest.run(ingest.Settings(source=f"{prefix}/src", output=f"{prefix}/out", images_per_task=5))
    same_rows(f"{prefix}/out", str(tmp_path / "folders"))


@pytest.mark.slow
def test_a_truncated_train_tar_is_ingested_up_to_the_damage(layouts, ray_local, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(layouts[1], src)
    data = (src / sources.TARS["train"]).read_bytes()
    whole, _ = tars.index(pa.BufferReader(data), len(data))
    (src / sources.TARS["train"]).write_bytes(data[:whole[5].offset + 100])
    m = ingest.run(ingest.Settings(source=str(src), output=str(tmp_path / "out"),
                                   splits=("train",)))
    assert m[schema.M_COUNTS]["train"] == {"seen": 6, "written": 5, "quarantined": 1}
    q = pq.read_table(tmp_path / "out" / schema.QUARANTINE_DIR).to_pylist()
    assert [r[schema.SOURCE] for r in q] == [f"{sources.TARS['train']}/{whole[5].name}"]
    assert q[0][schema.REASON].startswith("truncated tar (n09000001.tar): 100 of this member's")


def devkit_bytes(wnids: list[str], truth: list[int]) -> bytes:
    """ILSVRC2012_devkit_t12.tar.gz as image-net.org ships it: data/meta.mat (a 1 x N struct
    array ``synsets``, the 1000 classes first, then WordNet's inner nodes with IDs above 1000)
    and data/ILSVRC2012_validation_ground_truth.txt (one ILSVRC2012_ID per line)."""
    from scipy.io import savemat

    dt = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    rows = [(i + 1, w, f"words of {w}", 0) for i, w in enumerate(wnids)]
    rows.append((1001, "n00001740", "entity", len(wnids)))
    meta = io.BytesIO()
    savemat(meta, {"synsets": np.array(rows, dtype=dt).reshape(-1, 1)})
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        add(tar, "ILSVRC2012_devkit_t12/data/meta.mat", meta.getvalue())
        add(tar, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt",
            "".join(f"{t}\n" for t in truth).encode())
    return buf.getvalue()


def test_devkit_labels_the_val_tar_as_the_csv_does(layouts, tmp_path):
    """The ground truth's IDs, through meta.mat, give the same labels as LOC_val_solution.csv."""
    folders, tarred = layouts
    src = tmp_path / "devkit"
    shutil.copytree(tarred, src)
    os.remove(src / sources.VAL_CSV)
    os.remove(src / sources.SYNSETS)
    wnids = sorted(os.listdir(folders / "train"))
    csv_rows = (folders / sources.VAL_CSV).read_text().splitlines()[1:]
    truth = [wnids.index(r.split(",")[1].split()[0]) + 1 for r in csv_rows]
    truth.append(2)  # a label for an image that is not there: no harm
    (src / devkit.DEVKIT).write_bytes(devkit_bytes(wnids, truth))
    listing = sources.scan(str(src), schema.SPLITS)
    expected = sources.scan(str(folders), schema.SPLITS)
    cols = [schema.IMAGE_ID, schema.WNID, schema.LABEL]
    assert listing.files["val"].select(cols).equals(expected.files["val"].select(cols))
    assert listing.class_names == [f"words of {w}" for w in wnids]


def test_a_devkit_without_ground_truth_is_one_clear_error(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        add(tar, "ILSVRC2012_devkit_t12/data/meta.mat", b"")
    with pytest.raises(ConfigError, match="lacks data/ILSVRC2012_validation_ground_truth.txt"):
        devkit.read_devkit(buf.getvalue())


@pytest.mark.parametrize("gap", [ingest.TAR_GAP, 0])  # one ranged read, or one read a member
def test_a_batch_of_tar_members_fetches_each_members_bytes(layouts, monkeypatch, gap):
    monkeypatch.setattr(ingest, "TAR_GAP", gap)
    folders, tarred = layouts
    listing = sources.scan(str(tarred), ("train",))
    far_apart = listing.files["train"].take([0, 5, CLASSES * PER_CLASS - 1])
    blobs = ingest.fetch_batch(far_apart, str(tarred))
    for row, data in zip(far_apart.to_pylist(), blobs):
        path = folders / "train" / row[schema.WNID] / f"{row[schema.IMAGE_ID]}.JPEG"
        assert data == path.read_bytes()


@pytest.mark.slow
def test_the_samples_hostile_files_in_tarballs_are_quarantined_as_from_folders(
        sample_dir, ingested, tmp_path):
    """Empty, truncated, random, text, bomb and unlabelled files: the same reasons, counts, rows."""
    src, out = tmp_path / "src", str(tmp_path / "out")
    tars.pack(str(sample_dir), str(src), also=(sources.VAL_CSV, sources.SYNSETS))
    ingest.run(ingest.Settings(source=str(src), output=out))
    same_rows(out, ingested)

    def reasons(path: str) -> list[tuple[str, str]]:
        rows = pq.read_table(os.path.join(path, schema.QUARANTINE_DIR)).to_pylist()
        return sorted((os.path.basename(r[schema.SOURCE]), r[schema.REASON]) for r in rows)

    assert len(reasons(ingested)) >= 5 and reasons(out) == reasons(ingested)
