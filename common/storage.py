"""Every input and output is a URI: a local path or ``s3://bucket/prefix``.

All file I/O goes through ``pyarrow.fs``. An S3-compatible endpoint is chosen the standard way,
through the environment (``AWS_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL_S3``, ``AWS_REGION``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``); credentials are left to the AWS SDK's default
chain and are never read, printed or logged here.

    >>> fs, path = filesystem("s3://bucket/imagenet64")   # -> (S3FileSystem, "bucket/imagenet64")
    >>> write_json_atomic("out/manifest.json", {"done": True})
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import re
import uuid
from urllib.parse import urlparse

import pyarrow.fs as pafs

from common.errors import ConfigError

# Transient S3 errors (throttling, a dropped connection, a 5xx) are retried with the SDK's backoff:
# random waits of up to 1, 2, 4 and 8 s between 5 attempts (pyarrow's default is 3). An endpoint
# that does not answer so fails within 5 x 2 s of connecting plus 15 s of waits, not minutes.
S3_RETRY_ATTEMPTS = 5
S3_CONNECT_TIMEOUT_S = 2.0  # per attempt (the AWS SDKs' default is 1 s)
S3_REQUEST_TIMEOUT_S = 3.0  # a transfer that moves no byte for this long is retried (SDK default)


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
    kwargs: dict = {"retry_strategy": retry, "connect_timeout": S3_CONNECT_TIMEOUT_S,
                    "request_timeout": S3_REQUEST_TIMEOUT_S}
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
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        _bucket_must_exist(uri)  # a missing bucket is said as such, not as a missing file
        raise


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file so that readers see the old file or the new one, never a part.

    A single S3 PUT is atomic already; a local file is written beside its target and renamed.
    """
    fs, path = filesystem(uri)
    with naming(uri):
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
    """A JSON object file; one that is not JSON (NaN and Infinity included: no writer here
    publishes them) or not an object is one ConfigError naming it. A missing file raises
    FileNotFoundError, for the caller to say what its absence means."""

    def no_constant(name: str):
        raise ValueError(f"{name} is not a JSON number")

    raw = read_bytes(uri)
    try:
        obj = json.loads(raw, parse_constant=no_constant)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{uri}: not JSON ({e.msg} at line {e.lineno} column {e.colno})"
                          ) from None
    except (ValueError, RecursionError) as e:  # not UTF-8, NaN, nested beyond Python's stack
        raise ConfigError(f"{uri}: not JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(obj, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
            type(obj), "a number")
        raise ConfigError(f"{uri}: {kind}, not a JSON object")
    return obj


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
    if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
        raise ConfigError(f"bucket {bucket!r} does not exist (from {uri})")


def check_readable(uri: str) -> None:
    """Fail with one sentence if a URI cannot be read: missing bucket, missing path, no access,
    no endpoint (describe_error says which)."""
    try:
        _bucket_must_exist(uri)
        fs, path = filesystem(uri)
        info = fs.get_file_info(path)
    except OSError as e:
        raise StorageError(f"cannot read {describe_error(e, uri)}") from e
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"{uri} does not exist")


def check_writable(uri: str) -> None:
    """Fail with one sentence unless a small file can be written and deleted under the URI."""
    try:
        _bucket_must_exist(uri)
        fs, path = filesystem(uri)
        probe = f"{path}/.write-probe-{uuid.uuid4().hex}"
        fs.create_dir(path, recursive=True)
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)
    except OSError as e:
        raise StorageError(f"cannot write to {describe_error(e, uri)}") from e


@contextlib.contextmanager
def naming(uri: str):
    """Name ``uri`` as the file of an OSError raised inside: pyarrow's write errors name none
    (``[Errno 28] Error writing bytes to file``). The name survives Ray carrying the error from
    a worker to the driver, where describe_error shows it."""
    try:
        yield
    except OSError as e:
        if e.errno is None or e.filename is not None:
            raise
        raise _NamedError(e.errno, os.strerror(e.errno), uri) from e


class _NamedError(OSError):
    """An OSError that pickles its number, reason and file as they are: Ray Data appends its
    retry advice to a failed task's ``args``, from which OSError's own pickling takes the file."""

    def __reduce__(self):
        return type(self), (self.errno, self.strerror, self.filename)


class StorageError(ConfigError):
    """A storage failure said in one line by describe_error, with the URI it was about."""


ACCESS_HINT = ("check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL and AWS_REGION "
               "(or AWS_PROFILE)")
ENDPOINT_HINT = "check AWS_ENDPOINT_URL"

