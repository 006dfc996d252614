"""Failures from outside the code end every job in one line (common/cli.py main,
common/storage.py describe_error): object storage that refuses or does not answer, Ctrl-C or
SIGTERM, a full disk. Each runs the real command in a subprocess, as a user would, and checks what
the user sees, how long it took, that no process of the job is left and that a rerun finishes.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from common import cli, storage

ROOT = Path(__file__).resolve().parent.parent

# --- object storage: refused or out of reach, before any work --------------------------------

JOBS = {  # on URIs under {p}; the sample would take minutes to draw: its check comes first
    "pipelines.sample": "--output {p}/sample --classes 10 --train-per-class 1000",
    "training.train": "--data {p}/data --output {p}/model",
    "attacks.fool": "--data {p}/data --model {p}/model --output {p}/fooling",
    "report.show": "--results {p}/fooling --image-id x --target 0 --output {p}/x.png",
}
SAYS = {  # what each case says after the URI; the hints name variables, never their values
    "wrong secret key": rf"access denied \(ACCESS_DENIED on \w+\); "
                        rf"{re.escape(storage.ACCESS_HINT)}",
    "no such bucket": r"bucket 'no-such-bucket-\w+' does not exist",
    "closed port": r"cannot connect to the S3 endpoint 127\.0\.0\.1:\d+ .*; check AWS_ENDPOINT_URL",
    "unresolvable host": r"cannot resolve the S3 endpoint's host name no-such-host\.invalid .*; "
                         r"check AWS_ENDPOINT_URL",
}
LIMIT_S = 30  # an endpoint that does not answer fails within this, retries included


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _broken(case: str, server) -> tuple[dict, str]:
    """The environment with one thing wrong, and the bucket to use."""
    env = {**os.environ, **server.env()}
    if case == "wrong secret key":
        env["AWS_SECRET_ACCESS_KEY"] = "not-" + server.secret_key[4:]
    elif case == "closed port":
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{_closed_port()}"
    elif case == "unresolvable host":
        env["AWS_ENDPOINT_URL"] = "http://no-such-host.invalid:9000"
    missing = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    return env, missing if case == "no such bucket" else "test-bucket"


@pytest.mark.slow  # four jobs started as processes per case: 3 to 22 s
@pytest.mark.parametrize("case", list(SAYS))
def test_each_job_says_an_s3_failure_in_one_line_naming_the_uri(s3_server, case):
    env, bucket = _broken(case, s3_server)
    prefix = f"s3://{bucket}/failures-{uuid.uuid4().hex[:6]}"

    def run(job: str) -> tuple[subprocess.CompletedProcess, float]:
        t0 = time.monotonic()
        cmd = [sys.executable, "-m", job, *JOBS[job].format(p=prefix).split()]
        r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
        return r, time.monotonic() - t0

    with ThreadPoolExecutor(2) as pool:  # two at a time: the machine may have two cores
        done = dict(zip(JOBS, pool.map(run, JOBS)))
    for job, (proc, took) in done.items():
        out, err = proc.stdout, proc.stderr
        assert proc.returncode == 2, (job, err)
        lines = err.splitlines()
        assert len(lines) == 1 and not out, (job, err)  # before Ray, before any work
        assert re.fullmatch(rf"error: (cannot \w+( to)? )?{re.escape(prefix)}\S*: {SAYS[case]}"
                            rf"|error: {SAYS[case]} \(from {re.escape(prefix)}\S*\)",
                            lines[0]), (job, lines[0])
        assert s3_server.secret_key not in err and s3_server.access_key not in err
        assert took < LIMIT_S, (job, took)


# --- signals: one line, Ray stopped, nothing left, the rerun finishes ---------------------------

# What may never appear: Python's tracebacks, Ray's C++ failure handler's stack
ALARMING = re.compile(r"Traceback|\*\*\* SIG\w+ received|^\s*@\s+0x|core dumped", re.M)


class Job:
    """A job's command in a subprocess: its stderr read as it comes, and every process under it
    noted while it runs (Ray's workers have no session name in their command line)."""

    def __init__(self, *args: str):
        import ray  # noqa: F401  # puts Ray's copy of psutil on the path

        psutil = importlib.import_module("psutil")
        self.psutil = psutil
        self.proc = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.seen: dict[int, object] = {}
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._watch, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def _watch(self) -> None:
        with self._gone():
            top = self.psutil.Process(self.proc.pid)
            while self.proc.poll() is None:
                with self._gone():
                    for p in top.children(recursive=True):
                        self.seen.setdefault(p.pid, p)
                time.sleep(0.1)

    def _gone(self):
        return contextlib.suppress(self.psutil.NoSuchProcess, self.psutil.AccessDenied)

    def wait_for(self, text: str, timeout: float = 180) -> None:
        end = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            assert self.proc.poll() is None and time.monotonic() < end, (text, self.lines)
            time.sleep(0.05)

    def stop(self, sig: int) -> int:
        """Send ``sig``; the exit status once the job has ended."""
        self.ran = len(self.seen)  # processes under it when the signal came
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=120)

    def left(self, within: float = 10) -> list[str]:
        """The job's processes still alive ``within`` seconds after it ended: those seen under
        it, and any with its Ray session's name (session_..._<pid>) in their command line."""
        session = re.compile(rf"session_[\d_-]+_{self.proc.pid}\b")
        end = time.monotonic() + within
        while True:
            alive = [p for p in self.seen.values() if self._alive(p)]
            alive += [p for p in self.psutil.process_iter(["cmdline"])
                      if session.search(" ".join(p.info["cmdline"] or ())) and self._alive(p)]
            if not alive or time.monotonic() > end:
                return [f"{p.pid} {p.name()}" for p in alive]
            time.sleep(0.2)

    def _alive(self, p) -> bool:
        with self._gone():
            return p.is_running() and p.status() != self.psutil.STATUS_ZOMBIE
        return False

    def err(self) -> str:
        time.sleep(0.2)  # the reader's last lines
        return "\n".join(self.lines)


