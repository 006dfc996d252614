"""A claim on an output, so that one run at a time writes it (docs/design.md, "The output
lifecycle"); common/lifecycle.py is its one user.

    >>> claim = Lease("out/fooling")
    >>> claim.refuse_other()     # reads only: ConfigError while another live run holds it
    >>> claim.acquire()          # creates out/fooling/_lease.json if absent, or takes over an
    ...                          # expired one; a daemon thread renews it while the run lives
    >>> claim.check()            # ConfigError if another run has taken it since
    >>> claim.release()          # deletes it, only while it is still ours (also at exit)

``_lease.json`` holds the run's ``host``, ``pid``, ``started`` (UTC), a random ``token`` and
``expires`` (UTC). It is created atomically-if-absent (``O_CREAT | O_EXCL`` on a local disk,
``If-None-Match: *`` on S3) and changed only by compare-and-swap (an ``flock`` on the file and a
check that its content is the one read, or ``If-Match`` with the ETag read), so that of runs
that start at once, or that take over one expired claim at once, exactly one holds it. Each
decision is made on the record read back after the write, so a write that the SDK retried after
it had already succeeded is still recognised as ours (by its token).

Expiry compares the record's UTC time with this host's clock: hosts that share an output need
clocks that agree (NTP) to well within LEASE_S.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import math
import os
import secrets
import socket
import threading
import time
from datetime import UTC, datetime

from common import storage
from common.errors import ConfigError

log = logging.getLogger(__name__)

LEASE_FILE = "_lease.json"
LEASE_S = 60.0  # a crashed run blocks its output this long: long enough to outlast a GC pause or
# an S3 retry storm, short enough to wait out by hand
LEASE_ENV = "FOOLING_LEASE_S"  # overrides LEASE_S (seconds): tests use 2-4 s
RENEWALS_PER_LEASE = 4  # renew every LEASE_S / 4: three renewals can fail before the claim lapses
SETTLE_S = 1.0  # a file just created with O_EXCL is empty until its writer fills it: wait this
# long for its content before taking it for garbage
CLAIM_ATTEMPTS = 5  # reads and writes per acquire: each lost race means another run moved first
S3_TIMEOUT_S = 5.0  # each S3 call of a claim ends well within a renewal period (15 s)
S3_ATTEMPTS = 3  # the next renewal tries again; an exit is not held up by an endpoint gone

# The leases this process holds, by token: a second run in the same process (a test calling a
# job again after a failure) takes its own claim back, and the claims still held at exit are
# released then.
_held: dict[str, Lease] = {}
_held_lock = threading.Lock()
_atexit_registered = False


def duration_s() -> float:
    """LEASE_S, or FOOLING_LEASE_S from the environment."""
    text = os.environ.get(LEASE_ENV)
    if not text:
        return LEASE_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{LEASE_ENV}={text!r}: give the lease's length in seconds, above 0")
    return value


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _epoch(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


class Lease:
    """The claim of this run on the output ``out``; nothing is read or written until used."""

    def __init__(self, out: str):
        self.out = out
        self.uri = storage.join(out, LEASE_FILE)
        self.token = secrets.token_hex(16)
        self._acquired = False  # once acquire() succeeded: finish() checks the file then
        self._pid = os.getpid()
        self._started = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @functools.cached_property
    def _store(self) -> _LocalFile | _S3Object:
        return _S3Object(self.uri) if storage.is_s3(self.uri) else _LocalFile(self.uri)

    # --- what lifecycle calls --------------------------------------------------------------

    def refuse_other(self) -> None:
        """Refuse, reading only, while a live claim of another run is on the output."""
        try:
            found = self._read()
        except OSError as e:
            raise ConfigError(f"cannot read the claim on {self.out}: {e}") from None
        if found is not None and not self._ours_or_free(found[0]):
            raise ConfigError(self._busy(found[0]))

    def acquire(self) -> None:
        """Claim the output, or refuse in one line naming the live run that holds it."""
        length = duration_s()
        self._started = _iso(time.time())
        try:
            for _ in range(CLAIM_ATTEMPTS):
                if self._claim(length):
                    return self._hold(length)
        except OSError as e:
            raise ConfigError(f"cannot claim {self.out} for this run: {e}") from None
        raise ConfigError(f"could not claim {self.out}: other runs claimed it {CLAIM_ATTEMPTS} "
                          "times while this one tried; start one run at a time")

    def _claim(self, length: float) -> bool:
        """One try: create the record, or take over a lapsed one; True once the file read back
        carries our token. Raises ConfigError while another run's live claim is there."""
        self._store.create(self._record(length))
        found = self._read()
        if found is None:  # released between the two: try again
            return False
        record, version = found
        if record.get("token") == self.token:
            return True
        if not self._ours_or_free(record):
            raise ConfigError(self._busy(record))
        earlier = _held.get(record.get("token"))
        if earlier is not None:
            log.info("%s: this process held it for an earlier run that did not finish; taking "
                     "it back", self.out)
            earlier._drop()
        else:
            log.info("%s: the claim of pid %s on %s lapsed at %s; taking it over", self.out,
                     record.get("pid"), record.get("host"), record.get("expires"))
        self._store.replace(self._record(length), version)  # if it changed since, read again
        return False

    def check(self) -> None:
        """Refuse in one line unless the claim on the output is still this run's."""
        if not self._acquired:
            raise RuntimeError(f"{self.out}: finish() of a run that did not prepare() it")
        try:
            found = self._read()
        except OSError as e:
            raise ConfigError(f"cannot read the claim on {self.out}: {e}") from None
        if found is None or found[0].get("token") != self.token:
            other = ("nobody holds it now" if found is None else
                     f"pid {found[0].get('pid')} on {found[0].get('host')} has held it since "
                     f"{found[0].get('started')}")
            raise ConfigError(f"not writing the manifest of {self.out}: this run's claim on it "
                              f"lapsed and {other}; the output may hold two runs' files: rerun "
                              "with --overwrite once no other run writes it")

    def release(self) -> None:
        """Stop renewing and delete the claim, only while the file still carries our token.
        A failure is only logged: the claim then lapses by itself."""
        self._drop()
        try:
            for _ in range(CLAIM_ATTEMPTS):
                found = self._read()
                if found is None or found[0].get("token") != self.token:
                    return
                if self._store.delete(found[1]):
                    return
        except OSError as e:
            log.warning("could not release the claim on %s (%s): it lapses by itself",
                        self.out, e)

    # --- renewal ---------------------------------------------------------------------------

    def _hold(self, length: float) -> None:
        global _atexit_registered
        self._acquired = True
        self._pid = os.getpid()
        with _held_lock:
            _held[self.token] = self
            if not _atexit_registered:
                atexit.register(_release_all)
                _atexit_registered = True
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, args=(length,), daemon=True,
                                        name=f"lease {self.out}")
        self._thread.start()

    def _renew_loop(self, length: float) -> None:
        while not self._stop.wait(length / RENEWALS_PER_LEASE):
            try:
                lost = self._renew(length)
            except Exception as e:  # a transient error: the next renewal tries again
                log.warning("could not renew the claim on %s: %s", self.out, e)
                continue
            if lost:
                log.warning("%s: %s; this run goes on but will not write its manifest",
                            self.out, lost)
                with _held_lock:
                    _held.pop(self.token, None)
                return

    def _renew(self, length: float) -> str | None:
        """Push the expiry on; returns why the claim is lost, or None while it is ours."""
        for _ in range(CLAIM_ATTEMPTS):
            found = self._read()
            if found is None:
                return "its claim was deleted by another run"
            if found[0].get("token") != self.token:
                return (f"its claim was taken by pid {found[0].get('pid')} on "
                        f"{found[0].get('host')}")
            if self._stop.is_set() or self._store.replace(self._record(length), found[1]):
                return None
        return None

    def _drop(self) -> None:
        """Stop renewing (the file is left as it is)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        with _held_lock:
            _held.pop(self.token, None)

    # --- the record --------------------------------------------------------------------------

    def _record(self, length: float) -> bytes:
        now = time.time()
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                           "started": self._started, "token": self.token,
                           "expires": _iso(math.ceil(now + length))}, indent=2).encode() + b"\n"

    def _read(self) -> tuple[dict, str] | None:
        """The record and its version, or None when there is none. A record that stays
        unreadable for SETTLE_S (a writer that died between creating and filling it) reads as
        an expired claim of nobody."""
        deadline = time.monotonic() + SETTLE_S
        while True:
            found = self._store.read()
            if found is None:
                return None
            try:
                record = json.loads(found[0])
                _epoch(record["expires"])
                return record, found[1]
            except (ValueError, KeyError, TypeError):
                if time.monotonic() > deadline:
                    log.warning("%s is unreadable: taken for a lapsed claim", self.uri)
                    return {"expires": _iso(0)}, found[1]
                time.sleep(0.05)

    def _ours_or_free(self, record: dict) -> bool:
        """Whether this run may hold the claim: ours, this process's earlier one, or lapsed."""
        token = record.get("token")
        return token == self.token or token in _held or _epoch(record["expires"]) < time.time()

    def _busy(self, record: dict) -> str:
        return (f"{self.out} is being written by pid {record.get('pid')} on "
                f"{record.get('host')} since {record.get('started')}; wait for it or stop it "
                f"(a stopped run's claim lapses at {record.get('expires')} unless renewed)")


