"""One writer per output (common/lease.py through common/lifecycle.py): real processes that start
the same job on one output at once, a holder killed with SIGKILL, renewal, and a claim taken
over; on local disks and on the local S3 server. No Ray: the writer is a tiny job of its own."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from common import cli, lease, lifecycle, storage
from common.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
WRITER = "from tests.test_lease import writer; writer()"


@dataclass(frozen=True)
class Job:
    """A job that writes one file under pairs/ through the lifecycle, as the attack does."""

    output: str
    methods: str = "sign"
    hold_s: float = 0.0  # between its data and its manifest: a long run
    go: str = ""  # wait for this local file before preparing: writers that start at once
    overwrite: bool = False
    fail: str = ""  # "config" or "crash": raise that after writing, before the manifest


def job_output(cfg: Job) -> lifecycle.Output:
    return lifecycle.Output(cfg.output, "attack", owns=("pairs",),
                            identity={"settings": {"methods": cfg.methods}})


def _run(cfg: Job) -> None:
    out = job_output(cfg)
    print("ready", flush=True)
    while cfg.go and not os.path.exists(cfg.go):
        time.sleep(0.002)
    resuming = out.prepare(cfg.overwrite)
    storage.write_bytes(storage.join(cfg.output, "pairs", f"{cfg.methods}-{os.getpid()}.txt"),
                        cfg.methods.encode())
    print("resuming" if resuming else "fresh", flush=True)  # and its data written
    time.sleep(cfg.hold_s)
    if cfg.fail == "config":
        raise ConfigError("the job found bad input")
    if cfg.fail == "crash":
        raise RuntimeError("a bug")
    out.finish({"kind": "attack", "methods": cfg.methods})


def writer() -> None:
    """``python -c WRITER --output OUT ...``: the job's command line, exit 2 on refusal."""
    cli.main(Job, _run, None, None)


def start(out: str, *args: str, env: dict | None = None) -> subprocess.Popen:
    """The writer in a process of its own, once it printed that it is ready. Its stdout is
    read line by line (through one buffer, to the end), its stderr goes to a file."""
    err = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, "-c", WRITER, "--output", out, *args], cwd=ROOT,
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=err, text=True)
    proc.err = err
    assert proc.stdout.readline() == "ready\n", finish(proc)
    return proc


def finish(proc: subprocess.Popen) -> tuple[int, str, list[str]]:
    """(exit status, the rest of its stdout, stderr's lines)."""
    proc.wait(timeout=60)
    stdout = proc.stdout.read()
    proc.stdout.close()
    proc.err.seek(0)
    stderr = proc.err.read()
    proc.err.close()
    return proc.returncode, stdout, stderr.strip().splitlines()


def read(uri: str):
    return storage.read_json(uri)


def claim_of(out: str) -> dict | None:
    uri = storage.join(out, lease.LEASE_FILE)
    return storage.read_json(uri) if storage.exists(uri) else None


def wait_until_lapsed(out: str) -> None:
    expires = lease._epoch(claim_of(out)["expires"])
    time.sleep(max(0.0, expires - time.time()) + 0.2)


def pairs_files(out: str) -> list[str]:
    fs, path = storage.filesystem(storage.join(out, "pairs"))
    return sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(path)))


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path) -> str:
    """A new output on a local disk or under a prefix of the local S3 server's bucket."""
    if request.param == "local":
        return str(tmp_path / "out")
    bucket = request.getfixturevalue("bucket")
    return f"{bucket}/lease/{request.node.name.replace('[', '-').rstrip(']')}-{time.time_ns()}"


def test_two_writers_started_at_once_one_proceeds_the_other_is_refused(where, tmp_path):
    go = tmp_path / "go"
    procs = {m: start(where, "--methods", m, "--hold-s", "1.5", "--go", str(go))
             for m in ("sign", "template")}
    go.touch()
    results = {m: finish(p) for m, p in procs.items()}
    winners = [m for m, (rc, _, _) in results.items() if rc == 0]
    assert len(winners) == 1, results
    (won,) = winners
    (lost,) = set(procs) - {won}
    rc, _, err = results[lost]
    assert rc == 2 and len(err) == 1, results[lost]
    assert err[0].startswith(f"error: {where} is being written by pid {procs[won].pid} on "
                             f"{socket.gethostname()} since "), err
    manifest = read(storage.join(where, storage.MANIFEST))
    assert manifest["methods"] == won
    assert read(storage.join(where, lifecycle.IDENTITY_FILE))["settings"]["methods"] == won
    assert pairs_files(where) == [f"{won}-{procs[won].pid}.txt"]


@pytest.mark.slow  # waits out a lease: seconds
def test_a_killed_holder_blocks_the_output_until_its_claim_lapses_then_the_rerun_resumes(where):
    holder = start(where, "--hold-s", "60", env={lease.LEASE_ENV: "4"})
    assert holder.stdout.readline() == "fresh\n"
    holder.send_signal(signal.SIGKILL)
    finish(holder)
    with pytest.raises(ConfigError, match=f"is being written by pid {holder.pid} on "):
        job_output(Job(where)).prepare(False)  # the same command, at once: its claim is live
    assert claim_of(where)["pid"] == holder.pid
    wait_until_lapsed(where)
    rerun = start(where)
    rc, stdout, err = finish(rerun)
    assert rc == 0 and stdout == "resuming\n", (rc, stdout, err)
    assert any(f"claim of pid {holder.pid} on {socket.gethostname()} lapsed" in e for e in err)
    assert pairs_files(where) == sorted([f"sign-{holder.pid}.txt", f"sign-{rerun.pid}.txt"])
    assert read(storage.join(where, storage.MANIFEST))["methods"] == "sign"
    assert claim_of(where) is None  # released by finish


