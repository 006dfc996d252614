"""The ingested dataset's contract (common/dataset.py): a manifest that disagrees with its data is
one line, found before any cluster work starts."""

from __future__ import annotations

import shutil

import pyarrow.parquet as pq
import pytest

from common import dataset, schema, storage
from common.errors import ConfigError
from training import train


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
    (lambda m: {schema.M_CLASSES: m[schema.M_CLASSES][:2]},
     r"has labels 0\.\.3, but the manifest lists 2 classes"),
    (lambda m: {schema.M_CLASSES: ["n0", "n1", "n2", "n3"]},
     "disagree with the manifest's class list"),
    (lambda m: {schema.M_IMAGE_SHAPE: [32, 32, 3]}, "is 12288 bytes, not the 3072 bytes"),
    (lambda m: {schema.M_IMAGE_SHAPE: [64, 64]}, r"image_shape must be \[H, W, 3\]"),
    (lambda m: {schema.M_CLASSES: ["n1", "n1"]}, "distinct WNIDs"),
    (lambda m: {schema.M_FILES: [{**f, "rows": f.get("rows", 0) + 1} for f in m[schema.M_FILES]]},
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
