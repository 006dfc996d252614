"""Every command exits 0 after success, every time: run each one many times and count the codes.

    python -m benchmarks.exit_loop [--runs 200] [--ray-runs 3] [--jobs 2] [--s3] [--work DIR]

(``--ray-runs 0`` with a --work folder that already holds the chain's outputs runs only the
read-only commands.)

Builds a small chain once (sample -> ingest -> train -> fool -> report, on local Ray), then runs
the quick read-only commands (``attacks.summary``, ``pipelines.preview``) ``--runs`` times each,
``--jobs`` at a time, and each Ray job (ingest, train, fool, report, with --overwrite)
``--ray-runs`` times more. With ``--s3`` the read-only commands also read copies of the outputs
from a local S3 server (infra/local_s3.py), so pyarrow's S3 client is set up and torn down too.

Prints one line per command: runs, how many exited 0, and the other exit codes with the first
stderr tail seen for each. Exits 1 if any run did not exit 0. Not part of ``make test``:
tests/test_fool.py keeps a short loop of its own.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_once(argv: list[str], env: dict) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=900, check=False)
    return proc.returncode, proc.stderr[-400:]


def loop(name: str, argv: list[str], runs: int, jobs: int, env: dict) -> bool:
    with ThreadPoolExecutor(jobs) as pool:
        results = list(pool.map(lambda _: run_once(argv, env), range(runs)))
    codes = collections.Counter(rc for rc, _ in results)
    tails = {rc: tail for rc, tail in reversed(results) if rc != 0}
    print(f"{name:40s} {runs:4d} runs, {codes.get(0, 0):4d} rc 0"
          + "".join(f", {n} rc {rc}" for rc, n in sorted(codes.items()) if rc != 0), flush=True)
    for rc, tail in tails.items():
        print(f"    rc {rc}: ...{tail.strip()[-300:]}")
    return set(codes) == {0}


def chain(work: str) -> list[tuple[str, list[str]]]:
    """The Ray jobs in order, each writing under ``work``, small enough for a laptop."""
    j = os.path.join
    return [
        ("pipelines.sample", ["pipelines.sample", "--output", j(work, "sample"), "--classes", "4",
                              "--train-per-class", "40", "--val-per-class", "8"]),
        ("pipelines.ingest", ["pipelines.ingest", "--source", j(work, "sample"),
                              "--output", j(work, "imagenet64"), "--overwrite"]),
        ("training.train", ["training.train", "--data", j(work, "imagenet64"),
                            "--output", j(work, "model"), "--epochs", "1", "--overwrite"]),
        ("attacks.fool", ["attacks.fool", "--data", j(work, "imagenet64"), "--model",
                          j(work, "model"), "--output", j(work, "fooling"),
                          "--noise-images", "2", "--overwrite"]),
        ("report.build", ["report.build", "--results", j(work, "fooling"),
                            "--output", j(work, "report")]),
    ]


def readers(data: str, fooling: str) -> list[tuple[str, list[str]]]:
    return [(f"attacks.summary {fooling}", ["attacks.summary", "--results", fooling]),
            (f"pipelines.preview {data}", ["pipelines.preview", "--data", data])]


def to_s3(work: str, env: dict) -> tuple[object, str]:
    """Start a local S3 server and copy the outputs there; returns (server, s3 root)."""
    import pyarrow.fs as pafs

    from infra import local_s3

    server = local_s3.start(os.path.join(work, "s3"))
    env.update(server.env())
    os.environ.update(server.env())
    local_s3.create_bucket(server, "exit-loop")
    from common import storage

    for part in ("imagenet64", "fooling"):
        fs, path = storage.filesystem(f"s3://exit-loop/{part}")
        pafs.copy_files(os.path.join(work, part), path, destination_filesystem=fs)
    return server, "s3://exit-loop"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200, help="runs of each read-only command")
    parser.add_argument("--ray-runs", type=int, default=3, help="runs of each Ray job")
    parser.add_argument("--jobs", type=int, default=2, help="read-only runs at once")
    parser.add_argument("--s3", action="store_true", help="also read from a local S3 server")
    parser.add_argument("--work", help="working folder (default: a temporary one)")
    args = parser.parse_args(argv)
    work = args.work or tempfile.mkdtemp(prefix="exit-loop-")
    env = {**os.environ, "PYTHONPATH": ROOT}
    ok = True
    built = os.path.exists(os.path.join(work, "report", "index.html"))
    for name, cmd in chain(work):  # the Ray jobs one at a time: each takes the machine
        if not (built and args.ray_runs == 0):  # --ray-runs 0 reuses a chain already in --work
            ok &= loop(name, cmd, max(1, args.ray_runs) if name != "pipelines.sample" else 1,
                       1, env)
    targets = readers(os.path.join(work, "imagenet64"), os.path.join(work, "fooling"))
    server = None
    if args.s3:
        server, s3 = to_s3(work, env)
        targets += readers(f"{s3}/imagenet64", f"{s3}/fooling")
    try:
        for name, cmd in targets:
            ok &= loop(name, cmd, args.runs, args.jobs, env)
    finally:
        if server is not None:
            server.stop()
    print("all runs exited 0" if ok else "SOME RUNS DID NOT EXIT 0")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