@pytest.mark.slow  # outlives a lease: seconds
def test_renewal_keeps_a_long_runs_claim_past_its_first_expiry(where):
    holder = start(where, "--hold-s", "3", env={lease.LEASE_ENV: "1"})
    assert holder.stdout.readline() == "fresh\n"
    first = claim_of(where)
    time.sleep(2)
    now = claim_of(where)
    assert now["token"] == first["token"] and now["started"] == first["started"]
    assert lease._epoch(now["expires"]) > lease._epoch(first["expires"]) + 0.5
    with pytest.raises(ConfigError, match=f"is being written by pid {holder.pid} on "):
        job_output(Job(where)).prepare(False)
    rc, _, err = finish(holder)
    assert rc == 0 and not any("WARNING" in e for e in err), err
    assert claim_of(where) is None


@pytest.mark.parametrize("fail, status", [("config", 2), ("crash", 1)])
def test_a_run_that_fails_releases_its_claim_when_it_exits(tmp_path, fail, status):
    out = str(tmp_path / "out")
    rc, _, err = finish(start(out, "--fail", fail))
    assert rc == status, err
    assert claim_of(out) is None
    assert read(storage.join(out, lifecycle.IDENTITY_FILE))  # the run's record stays: resumable
    rc, stdout, _ = finish(start(out))
    assert rc == 0 and stdout == "resuming\n"


def test_a_lapsed_claim_taken_over_by_runs_at_once_goes_to_one(where, tmp_path):
    storage.write_json_atomic(storage.join(where, lease.LEASE_FILE), {
        "host": "host-a", "pid": 1234, "started": "2026-01-01T00:00:00Z", "token": "old",
        "expires": "2026-01-01T00:01:00Z"})
    go = tmp_path / "go"
    procs = [start(where, "--hold-s", "1", "--go", str(go)) for _ in range(3)]
    go.touch()
    results = [finish(p) for p in procs]
    won = [p for p, (rc, _, _) in zip(procs, results, strict=True) if rc == 0]
    assert len(won) == 1, results
    for p, (rc, _, err) in zip(procs, results, strict=True):
        if p is not won[0]:
            assert rc == 2 and f"is being written by pid {won[0].pid} on " in err[-1], err
    assert pairs_files(where) == [f"sign-{won[0].pid}.txt"]


def test_a_run_whose_claim_was_taken_writes_no_manifest(where, monkeypatch, caplog):
    monkeypatch.setenv(lease.LEASE_ENV, "0.4")
    out = job_output(Job(where))
    out.prepare(False)
    other = {"host": "host-b", "pid": 4321, "started": "2026-12-04T16:20:01Z", "token": "theirs",
             "expires": "2999-01-01T00:00:00Z"}
    storage.write_json_atomic(storage.join(where, lease.LEASE_FILE), other)
    with caplog.at_level("WARNING", logger="common.lease"):
        time.sleep(0.5)
    assert "its claim was taken by pid 4321 on host-b" in caplog.text
    with pytest.raises(ConfigError, match=r"not writing the manifest of .*: this run's claim on "
                                          r"it lapsed and pid 4321 on host-b has held it since"):
        out.finish({"kind": "attack"})
    assert not storage.exists(storage.join(where, storage.MANIFEST))
    assert claim_of(where) == other  # not ours to release


def test_the_lease_length_from_the_environment(monkeypatch):
    monkeypatch.delenv(lease.LEASE_ENV, raising=False)
    assert lease.duration_s() == lease.LEASE_S
    monkeypatch.setenv(lease.LEASE_ENV, "2.5")
    assert lease.duration_s() == 2.5
    for bad in ("0", "-1", "soon", "nan"):
        monkeypatch.setenv(lease.LEASE_ENV, bad)
        with pytest.raises(ConfigError, match=f"{lease.LEASE_ENV}='{bad}'"):
            lease.duration_s()


def test_the_local_s3_server_honours_conditional_writes(s3_server, bucket):
    """What the S3 claim relies on: a second If-None-Match put and a stale If-Match put or
    delete fail with 412 Precondition Failed."""
    from botocore.exceptions import ClientError

    from infra import local_s3

    name = bucket[len("s3://"):]
    s3, key = local_s3.client(s3_server), f"conditional/{time.time_ns()}"
    etag = s3.put_object(Bucket=name, Key=key, Body=b"1", IfNoneMatch="*")["ETag"]
    for call, kwargs in ((s3.put_object, {"Body": b"2", "IfNoneMatch": "*"}),
                         (s3.put_object, {"Body": b"2", "IfMatch": '"0123"'}),
                         (s3.delete_object, {"IfMatch": '"0123"'})):
        with pytest.raises(ClientError) as e:
            call(Bucket=name, Key=key, **kwargs)
        assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert s3.get_object(Bucket=name, Key=key)["Body"].read() == b"1"
    s3.put_object(Bucket=name, Key=key, Body=b"3", IfMatch=etag)
    s3.delete_object(Bucket=name, Key=key, IfMatch=s3.head_object(
        Bucket=name, Key=key)["ETag"])
