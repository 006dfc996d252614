"""URIs, atomic writes and clear errors (common/storage.py): local files and the real local S3."""

from __future__ import annotations

import errno
import os
import pickle
import re
import socket
import time
import uuid

import pytest
from botocore.exceptions import ClientError, NoCredentialsError

from common import storage
from common.errors import ConfigError
from infra import local_s3


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


# --- failures in one line: the real local server, refused or out of reach -----------------------


def _closed_port() -> int:
    """A local port that nothing listens on (the OS's free one, closed again)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def broken_s3(s3_server, monkeypatch):
    """Set one thing wrong in the environment of the real local server (through the variables
    people set); the cached S3 filesystems are dropped before and after."""

    def broken(case: str) -> str:
        """The bucket to use for ``case``."""
        if case == "wrong secret key":
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-" + s3_server.secret_key[4:])
        elif case == "closed port":
            monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
        elif case == "unresolvable host":
            monkeypatch.setenv("AWS_ENDPOINT_URL", "http://no-such-host.invalid:9000")
        storage._s3.cache_clear()
        missing = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
        return missing if case == "no such bucket" else "test-bucket"

    storage._s3.cache_clear()
    yield broken
    storage._s3.cache_clear()


EXPECTED = {  # what each case says; the S3 hints name the variables, never their values
    "wrong secret key": rf"access denied \(ACCESS_DENIED on \w+\); "
                        rf"{re.escape(storage.ACCESS_HINT)}$",
    "no such bucket": r"bucket 'no-such-bucket-\w+' does not exist",
    "closed port": r"cannot connect to the S3 endpoint 127\.0\.0\.1:\d+ .*; "
                   r"check AWS_ENDPOINT_URL$",
    "unresolvable host": r"cannot resolve the S3 endpoint's host name no-such-host\.invalid .*; "
                         r"check AWS_ENDPOINT_URL$",
}


# an endpoint that does not answer costs its bounded retries: seconds each
UNREACHABLE = ("closed port", "unresolvable host")


def cases(names):
    return [pytest.param(c, marks=pytest.mark.slow) if c in UNREACHABLE else c for c in names]


@pytest.mark.parametrize("case", cases(EXPECTED))
def test_each_s3_failure_is_one_line_naming_the_uri(broken_s3, s3_server, case):
    uri = f"s3://{broken_s3(case)}/failures/out"
    for check, verb in ((storage.check_writable, "write to"), (storage.check_readable, "read")):
        t0 = time.monotonic()
        with pytest.raises(ConfigError) as e:
            check(uri)
        line = str(e.value)
        assert "\n" not in line and (line.startswith(f"cannot {verb} {uri}: ") or
                                     line.endswith(f"does not exist (from {uri})")), line
        assert re.search(EXPECTED[case], line), line
        assert s3_server.secret_key not in line and s3_server.access_key not in line
        assert time.monotonic() - t0 < 30  # bounded retries: an endpoint that does not answer
        if case in ("closed port", "unresolvable host"):
            break  # the other check waits the same retries again


@pytest.mark.parametrize("case", cases(["wrong secret key", "closed port", "unresolvable host"]))
def test_errors_escaping_a_read_are_described_with_their_key(broken_s3, case):
    uri = f"s3://{broken_s3(case)}/failures/manifest.json"
    with pytest.raises(OSError) as e:
        storage.read_bytes(uri)
    assert re.fullmatch(rf"{re.escape(uri)}: {EXPECTED[case]}", storage.describe_error(e.value))


def test_a_missing_bucket_is_said_as_such_when_reading(s3_server):
    with pytest.raises(ConfigError, match=r"^bucket 'no-such-bucket-x1' does not exist"):
        storage.read_bytes("s3://no-such-bucket-x1/a/manifest.json")


@pytest.mark.parametrize("case", list(EXPECTED))
def test_botocore_errors_are_described_too(s3_server, case):
    env = dict(s3_server.env())
    bucket = "no-such-bucket-x2" if case == "no such bucket" else "test-bucket"
    env.update({"wrong secret key": {"AWS_SECRET_ACCESS_KEY": "wrong"},
                "closed port": {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{_closed_port()}"},
                "unresolvable host": {"AWS_ENDPOINT_URL": "http://no-such-host.invalid:9000"},
                }.get(case, {}))
    with pytest.raises(Exception) as e:
        local_s3.client(env).get_object(Bucket=bucket, Key="k")
    line = storage.describe_error(e.value, f"s3://{bucket}/k")
    kind = {"wrong secret key": r"access denied \(SignatureDoesNotMatch on GetObject\); check "
                                r"AWS_ACCESS_KEY_ID",
            "no such bucket": r"the bucket does not exist \(NoSuchBucket on GetObject\)",
            "closed port": r"cannot connect to the S3 endpoint 127\.0\.0\.1:\d+; check AWS_END",
            "unresolvable host": r"cannot resolve the S3 endpoint's host name no-such-host\."}
    assert re.match(rf"s3://{bucket}/k: {kind[case]}", line), line


@pytest.mark.parametrize("error, says", [
    # what AWS answers for a bucket of another region, through pyarrow and through botocore
    (OSError("When getting information for key 'p/x' in bucket 'b': AWS Error UNKNOWN (HTTP status "
             "301) during HeadObject operation: No response body."),
     "s3://b/p/x: the bucket is in another region (UNKNOWN (HTTP status 301) on HeadObject); "
     "set AWS_REGION to the bucket's region"),
    (ClientError({"Error": {"Code": "AuthorizationHeaderMalformed", "Message": "the region "
                            "'us-east-1' is wrong; expecting 'eu-west-1'"}}, "GetObject"),
     "S3: the bucket is in another region (AuthorizationHeaderMalformed on GetObject); set "
     "AWS_REGION to the bucket's region"),
    (NoCredentialsError(), f"S3: access denied; {storage.ACCESS_HINT}"),
    (OSError(errno.EACCES, "Permission denied", "/data/x"), "/data/x: Permission denied"),
    (ValueError("not storage"), None),
])
def test_what_aws_and_the_local_disk_say_is_described(error, says):
    assert storage.describe_error(error) == says


def test_a_full_disk_names_the_file_also_after_ray_carried_it(tmp_path):
    """pyarrow names no file when a write fails; storage.naming adds it, and it survives Ray Data
    appending its retry advice to the error's args and pickling it to the driver."""
    with pytest.raises(OSError) as e, storage.naming("/out/train/part-00001.parquet"):
        raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space "
                      "left on device")
    e.value.args += ("Failed to write after 1/1 attempts (total backoff 0.0s).\nTo change ...",)
    carried = pickle.loads(pickle.dumps(e.value))
    for err in (e.value, carried):
        assert storage.describe_error(err) == ("/out/train/part-00001.parquet: No space left on "
                                               "device")
    nameless = OSError(errno.ENOSPC, "Error writing bytes to file.")
    assert storage.describe_error(nameless, output="/out") == "/out: No space left on device"