# Each kind of S3 failure: words that give it away in pyarrow's messages (the AWS C++ SDK's error
# names, curl's) or in botocore's (error codes, exception names), what to say, and the hint. The
# first kind that matches wins.
_S3_FAILURES = (
    (("ACCESS_DENIED", "AccessDenied", "SIGNATURE_DOES_NOT_MATCH", "SignatureDoesNotMatch",
      "INVALID_ACCESS_KEY_ID", "InvalidAccessKeyId", "EXPIRED_TOKEN", "ExpiredToken",
      "InvalidToken", "HTTP status 403", "code 403", "NoCredentialsError",
      "PartialCredentialsError"), "access denied", ACCESS_HINT),
    (("PermanentRedirect", "HTTP status 301", "code 301", "AuthorizationHeaderMalformed",
      "IllegalLocationConstraint", "is wrong; expecting"),
     "the bucket is in another region", "set AWS_REGION to the bucket's region"),
    (("NoSuchBucket", "NO_SUCH_BUCKET", "not found. To create buckets", "code 404 on HeadBucket"),
     "the bucket does not exist", ENDPOINT_HINT),
    (("curlCode: 6,", "Could not resolve host", "NameResolutionError", "Failed to resolve"),
     "cannot resolve the S3 endpoint's host name", ENDPOINT_HINT),
    (("curlCode: 7,", "curlCode: 28,", "Could not connect", "Failed to connect",
      "Connection refused", "Timeout was reached", "EndpointConnectionError",
      "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError"),
     "cannot connect to the S3 endpoint", ENDPOINT_HINT),
)
# Where a failure happened, in the errors' words: pyarrow names the key and bucket (or the path
# inside its S3FileSystem: bucket/key), its local filesystem the file, and this project's
# wrappers ("cannot read <uri>: ...") the URI.
_WHERE = (r"key '(?P<key>[^']*)' in bucket '(?P<bucket>[^']*)'", r"[Bb]ucket '(?P<bucket>[^']*)'",
          r"Path does not exist '(?P<path>[^']+)'", r"local file '(?P<file>[^']+)'",
          r"^cannot (?:read|write to) (?P<file>\S+): ", r"(?P<file>s3://[^\s:'\"]+)")
_DETAIL = (r"AWS Error (\w+(?: \(HTTP status \d+\))?) during (\w+) operation",
           r"An error occurred \((\w+)\) when calling the (\w+) operation",
           r"(curlCode: \d+), ([^;]+)", r"code (\S+) on (\w+)")
_HOST = (r"Could not resolve host: (\S+)", r"Failed to resolve '([^']+)'",
         r"Failed to connect to (\S+?)(?: port (\d+))? after", r"host='([^']+)', port=(\d+)",
         r'endpoint URL: "\w+://([^/"]+)')
# Local write errors of the whole filesystem: where no file is named, the job's output is where.
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)


def describe_error(e: BaseException, uri: str | None = None,
                   output: str | None = None) -> str | None:
    """One line for a storage failure: where (``uri``, else what the errors name, else for a
    full disk the job's ``output``), the cause and, for S3, a hint naming the variables to check
    (never their values). None when ``e`` holds no storage failure.

    ``e`` may be Ray's wrapping of a worker's error: the innermost OSError or botocore error
    behind it (RayTaskError's ``cause``, ``__cause__``, Ray Train's ``worker_failures``) is the
    cause described. A ConfigError raised for an S3 failure (``from None`` keeps it as the
    context) is described by that failure; for any other it is None: its sentence stands.
    """
    if isinstance(e, StorageError):
        return str(e)
    chain = _storage_failures(e)
    if not chain:
        return None
    found, words = chain[-1], _words(chain[-1])
    where = uri or next((w for f in [*reversed(chain), e] if (w := _where(f))), None)
    if not isinstance(found, OSError) or re.search(r"AWS Error|curlCode", words) or (
            where or "").startswith("s3://"):
        for signs, cause, hint in _S3_FAILURES:
            if any(sign in words for sign in signs):
                return f"{where or 'S3'}: {_s3_cause(cause, words)}; {hint}"
    if isinstance(e, ConfigError):
        return None
    code = getattr(found, "errno", None)
    if code in _FULL and not where:
        where = output
    cause = os.strerror(code) if code else str(found).splitlines()[0]
    return f"{where}: {cause}" if where and where not in cause else cause


def _storage_failures(e: BaseException) -> list[BaseException]:
    """The OSErrors and botocore errors along ``e``'s causes, outermost first; Ray's wrappers
    (whose ``str`` is a whole traceback) are passed through to what they carry, and an error
    raised ``from None`` to the one it replaced."""
    found, todo, seen = [], [e], set()
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)  # RayTaskError
        if isinstance(cause, BaseException):
            todo.append(cause)
            continue
        if isinstance(e, OSError) or type(e).__module__.startswith("botocore"):
            found.append(e)
        todo += [e.__cause__, *getattr(e, "worker_failures", {}).values()]
        if e.__suppress_context__:
            todo.append(e.__context__)
    return found


def _words(e: BaseException) -> str:
    """An error's message with what botocore keeps beside it: the wrapped error, the code."""
    words = f"{type(e).__name__} {e} " + " ".join(map(str, getattr(e, "kwargs", {}).values()))
    code = getattr(e, "response", {}).get("Error", {}).get("Code")
    if code is not None:  # ClientError
        words += f" code {code} on {getattr(e, 'operation_name', '?')}"
    return words


def _where(e: BaseException) -> str | None:
    if getattr(e, "filename", None):
        return str(e.filename)
    for pattern in _WHERE:
        if m := re.search(pattern, str(e)):
            g = m.groupdict()
            if "bucket" in g:
                return f"s3://{g['bucket']}" + (f"/{g['key']}" if g.get("key") else "")
            if "path" in g:
                return g["path"] if os.path.isabs(g["path"]) else f"s3://{g['path']}"
            return g["file"]
    return None


def _s3_cause(cause: str, words: str) -> str:
    """The kind of failure with the host it could not reach and the SDK's own name for it."""
    host = next((m for p in _HOST if (m := re.search(p, words))), None)
    if host and "endpoint" in cause:
        cause += " " + ":".join(g for g in host.groups() if g)
    detail = next((m for p in _DETAIL if (m := re.search(p, words))), None)
    return f"{cause} ({' on '.join(detail.groups()).strip()})" if detail else cause


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
