"""A real multi-node Ray cluster on 127.0.0.1, and job submission to it as a cluster user does.

    with LocalCluster(env=s3_env) as cluster:          # `ray start --head` + `ray start --address`
        rc, log, seconds = cluster.submit(["python", "-m", "pipelines.ingest", "--source", ...])

Each node is a `ray start --block` process in a session of its own, on free ports, with its own
temp dir, so it neither meets nor stops any other Ray on the machine (unlike `ray stop`, which
stops them all).

What listens where: the dashboard and Jobs API bind to 127.0.0.1 (``--dashboard-host``). The rest
cannot be bound to 127.0.0.1 in Ray 2.60: ``ray start`` turns ``--node-ip-address=127.0.0.1`` into
the machine's reachable address (``services.resolve_ip_for_localhost``; the only way around it,
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, refuses a second node), so the Ray Client server (which
``ray start --head`` always runs: its port must be 1024-65535), the dashboard agent (HTTP, gRPC,
metrics) and the runtime-env agent listen on that address or on all interfaces; and the C++ gRPC
servers take no bind address at all: the GCS, each raylet's node manager and object manager, and
the core-worker server of every worker, driver and job supervisor. Token authentication (on
here) is what guards them all: a request without the token is refused.
``listeners()`` lists them all; tests/test_cluster.py holds the cluster to this.

Jobs go through the Ray Jobs API with `ray job submit --working-dir .`: the working directory is
uploaded (minus .gitignore and .rayignore) exactly as on a real cluster.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
OBJECT_STORE_BYTES = 512 * 2**20  # per node: the test jobs are small, the machine is shared


# Processes whose listeners Ray 2.60 binds beyond 127.0.0.1 with no option to change it: the
# GCS, the raylet, the dashboard and runtime-env agents, core workers (ray::IDLE or
# ray::<task or actor>), and python: drivers, the job supervisor and the Ray Client server.
ALL_INTERFACES = ("gcs_server", "raylet", "ray::", "python")


def _socket_inodes(pid: int) -> set[str]:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return set()
    out = set()
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(target[8:-1])
    return out


def _listening() -> dict[str, tuple[str, int]]:
    """inode -> (address, port) of every listening TCP socket on the machine (Linux /proc)."""
    out = {}
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] != "0A":  # LISTEN
                continue
            addr, port = fields[1].split(":")
            raw = bytes.fromhex(addr)
            if width == 8:
                host = socket.inet_ntop(socket.AF_INET, raw[::-1])
            else:  # four little-endian 32-bit words
                host = socket.inet_ntop(socket.AF_INET6, b"".join(
                    raw[i:i + 4][::-1] for i in range(0, 16, 4)))
            out[fields[9]] = (host, int(port, 16))
    return out


def _descendants(roots: Sequence[int]) -> dict[int, str]:
    """pid -> name (/proc/<pid>/comm) of the given processes and all below them."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = {}, list(roots)
    while todo:
        pid = todo.pop()
        try:
            out[pid] = open(f"/proc/{pid}/comm").read().strip()
        except OSError:
            continue
        todo += children.get(pid, [])
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _ray_bin() -> str:
    local = os.path.join(os.path.dirname(sys.executable), "ray")
    return local if os.path.exists(local) else (shutil.which("ray") or "ray")


class LocalCluster:
    """A head node and ``workers`` worker nodes, each with ``cpus`` CPUs, on this machine."""

    def __init__(self, workers: int = 1, cpus: int = 1, env: Mapping[str, str] | None = None):
        self.workers, self.cpus = workers, cpus
        self.env = {**os.environ, **(env or {})}
        # the jobs' `python` is this interpreter, as a cluster's image provides its own
        self.env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + self.env.get("PATH", "")
        self.env["RAY_USAGE_STATS_ENABLED"] = "0"
        self.env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # nothing to drain on stop
        # token authentication, as a real cluster should have: nodes and clients share the token
        self.env["RAY_AUTH_MODE"] = "token"
        self.env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.temp_dir = os.path.join(tempfile.gettempdir(), f"rc-{uuid.uuid4().hex[:6]}")
        self.procs: list[subprocess.Popen] = []

    @property
    def address(self) -> str:
        """The Jobs API address that `ray job submit --address` takes."""
        return f"http://{HOST}:{self.dashboard_port}"

    def _start_node(self, head: bool) -> None:
        args = [_ray_bin(), "start", "--block", f"--num-cpus={self.cpus}",
                f"--node-ip-address={HOST}", f"--object-store-memory={OBJECT_STORE_BYTES}",
                f"--dashboard-agent-listen-port={free_port()}",
                f"--dashboard-agent-grpc-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
                "--disable-usage-stats"]
        if head:
            args += ["--head", f"--port={self.gcs_port}", f"--temp-dir={self.temp_dir}",
                     "--include-dashboard=true", f"--dashboard-host={HOST}",
                     f"--dashboard-port={self.dashboard_port}",
                     ]
        else:
            args += [f"--address={HOST}:{self.gcs_port}"]
        out = open(os.path.join(tempfile.gettempdir(), f"{os.path.basename(self.temp_dir)}-"
                                f"{len(self.procs)}.log"), "wb")
        self.procs.append(subprocess.Popen(args, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True))

    def _wait_nodes(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError("a Ray node exited while starting; see its log in "
                                   f"{tempfile.gettempdir()}/{os.path.basename(self.temp_dir)}-*.log")
            status = subprocess.run([_ray_bin(), "status", f"--address={HOST}:{self.gcs_port}"],
                                    env=self.env, capture_output=True, text=True, check=False)
            if status.returncode == 0 and status.stdout.count("node_") >= count:
                return
            time.sleep(1)
        raise TimeoutError(f"the local cluster did not reach {count} nodes in {timeout:.0f} s")

    def start(self, timeout: float = 120) -> LocalCluster:
        t = time.monotonic()
        self._start_node(head=True)
        self._wait_nodes(1, timeout)
        for _ in range(self.workers):
            self._start_node(head=False)
        self._wait_nodes(1 + self.workers, timeout)
        log.info("local Ray cluster: %d nodes, jobs API at %s (%.1f s)", 1 + self.workers,
                 self.address, time.monotonic() - t)
        return self

    def submit(self, entrypoint: Sequence[str], working_dir: str = ".",
               timeout: float = 600) -> tuple[int, str, float]:
        """`ray job submit --working-dir DIR -- ENTRYPOINT`: (exit status, its output, seconds)."""
        args = [_ray_bin(), "job", "submit", f"--address={self.address}",
                f"--working-dir={working_dir}", "--", *entrypoint]
        t = time.monotonic()
        proc = subprocess.run(args, env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=False)
        return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - t

    def listeners(self) -> list[tuple[str, int, str]]:
        """(address, port, process name) of every TCP socket the cluster's processes listen on."""
        sockets = _listening()
        return sorted((*sockets[inode], name)
                      for pid, name in _descendants([p.pid for p in self.procs]).items()
                      for inode in _socket_inodes(pid) if inode in sockets)

    def stop(self) -> None:
        for proc in reversed(self.procs):  # workers first, then the head
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
