"""Finding images and labels in ImageNet's layouts (pipelines/sources.py). Real files, no Ray."""

from __future__ import annotations

import csv
import os
import shutil

import pytest

from common import schema
from common.errors import ConfigError
from pipelines import sources


def val_csv_labels(root) -> dict[str, str]:
    """Read the Kaggle CSV independently: image id -> first token of PredictionString."""
    with open(os.path.join(root, sources.VAL_CSV), newline="") as f:
        return {row[0]: row[1].split()[0] for row in list(csv.reader(f))[1:]}


def files_under(root, split) -> int:
    return sum(len(files) for _, _, files in os.walk(os.path.join(root, split)))


def test_sample_layout_is_fully_accounted_for(sample_dir):
    listing = sources.scan(str(sample_dir), ("train", "val"))
    mapping = [line.split()[0] for line in open(sample_dir / sources.SYNSETS)]
    assert listing.classes == sorted(mapping)
    assert listing.class_names[0] == "tench, Tinca tinca"
    for split in ("train", "val"):
        listed = listing.files[split].num_rows
        quarantined = sum(q[schema.SPLIT] == split for q in listing.quarantine)
        assert listed + quarantined == files_under(sample_dir, split)


def test_flat_val_labels_come_from_the_csv(sample_dir):
    listing = sources.scan(str(sample_dir), ("val",))
    expected = val_csv_labels(sample_dir)
    rows = listing.files["val"].to_pylist()
    assert rows and all(r[schema.WNID] == expected[r[schema.IMAGE_ID]] for r in rows)
    assert all(r[schema.LABEL] == listing.classes.index(r[schema.WNID]) for r in rows)
    unlabelled = [q for q in listing.quarantine if q[schema.SPLIT] == "val"]
    assert [q[schema.REASON] for q in unlabelled] == [f"no label in {sources.VAL_CSV}"]
    assert os.path.basename(unlabelled[0][schema.SOURCE])[:-5] not in expected


def test_train_labels_are_sorted_wnid_indices(sample_dir):
    listing = sources.scan(str(sample_dir), ("train",))
    for row in listing.files["train"].to_pylist():
        assert row[schema.SOURCE] == f"train/{row[schema.WNID]}/{row[schema.IMAGE_ID]}.JPEG"
        assert row[schema.LABEL] == sorted(listing.classes).index(row[schema.WNID])


def test_limit_per_class(sample_dir):
    listing = sources.scan(str(sample_dir), ("train",), limit_per_class=3)
    labels = listing.files["train"].column(schema.LABEL).to_pylist()
    assert sorted(labels) == sorted(list(range(4)) * 3)


def test_class_folder_val_and_no_mapping(tmp_path, sample_dir):
    """val/<wnid>/ folders, no synset file: classes come from the training folders."""
    root = tmp_path / "root"
    shutil.copytree(sample_dir / "train", root / "train")
    wnid = sorted(os.listdir(root / "train"))[1]
    os.makedirs(root / "val" / wnid)
    shutil.copy(root / "train" / wnid / f"{wnid}_3.JPEG", root / "val" / wnid / "v1.JPEG")
    os.makedirs(root / "val" / "n00000000")
    shutil.copy(root / "train" / wnid / f"{wnid}_4.JPEG", root / "val" / "n00000000" / "v2.JPEG")
    listing = sources.scan(str(root), ("train", "val"))
    assert listing.class_names is None
    assert listing.classes == sorted(os.listdir(sample_dir / "train"))
    assert listing.files["val"].to_pylist()[0][schema.LABEL] == 1
    assert [q[schema.REASON] for q in listing.quarantine] == [
        "class folder 'n00000000' is not a known class"
    ]


def test_kaggle_layout_is_found(tmp_path, sample_dir):
    root = tmp_path / "kaggle"
    shutil.copytree(sample_dir / "train", root / sources.KAGGLE_IMAGES / "train")
    shutil.copy(sample_dir / sources.SYNSETS, root / sources.SYNSETS)
    listing = sources.scan(str(root), ("train",))
    assert listing.files["train"].num_rows > 0
    assert listing.files["train"].to_pylist()[0][schema.SOURCE].startswith(sources.KAGGLE_IMAGES)


def test_flat_val_without_labels_fails_fast(tmp_path, sample_dir):
    shutil.copytree(sample_dir / "val", tmp_path / "val")
    with pytest.raises(ConfigError, match="no LOC_val_solution.csv"):
        sources.scan(str(tmp_path), ("val",))


def test_source_without_images_fails_fast(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(ConfigError, match="no images found"):
        sources.scan(str(tmp_path), ("train", "val"))
    with pytest.raises(ConfigError, match="does not exist"):
        sources.scan(str(tmp_path / "missing"), ("train",))
