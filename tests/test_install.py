"""The project installs like a Python package: one console script per job, each a job's main,
installed beside the interpreter, answering --help; the README lists them all. And a plain
``pip install`` (no extras, not editable) into a fresh virtualenv runs the jobs end to end from any
directory, with what the wheel carries and nothing from the repository."""

from __future__ import annotations

import fcntl
import importlib
import os
import re
import select
import shutil
import struct
import subprocess
import sys
import termios
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.attacked import fit_model

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
JOBS = ("pipelines.sample", "pipelines.ingest", "pipelines.preview", "training.train",
        "training.sweep", "training.harden", "attacks.fool", "attacks.summary", "attacks.frontier",
        "attacks.transfer", "report.build", "report.show")


def test_every_job_has_one_script_and_the_readme_names_it():
    targets = {name: target.split(":") for name, target in SCRIPTS.items()}
    assert sorted(module for module, _ in targets.values()) == sorted(JOBS)
    readme = (ROOT / "README.md").read_text()
    for name, (module, attr) in targets.items():
        assert attr == "main" and callable(getattr(importlib.import_module(module), attr))
        assert f"`{name}`" in readme, f"the README does not name {name}"


# --- a plain install into a fresh virtualenv ------------------------------------------------------

# What pip prints when it cannot reach a package index at all: the one reason to skip.
UNREACHABLE = ("NewConnectionError", "Failed to establish a new connection",
               "Temporary failure in name resolution", "Name or service not known",
               "Network is unreachable", "No route to host", "ConnectTimeoutError", "ProxyError")
BROKEN = ("Traceback", "ModuleNotFoundError", "ImportError")


def _source(dest: Path) -> Path:
    """The repository's files as git sees them (tracked, and new ones not ignored): what
    ``pip install .`` builds from, without the ignored outputs of earlier builds (``build/``,
    ``*.egg-info``, which setuptools would reuse) and without writing any in the working tree."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in filter(None, names.split("\0")):
        if (ROOT / name).is_file():  # a tracked file deleted in the working tree is listed too
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


def _pip_install(python: Path, *args: str) -> None:
    """A plain ``pip install`` (no extras, not editable). --no-compile: the modules a job imports
    are compiled at its first start instead of all of them here (25 s less on 2 cores)."""
    r = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-compile", *args],
                       capture_output=True, text=True, timeout=1200)
    out = r.stdout + r.stderr
    if r.returncode != 0 and any(s in out for s in UNREACHABLE):
        pytest.skip(f"pip cannot reach a package index: {out.strip().splitlines()[-1]}")
    assert r.returncode == 0, f"pip install {' '.join(args)}:\n{out[-3000:]}"


def _logged(cmd: list[str], env: dict, cwd: Path, log: Path) -> str:
    """Run a job with its output to a file, as under a log; returns the output."""
    with open(log, "wb") as f:
        r = subprocess.run(cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=f,
                           stderr=subprocess.STDOUT, timeout=900)
    out = log.read_text(errors="replace")
    assert r.returncode == 0, f"{' '.join(cmd)} exited {r.returncode}:\n{out[-3000:]}"
    return out


def _on_terminal(cmd: list[str], env: dict, cwd: Path, timeout: float = 900) -> str:
    """Run a job with its output on a pseudo-terminal of 100 columns, as a person at a terminal
    sees it (progress bars drawn); returns what the terminal received."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=slave,
                            stderr=slave)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 1.0)[0]:
                try:
                    data = os.read(master, 1 << 16)
                except OSError:  # EIO: every writer has closed the terminal
                    data = b""
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:  # ended, and 1 s of quiet (a child may hold it)
                break
        else:  # timed out: killed, so its status fails the check below
            proc.kill()
    finally:
        os.close(master)
        status = proc.wait(timeout=60)
    out = b"".join(chunks).decode(errors="replace")
    assert status == 0, f"{' '.join(cmd)} exited {status}:\n{out[-3000:]}"
    return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Iterator[tuple[dict, Path]]:
    """A fresh virtualenv with torch 2.13.0 (pinned first, as the Dockerfile does: a looser
    request pulls a CUDA build of several GB) and the project: (environment, work folder).
    The virtualenv (1.8 GB) is removed afterwards; the jobs' outputs stay with pytest's."""
    tmp = tmp_path_factory.mktemp("install")
    try:
        yield _install(tmp)
    finally:  # removed in the background: 1.8 GB of small files take the disk tens of seconds
        subprocess.Popen(["rm", "-rf", str(tmp / "venv")], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)


