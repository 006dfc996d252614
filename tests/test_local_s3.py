"""The local SeaweedFS S3 server (infra/local_s3.py): real round trips, auth, CLI, stop."""

from __future__ import annotations

import http.client
import os
import shlex
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pyarrow.fs as pafs
import pytest
from botocore.exceptions import ClientError

from infra import local_s3
from infra.local_cluster import _descendants, _listening, _socket_inodes

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


def listening_ports(srv: local_s3.Server, wait_s: float = 20) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket weed's processes listen on, once all it was given
    are up (the admin server starts last)."""
    deadline = time.monotonic() + wait_s
    while True:
        sockets = _listening()
        found = {sockets[inode] for pid in _descendants([srv.pid])
                 for inode in _socket_inodes(pid) if inode in sockets}
        if {port for _, port in found} >= set(srv.ports.values()) or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


# What a process without weed's key tries on each port: the filer's and master's HTTP APIs
ANONYMOUS = [("GET", "/?pretty=y"), ("GET", "/buckets/"), ("GET", "/dir/status"),
             ("PUT", f"/buckets/{BUCKET}/anonymous.txt"), ("POST", "/dir/assign")]
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def plain_http_status(port: int, method: str, path: str) -> int | None:
    """The HTTP status of an anonymous request, None when the port gives no HTTP answer."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path, body=b"x" if method in ("PUT", "POST") else None)
        return conn.getresponse().status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def tls_answer(port: int, cafile: str, cert: tuple[str, str] | None) -> bytes:
    """The first bytes a TLS server answers to an HTTP/2 preface or an HTTP/1.1 GET, trusting
    weed's certificate and presenting `cert` (or none); b"" when it refuses."""
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.check_hostname = False
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    if cert is not None:
        ctx.load_cert_chain(*cert)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                ctx.wrap_socket(raw) as tls:
            h2 = tls.selected_alpn_protocol() == "h2"
            tls.sendall(H2_PREFACE if h2 else b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            return tls.recv(64)
    except (ssl.SSLError, OSError):
        return b""


def test_every_port_but_s3_answers_only_weeds_own_certificate(server):
    """Master, volume, filer and admin, over HTTP and gRPC: no anonymous listing or write.
    Each port speaks only mutual TLS with weed's certificate: without it a request gets no
    answer, with it the same request does (so the refusal is the missing certificate)."""
    local_s3.create_bucket(server, BUCKET)
    found = listening_ports(server)
    assert {host for host, _ in found} == {"127.0.0.1"}
    assert {port for _, port in found} == set(server.ports.values())  # no port it wasn't given
    names = {port: name for name, port in server.ports.items()}
    data = Path(server.data_dir)
    cafile = str(data / local_s3.TLS_CERT)
    own = (cafile, str(data / local_s3.TLS_KEY))
    s3_port = server.ports["s3.port"]
    for _, port in sorted(found):
        if port == s3_port:
            continue
        for method, path in ANONYMOUS:  # 400: "Client sent an HTTP request to an HTTPS server"
            status = plain_http_status(port, method, path)
            assert status in (None, 400), (names[port], method, path, status)
        with pytest.raises(grpc.RpcError) as anonymous_rpc:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                channel.unary_unary("/filer_pb.SeaweedFiler/ListEntries")(b"", timeout=5)
        assert anonymous_rpc.value.code() == grpc.StatusCode.UNAVAILABLE, names[port]
        assert tls_answer(port, cafile, cert=None) == b"", names[port]
        assert tls_answer(port, cafile, cert=own) != b"", names[port]
    for method, path in ANONYMOUS:  # the S3 port refuses whatever is unsigned
        assert plain_http_status(s3_port, method, path) in (403, 405), (method, path)
    listed = local_s3.client(server).list_objects_v2(Bucket=BUCKET).get("Contents", [])
    assert "anonymous.txt" not in {o["Key"] for o in listed}


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
