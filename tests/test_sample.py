"""The sample generator (pipelines/sample.py): deterministic, ImageNet layout, learnable classes."""

from __future__ import annotations

import filecmp
import hashlib
import io
import json
import os

import numpy as np
import pyarrow.fs as pafs
import pytest
from PIL import Image

from common import storage
from common.errors import ConfigError
from pipelines import photos, sample

KINDS = ("photos", "shapes")


def small(out, **kw) -> sample.Settings:
    kw.setdefault("kind", "shapes")
    return sample.Settings(output=str(out), classes=4, train_per_class=4, val_per_class=2, **kw)


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_bytes(tmp_path, kind):
    sample.generate(small(tmp_path / "a", num_workers=2, kind=kind))
    sample.generate(small(tmp_path / "b", num_workers=1, kind=kind))
    cmp = filecmp.dircmp(tmp_path / "a", tmp_path / "b")
    assert not cmp.diff_files and not cmp.left_only and not cmp.right_only
    sample.generate(small(tmp_path / "c", seed=1, kind=kind))
    wnid = sample.class_list(1, kind)[0][0]
    first = f"train/{wnid}/{wnid}_3.JPEG"
    assert (tmp_path / "a" / first).read_bytes() != (tmp_path / "c" / first).read_bytes()


@pytest.mark.parametrize("kind", KINDS)
def test_layout_and_formats(tmp_path, kind):
    info = sample.generate(small(tmp_path, kind=kind))
    assert sorted(os.listdir(tmp_path / "train")) == info["classes"]
    assert len(os.listdir(tmp_path / "val")) == 4 * 2 + 3  # + truncated, random, unlabelled
    modes = {o["kind"]: Image.open(tmp_path / o["path"]) for o in info["odd"]}
    assert modes["cmyk"].mode == "CMYK" and modes["gray"].mode == "L"
    assert modes["png"].format == "PNG" and modes["rgba_png"].mode == "RGBA"
    wnid = info["classes"][1]
    w, h = Image.open(tmp_path / f"train/{wnid}/{wnid}_2.JPEG").size
    assert (w, h) in sample.SIZES
    header = (tmp_path / "LOC_val_solution.csv").read_text().splitlines()[0]
    assert header == "ImageId,PredictionString"


@pytest.mark.parametrize("kind", KINDS)
def test_classes_differ_more_than_images_within_a_class(tmp_path, kind):
    """The premise of the demo: a linear model can separate the classes by their pixels."""
    sample.generate(sample.Settings(output=str(tmp_path), kind=kind, classes=3, train_per_class=6,
                                    val_per_class=0, oddities=False, num_workers=1))

    def tiny(path):
        return np.asarray(Image.open(path).convert("RGB").resize((16, 16)), float).ravel()

    means = {}
    spread = []
    for wnid in os.listdir(tmp_path / "train"):
        x = np.stack([tiny(tmp_path / "train" / wnid / f) for f in os.listdir(
            tmp_path / "train" / wnid)])
        means[wnid] = x.mean(0)
        spread.append(np.linalg.norm(x - x.mean(0), axis=1).mean())
    m = list(means.values())
    between = min(np.linalg.norm(a - b) for i, a in enumerate(m) for b in m[i + 1:])
    assert between > np.mean(spread)


def test_writes_to_s3(bucket, tmp_path):
    from pipelines.sample import main

    uri = f"{bucket}/sample-upload"
    main(["--output", uri, "--kind", "shapes", "--classes", "2", "--train-per-class", "2",
          "--val-per-class", "1"])
    fs, path = storage.filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    names = {i.path[len(path) + 1:] for i in infos}
    assert "LOC_val_solution.csv" in names and "train/n01440764/n01440764_1.JPEG" in names
    data = storage.read_bytes(f"{uri}/train/n01440764/n01440764_1.JPEG")
    assert Image.open(io.BytesIO(data)).format == "JPEG"


def test_photos_are_the_packages_files_named_as_imagenet(tmp_path):
    """Each photo class is cut from its package's file (recorded by sha256), under its ILSVRC WNID
    and name where one fits."""
    info = sample.generate(sample.Settings(output=str(tmp_path), classes=10, train_per_class=2,
                                           val_per_class=1, num_workers=2))
    mapping = (tmp_path / "LOC_synset_mapping.txt").read_text().splitlines()
    assert mapping[:3] == ["n02123045 tabby, tabby cat", "n03763968 military uniform",
                           "n03773504 missile"]
    recorded = json.loads((tmp_path / "sample.json").read_text())["photos"]
    assert [p["wnid"] for p in recorded] == info["classes"]
    for k, p in enumerate(recorded):
        with open(photos.path(photos.PHOTOS[k]), "rb") as f:
            assert p["sha256"] == hashlib.sha256(f.read()).hexdigest()


def test_photos_refuse_more_classes_than_photographs(tmp_path):
    with pytest.raises(ConfigError, match="--kind photos has 10 classes, not 11"):
        sample.generate(sample.Settings(output=str(tmp_path), classes=11))
    assert not os.listdir(tmp_path)


def test_a_missing_package_is_one_line():
    with pytest.raises(ConfigError, match="no_such_package is not installed: pip install"):
        photos.path(photos.Photo("n1", "x", "no_such_package", "a.png"))