def _install(tmp: Path) -> tuple[dict, Path]:
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    _pip_install(python, "torch==2.13.0")
    _pip_install(python, str(_source(tmp / "source")))
    # the repository is nowhere on the path, and no Ray to join: each job starts its own
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "RAY_ADDRESS", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    work = tmp / "work"
    work.mkdir()
    return env, work


def _check(out: str, job: str) -> None:
    for word in BROKEN:
        assert word not in out, f"{job} printed {word}:\n{out[-3000:]}"


@pytest.mark.slow  # 2 cores: venv and pip 35 s, the jobs about a minute (two local Rays)
@pytest.mark.skipif(not os.environ.get("FOOLING_INSTALL_TEST"), reason=(
    "a fresh venv and a plain install take 2 minutes of make test's 15: make test-install"))
def test_a_plain_install_runs_every_job(installed):
    """Every console script answers --help; sample -> ingest -> attack -> summary -> report runs
    from outside the repository, the attack on a terminal, the others to a log. The attack runs
    template and sign: exact's numba search would compile at this first use (25 s), as `make
    install` has it compile once in the project's own venv. The model is
    fitted here with numpy, as the shared fixtures do: a Ray Train run costs the suite 95 s; what
    training adds to the attack's imports (Ray Train, Ray Tune) is imported in the new venv."""
    env, work = installed
    helps = {name: subprocess.Popen([name, "--help"], env=env, cwd=work, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for name in sorted(SCRIPTS)}
    for name, proc in helps.items():
        out = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0 and out.startswith(f"usage: {name} "), out[-3000:]

    def logged(*cmd: str) -> str:
        out = _logged(list(cmd), env, work, work / f"{cmd[0]}.log")
        _check(out, cmd[0])
        return out

    logged("fooling-sample", "--kind", "shapes", "--output", "sample", "--classes", "3",
           "--train-per-class", "6", "--val-per-class", "2", "--num-workers", "1")
    logged("fooling-ingest", "--source", "sample", "--output", "data")
    fit_model(str(work / "data"), str(work / "model"))
    python = shutil.which("python", path=env["PATH"])
    imports = subprocess.run([python, "-c", "import ray.train.torch, ray.tune, training.worker, "
                              "training.sweep; print(training.worker.__file__)"], env=env,
                             cwd=work, capture_output=True, text=True, timeout=300)
    assert imports.returncode == 0, imports.stderr[-3000:]
    assert "site-packages" in imports.stdout  # the installed copy, not the repository's
    shown = _on_terminal(["fooling-attack", "--data", "data", "--model", "model", "--output",
                          "fooling", "--limit-images", "2", "--targets", "0,1",
                          "--methods", "template,sign", "--num-workers", "1"], env, work)
    _check(shown, "fooling-attack")
    assert re.search(r"attack: +\d+%\|", shown), shown[-3000:]  # tqdm's bar, on the terminal
    summary = logged("fooling-summary", "--results", "fooling")
    assert re.search(r"sign +fooled", summary), summary
    logged("fooling-report", "--results", "fooling", "--output", "report")
    for out in ("data", "model", "fooling", "report"):
        assert (work / out / "manifest.json").is_file(), out
    assert (work / "report" / "index.html").stat().st_size > 0
