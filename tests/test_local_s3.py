"""The local SeaweedFS S3 server (infra/local_s3.py): real round trips, auth, CLI, stop."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from botocore.exceptions import ClientError

from infra import local_s3

SCRIPT = Path(local_s3.__file__)
BUCKET = "local-s3-test"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=60, check=False)


def process_gone(pid: int, wait_s: float = 5) -> bool:
    """True once pid no longer exists (an orphan's zombie is reaped by init shortly after)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def parse_exports(stdout: str) -> dict[str, str]:
    """`export K=V` lines -> {K: V}, read the way a shell would."""
    env = {}
    for line in stdout.splitlines():
        word, assignment = shlex.split(line)
        assert word == "export"
        key, value = assignment.split("=", 1)
        env[key] = value
    return env


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    srv = local_s3.start(str(tmp_path_factory.mktemp("local-s3")), port=port, timeout=30)
    assert srv.endpoint == f"http://127.0.0.1:{port}"
    yield srv
    srv.stop()
    assert not srv.is_running()
    assert process_gone(srv.pid)


def arrow_fs(srv: local_s3.Server) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(
        endpoint_override=srv.endpoint.removeprefix("http://"), scheme="http",
        region=srv.region, access_key=srv.access_key, secret_key=srv.secret_key)


def test_pyarrow_multipart_round_trip(server):
    local_s3.create_bucket(server, BUCKET)
    local_s3.create_bucket(server, BUCKET)  # idempotent
    fs = arrow_fs(server)
    data = os.urandom(12 * 2**20 + 123)  # more than two 5 MiB parts
    with fs.open_output_stream(f"{BUCKET}/round/trip.bin") as f:
        for i in range(0, len(data), 2**20):
            f.write(data[i:i + 2**20])
    assert fs.get_file_info(f"{BUCKET}/round/trip.bin").size == len(data)
    with fs.open_input_stream(f"{BUCKET}/round/trip.bin") as f:
        assert f.read() == data
    head = local_s3.client(server).head_object(Bucket=BUCKET, Key="round/trip.bin")
    assert "-" in head["ETag"], "expected a multipart ETag (md5-of-parts-N)"


def test_unsigned_and_wrong_secret_are_refused(server):
    local_s3.create_bucket(server, BUCKET)
    local_s3.client(server).put_object(Bucket=BUCKET, Key="secret.txt", Body=b"x")
    with pytest.raises(urllib.error.HTTPError) as unsigned:
        urllib.request.urlopen(f"{server.endpoint}/{BUCKET}/secret.txt", timeout=10)
    assert unsigned.value.code == 403
    wrong = dict(server.env(), AWS_SECRET_ACCESS_KEY="not-the-secret")
    with pytest.raises(ClientError) as signed_wrong:
        local_s3.client(wrong).get_object(Bucket=BUCKET, Key="secret.txt")
    assert signed_wrong.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_state_file_is_private_and_loadable(server):
    state = Path(server.data_dir) / local_s3.STATE_FILE
    assert state.stat().st_mode & 0o777 == 0o600
    assert (Path(server.data_dir) / local_s3.IDENTITY_FILE).stat().st_mode & 0o777 == 0o600
    loaded = local_s3.load(server.data_dir)
    assert loaded.env() == server.env() and loaded.pid == server.pid
    assert loaded.is_running()
    assert server.secret_key not in repr(server)


def test_cli_env_prints_exports(server):
    out = cli("env", "--dir", server.data_dir)
    assert out.returncode == 0, out.stderr
    assert parse_exports(out.stdout) == server.env()
    assert out.stdout.count("\n") == len(server.env())


def test_cli_start_reuse_and_stop(tmp_path):
    data_dir = str(tmp_path / "cli")
    started = cli("start", "--dir", data_dir, "--bucket", "cli-bucket", "--timeout", "30")
    assert started.returncode == 0, started.stderr
    env = parse_exports(started.stdout)
    srv = local_s3.load(data_dir)
    try:
        assert srv.is_running()  # outlived the CLI process
        assert env == srv.env()
        names = [b["Name"] for b in local_s3.client(env).list_buckets()["Buckets"]]
        assert "cli-bucket" in names
        again = cli("start", "--dir", data_dir)
        assert again.returncode == 0 and "already runs" in again.stderr
        assert parse_exports(again.stdout) == env
        assert local_s3.load(data_dir).pid == srv.pid
    finally:
        stopped = cli("stop", "--dir", data_dir)
    assert stopped.returncode == 0, stopped.stderr
    assert not srv.is_running()
    assert process_gone(srv.pid)
    assert not (Path(data_dir) / local_s3.STATE_FILE).exists()
    assert cli("env", "--dir", data_dir).returncode == 1