def _release_all() -> None:
    """At exit: release the claims this process still holds (not a forked child's copies)."""
    with _held_lock:
        leases = list(_held.values())
    for lease in leases:
        with contextlib.suppress(Exception):
            if lease._pid == os.getpid():
                lease.release()


class _LocalFile:
    """The lease on a local disk (or a shared one: NFS honours O_EXCL and flock)."""

    def __init__(self, uri: str):
        self.path = storage.filesystem(uri)[1]

    def create(self, data: bytes) -> bool:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

    def read(self) -> tuple[bytes, str] | None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except (FileNotFoundError, NotADirectoryError):  # none there; the probe says why not
            return None
        return data, hashlib.sha256(data).hexdigest()

    def replace(self, data: bytes, version: str) -> bool:
        with self._locked(version) as ours:
            if ours:
                tmp = f"{self.path}.tmp-{secrets.token_hex(8)}"
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, self.path)
            return ours

    def delete(self, version: str) -> bool:
        with self._locked(version) as ours:
            if ours:
                os.unlink(self.path)
            return ours

    @contextlib.contextmanager
    def _locked(self, version: str):
        """An flock on the file, then whether the path still names that file and its content
        is still ``version``: only then may it be changed."""
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            yield False
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            found = self.read() if same else None
            yield found is not None and found[1] == version
        finally:
            os.close(fd)  # and with it the lock


