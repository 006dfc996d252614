"""What a run costs in memory: the peak RSS of a process tree, sampled while it runs, and what
Ray's object store spilled to disk.

    >>> with Peak(os.getpid()) as peak:     # this process and every descendant (Ray's included)
    ...     train.run(settings)
    >>> peak.max_rss_mb, peak.process       # the largest process and what it was
    >>> timed([sys.executable, "-m", "attacks.summary", "--results", out])  # a tool on its own

psutil is the copy Ray ships (ray/thirdparty_files, on sys.path once ray is imported): the
project does not depend on psutil itself.
"""

from __future__ import annotations

import subprocess
import threading
import time

import ray  # noqa: F401 - puts Ray's psutil on sys.path

import psutil  # isort: skip

INTERVAL_S = 0.2  # a sample every 0.2 s: a process's peak that lasts less may be missed
MB = 2**20


class Peak:
    """Samples the RSS of ``root`` and its descendants (recursively) in a thread while open.

    ``max_rss_mb``: the largest RSS of any one process at any sample; ``process``: which (its
    name and pid); ``max_private_mb``: the largest RSS less shared pages (libraries, and the
    object store's pages a Ray process has touched, which RSS counts in every such process);
    ``total_mb``: the largest sum of RSS over the tree at one sample (shared pages counted
    again for each process); ``read_mb``: the bytes the tree's processes read (read syscalls,
    page cache included), as last sampled.
    """

    def __init__(self, root: int, interval: float = INTERVAL_S):
        self.root, self.interval = root, interval
        self.max_rss_mb, self.max_private_mb, self.total_mb, self.process = 0.0, 0.0, 0.0, ""
        self.reads: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Peak:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        try:
            root = psutil.Process(self.root)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:  # the root has ended
            return
        total = 0.0
        for p in procs:
            try:
                mem = p.memory_info()
                self.reads[p.pid] = p.io_counters().read_chars
                name = p.name()
            except psutil.Error:  # ended between the listing and the reading
                continue
            rss = mem.rss / MB
            self.max_private_mb = max(self.max_private_mb, (mem.rss - mem.shared) / MB)
            total += rss
            if rss > self.max_rss_mb:
                self.max_rss_mb, self.process = rss, f"{name} (pid {p.pid})"
        self.total_mb = max(self.total_mb, total)

    @property
    def read_mb(self) -> float:
        return sum(self.reads.values()) / MB


def timed(cmd: list[str], env: dict | None = None) -> dict:
    """Run a command to its end: {seconds, peak_rss_mb, peak_process, read_mb, stdout}; a
    failure raises RuntimeError with the tail of its stderr."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    with Peak(proc.pid) as peak:
        stdout, stderr = proc.communicate()
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {proc.returncode}:\n{stderr[-3000:]}")
    return {"seconds": round(seconds, 3), "peak_rss_mb": round(peak.max_rss_mb, 1),
            "peak_process": peak.process, "read_mb": round(peak.read_mb, 1), "stdout": stdout}


def spilled_mb() -> float:
    """MiB Ray's object store has spilled to disk since the connected cluster started (every
    node's, as its raylets report them: what ``ray memory --stats-only`` prints)."""
    from ray._private import internal_api

    state = internal_api.get_state_from_address(ray.get_runtime_context().gcs_address)
    return internal_api.get_memory_info_reply(state).store_stats.spilled_bytes_total / MB
