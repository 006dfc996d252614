"""The sample generator (pipelines/sample.py): deterministic, ImageNet layout, learnable classes."""

from __future__ import annotations

import filecmp
import io
import os

import numpy as np
import pyarrow.fs as pafs
from PIL import Image

from common import storage
from pipelines import sample


def small(out, **kw) -> sample.Settings:
    return sample.Settings(output=str(out), classes=4, train_per_class=4, val_per_class=2, **kw)


def test_same_seed_same_bytes(tmp_path):
    sample.generate(small(tmp_path / "a", num_workers=2))
    sample.generate(small(tmp_path / "b", num_workers=1))
    cmp = filecmp.dircmp(tmp_path / "a", tmp_path / "b")
    assert not cmp.diff_files and not cmp.left_only and not cmp.right_only
    sample.generate(small(tmp_path / "c", seed=1))
    first = "train/n01440764/n01440764_3.JPEG"
    assert (tmp_path / "a" / first).read_bytes() != (tmp_path / "c" / first).read_bytes()


def test_layout_and_formats(tmp_path):
    info = sample.generate(small(tmp_path))
    assert sorted(os.listdir(tmp_path / "train")) == info["classes"]
    assert len(os.listdir(tmp_path / "val")) == 4 * 2 + 3  # + truncated, random, unlabelled
    modes = {o["kind"]: Image.open(tmp_path / o["path"]) for o in info["odd"]}
    assert modes["cmyk"].mode == "CMYK" and modes["gray"].mode == "L"
    assert modes["png"].format == "PNG" and modes["rgba_png"].mode == "RGBA"
    w, h = Image.open(tmp_path / "train/n02102040/n02102040_2.JPEG").size
    assert (w, h) in sample.SIZES
    header = (tmp_path / "LOC_val_solution.csv").read_text().splitlines()[0]
    assert header == "ImageId,PredictionString"


def test_classes_differ_more_than_images_within_a_class(tmp_path):
    """The premise of the demo: a linear model can separate the classes by their pixels."""
    sample.generate(sample.Settings(output=str(tmp_path), classes=3, train_per_class=6,
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
    main(["--output", uri, "--classes", "2", "--train-per-class", "2", "--val-per-class", "1"])
    fs, path = storage.filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    names = {i.path[len(path) + 1:] for i in infos}
    assert "LOC_val_solution.csv" in names and "train/n01440764/n01440764_1.JPEG" in names
    data = storage.read_bytes(f"{uri}/train/n01440764/n01440764_1.JPEG")
    assert Image.open(io.BytesIO(data)).format == "JPEG"
