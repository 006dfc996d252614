"""Every input and output is a URI: a local path or ``s3://bucket/prefix``.

All file I/O goes through ``pyarrow.fs``. An S3-compatible endpoint is chosen the standard way,
through the environment (``AWS_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL_S3``, ``AWS_REGION``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``); credentials are left to the AWS SDK's default
chain and are never read, printed or logged here.

    >>> fs, path = filesystem("s3://bucket/imagenet64")   # -> (S3FileSystem, "bucket/imagenet64")
    >>> write_json_atomic("out/manifest.json", {"done": True})
"""

from __future__ import annotations

import functools
import json
import os
import uuid
from urllib.parse import urlparse

import pyarrow.fs as pafs

from common.errors import ConfigError

S3_RETRY_ATTEMPTS = 10  # transient S3 errors are retried with the SDK's exponential backoff


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(uri: str, *parts: str) -> str:
    """Append path parts to a URI with '/', whatever the scheme."""
    out = uri.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


@functools.lru_cache(maxsize=8)
def _s3(endpoint: str | None, region: str | None) -> pafs.S3FileSystem:
    retry = pafs.AwsStandardS3RetryStrategy(max_attempts=S3_RETRY_ATTEMPTS)
    kwargs: dict = {"retry_strategy": retry}
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """Resolve a URI to a pyarrow filesystem and the path inside it."""
    if is_s3(uri):
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        path = uri[len("s3://"):].strip("/")
        if not path:
            raise ConfigError(f"{uri!r} names no bucket")
        return _s3(s3_endpoint(), region), path
    if "://" in uri:
        raise ConfigError(f"unsupported URI scheme in {uri!r}: use a local path or s3://bucket/prefix")
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file so that readers see the old file or the new one, never a part.

    A single S3 PUT is atomic already; a local file is written beside its target and renamed.
    """
    fs, path = filesystem(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(os.path.dirname(path), recursive=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)
    else:
        with fs.open_output_stream(path) as f:
            f.write(data)


def read_json(uri: str) -> dict:
    return json.loads(read_bytes(uri))


def write_json_atomic(uri: str, obj: dict) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=False).encode() + b"\n")


def delete_file(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


def delete_dir(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def _bucket_must_exist(uri: str) -> None:
    if not is_s3(uri):
        return
    fs, path = filesystem(uri)
    bucket = path.split("/", 1)[0]
    try:
        info = fs.get_file_info(bucket)
    except OSError as e:
        raise ConfigError(f"cannot reach bucket {bucket!r} for {uri}: {e}") from e
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"bucket {bucket!r} does not exist (from {uri})")


def check_readable(uri: str) -> None:
    """Fail with one sentence if a URI cannot be read: missing bucket, missing path, no access."""
    _bucket_must_exist(uri)
    fs, path = filesystem(uri)
    try:
        info = fs.get_file_info(path)
    except OSError as e:
        raise ConfigError(f"cannot read {uri}: {e}") from e
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"{uri} does not exist")


def check_writable(uri: str) -> None:
    """Fail with one sentence unless a small file can be written and deleted under the URI."""
    _bucket_must_exist(uri)
    fs, path = filesystem(uri)
    probe = f"{path}/.write-probe-{uuid.uuid4().hex}"
    try:
        fs.create_dir(path, recursive=True)
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)
    except OSError as e:
        raise ConfigError(f"cannot write to {uri}: {e}") from e


MANIFEST = "manifest.json"


def write_manifest(out: str, manifest: dict) -> None:
    """Write ``<out>/manifest.json`` last: its presence is what marks the output complete."""
    write_json_atomic(join(out, MANIFEST), manifest)


def read_manifest(out: str, what: str = "output") -> dict:
    """Read ``<out>/manifest.json``; an output without one is incomplete and refused."""
    uri = join(out, MANIFEST)
    try:
        return read_json(uri)
    except FileNotFoundError:
        raise ConfigError(f"{out} has no {MANIFEST}: it is not a complete {what}") from None
    except OSError as e:
        raise ConfigError(f"cannot read {uri}: {e}") from e
