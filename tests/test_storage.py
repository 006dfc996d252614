"""URIs, atomic writes and clear errors (common/storage.py): local files and the real local S3."""

from __future__ import annotations

import os
import uuid

import pytest

from common import storage
from common.errors import ConfigError


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path)
    bucket = request.getfixturevalue("bucket")
    return f"{bucket}/storage-{uuid.uuid4().hex[:8]}"


def test_manifest_round_trip(root):
    out = storage.join(root, "job")
    with pytest.raises(ConfigError, match="no manifest.json"):
        storage.read_manifest(out)
    storage.write_manifest(out, {"counts": {"train": 3}, "name": "ü"})
    assert storage.read_manifest(out) == {"counts": {"train": 3}, "name": "ü"}
    storage.write_manifest(out, {"counts": {"train": 4}})  # replaced whole
    assert storage.read_manifest(out) == {"counts": {"train": 4}}


def test_local_write_leaves_no_temporary_files(tmp_path):
    storage.write_bytes(str(tmp_path / "a" / "f.bin"), b"x" * 1000)
    assert os.listdir(tmp_path / "a") == ["f.bin"]


def test_bytes_and_deletes(root):
    uri = storage.join(root, "d", "f.bin")
    storage.write_bytes(uri, b"\x00\x01" * 5000)
    assert storage.exists(uri) and storage.read_bytes(uri) == b"\x00\x01" * 5000
    storage.delete_file(uri)
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"again")
    storage.delete_dir(storage.join(root, "d"))
    assert not storage.exists(uri)


def test_writable_and_readable_checks(root):
    storage.check_writable(storage.join(root, "new", "deep"))
    with pytest.raises(ConfigError, match="does not exist"):
        storage.check_readable(storage.join(root, "nothing-here"))


def test_missing_bucket_is_one_clear_error(s3_server):
    for check in (storage.check_writable, storage.check_readable):
        with pytest.raises(ConfigError, match="bucket 'no-such-bucket' does not exist"):
            check("s3://no-such-bucket/prefix")


def test_unwritable_local_path(tmp_path):
    (tmp_path / "file").write_text("a file, not a folder")
    with pytest.raises(ConfigError, match="cannot write to"):
        storage.check_writable(str(tmp_path / "file" / "out"))


def test_uri_parsing():
    assert storage.join("s3://b/p/", "train", "/x.parquet") == "s3://b/p/train/x.parquet"
    with pytest.raises(ConfigError, match="unsupported URI scheme"):
        storage.filesystem("gs://bucket/x")
    with pytest.raises(ConfigError, match="names no bucket"):
        storage.filesystem("s3://")