def _interrupted(job: Job, status: int, rc: int) -> None:
    assert rc == status, job.err()
    assert job.lines[-1] == cli.INTERRUPTED, job.err()
    assert not ALARMING.search(job.err()), job.err()
    assert job.left() == []


@pytest.mark.slow
def test_sigterm_during_training_stops_ray_and_the_rerun_resumes(ingested, tmp_path):
    args = ("training.train", "--data", ingested, "--output", str(tmp_path / "model"),
            "--epochs", "2", "--batch-size", "16")
    job = Job(*args)
    job.wait_for("epoch 1/2")
    snapshot = tmp_path / "model" / "checkpoints" / "checkpoint_manager_snapshot.json"
    while "epoch-0001" not in (snapshot.read_text() if snapshot.exists() else ""):
        time.sleep(0.1)  # Ray Train has recorded the epoch's checkpoint: a rerun starts there
    _interrupted(job, 143, job.stop(signal.SIGTERM))
    again = Job(*args)
    assert again.proc.wait(timeout=300) == 0, again.err()
    assert "resuming after epoch 1" in again.err() and "epoch 1/2" not in again.err()
    assert (tmp_path / "model" / storage.MANIFEST).exists()


@pytest.mark.slow
def test_sigint_on_ingest_while_ray_starts_and_works_then_the_rerun(sample_dir, tmp_path):
    args = ("pipelines.ingest", "--source", str(sample_dir), "--output", str(tmp_path / "out"))
    starting = 0
    for delay in (0.0, 0.8, 2.0, 4.0):  # after the listing: Ray starting (held), then working
        job = Job(*args)
        job.wait_for("val: ")
        time.sleep(delay)
        rc = job.stop(signal.SIGINT)
        assert rc != -signal.SIGSEGV
        _interrupted(job, 130, rc)
        starting += job.ran > 0
    assert starting  # at least one signal came while Ray's processes were there
    assert not (tmp_path / "out" / storage.MANIFEST).exists()
    again = Job(*args)
    assert again.proc.wait(timeout=300) == 0, again.err()
    assert (tmp_path / "out" / storage.MANIFEST).exists()


@pytest.mark.slow
def test_sigint_very_early_never_crashes(sample_dir, tmp_path):
    """Sent 0.5 to 1.5 s after the start: during Python's imports (before main: Python's own
    KeyboardInterrupt) or during the checks and Ray's start; never a crash."""
    for delay in (0.5, 1.0, 1.5):
        job = Job("pipelines.ingest", "--source", str(sample_dir),
                  "--output", str(tmp_path / f"out-{delay}"))
        time.sleep(delay)
        rc = job.stop(signal.SIGINT)
        assert rc in (130, -signal.SIGINT), (rc, job.err())
        if rc == 130:
            _interrupted(job, 130, rc)
        assert job.left() == []


# --- a full disk: the file and the cause, no manifest, the rerun finishes -----------------------


@pytest.fixture
def small_disk(tmp_path):
    """A real 400 KiB filesystem (tmpfs), smaller than the sample's ingest (about 770 KiB)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip()}): needs root")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.slow
def test_a_full_disk_names_the_file_and_the_rerun_finishes(sample_dir, small_disk):
    out = small_disk / "imagenet64"
    args = ("pipelines.ingest", "--source", str(sample_dir), "--output", str(out))
    job = Job(*args)
    assert job.proc.wait(timeout=300) == 2, job.err()
    assert re.fullmatch(rf"error: {re.escape(str(out))}/\w+/part-\d+\.parquet: "
                        r"No space left on device", job.lines[-1]), job.err()
    assert not ALARMING.search(job.err()) and len(job.lines) <= 4, job.err()  # two INFO lines
    assert not (out / storage.MANIFEST).exists()
    subprocess.run(["mount", "-o", "remount,size=3m", str(small_disk)], check=True)  # space freed
    again = Job(*args)
    assert again.proc.wait(timeout=300) == 0, again.err()
    assert (out / storage.MANIFEST).exists()