class _S3Object:
    """The lease on S3: conditional writes (If-None-Match, If-Match) through boto3, which
    pyarrow does not offer; the endpoint and credentials come from the environment."""

    CONFLICT = frozenset({"PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "404",
                          "409", "412"})  # a condition that failed: another run moved first

    def __init__(self, uri: str):
        self.bucket, self.key = uri[len("s3://"):].split("/", 1)
        self._client = None

    def client(self):
        if self._client is None:
            import boto3
            from botocore.config import Config

            endpoint = storage.s3_endpoint()
            # its INFO line on where the credentials came from would join every job's output
            logging.getLogger("botocore.credentials").setLevel(logging.WARNING)
            self._client = boto3.session.Session().client(
                "s3", endpoint_url=endpoint,
                region_name=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
                # path-style on a custom endpoint, as pyarrow addresses it
                config=Config(s3={"addressing_style": "path" if endpoint else "auto"},
                              connect_timeout=S3_TIMEOUT_S, read_timeout=S3_TIMEOUT_S,
                              retries={"mode": "standard", "max_attempts": S3_ATTEMPTS}))
        return self._client

    def _write(self, call, tolerated: frozenset = CONFLICT, **kwargs) -> str:
        """"ok", or the error code of a failed condition (``tolerated``); others as OSError."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            call(Bucket=self.bucket, Key=self.key, **kwargs)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in tolerated:
                return code
            raise OSError(f"s3://{self.bucket}/{self.key}: {e}") from None
        except BotoCoreError as e:
            raise OSError(f"s3://{self.bucket}/{self.key}: {e}") from None
        return "ok"

    def create(self, data: bytes) -> bool:
        return self._write(self.client().put_object, Body=data, IfNoneMatch="*") == "ok"

    def read(self) -> tuple[bytes, str] | None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            got = self.client().get_object(Bucket=self.bucket, Key=self.key)
            return got["Body"].read(), got["ETag"]
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise OSError(f"s3://{self.bucket}/{self.key}: {e}") from None
        except BotoCoreError as e:
            raise OSError(f"s3://{self.bucket}/{self.key}: {e}") from None

    def replace(self, data: bytes, version: str) -> bool:
        return self._write(self.client().put_object, Body=data, IfMatch=version) == "ok"

    def delete(self, version: str) -> bool:
        delete = self.client().delete_object
        done = self._write(delete, self.CONFLICT | {"NotImplemented"}, IfMatch=version)
        if done == "NotImplemented":  # no conditional deletes here: it was read as ours just now
            done = self._write(delete)
        return done == "ok"
