"""The project installs like a Python package: one console script per job, each a job's main,
installed beside the interpreter, answering --help; the README lists them all."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
JOBS = ("pipelines.sample", "pipelines.ingest", "pipelines.preview", "training.train",
        "training.sweep", "attacks.fool", "attacks.summary", "attacks.frontier",
        "attacks.transfer", "report.build", "report.show")


def test_every_job_has_one_script_and_the_readme_names_it():
    targets = {name: target.split(":") for name, target in SCRIPTS.items()}
    assert sorted(module for module, _ in targets.values()) == sorted(JOBS)
    readme = (ROOT / "README.md").read_text()
    for name, (module, attr) in targets.items():
        assert attr == "main" and callable(getattr(importlib.import_module(module), attr))
        assert f"`{name}`" in readme, f"the README does not name {name}"


@pytest.mark.slow  # eleven interpreters starting: about 20 s
@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_each_installed_script_answers_help(name):
    script = Path(sys.executable).parent / name
    if not script.exists():
        pytest.skip(f"{name} is not installed beside {sys.executable} (pip install .)")
    r = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120,
                       cwd=os.path.expanduser("~"))  # from any directory
    assert r.returncode == 0 and r.stdout.startswith("usage: "), r.stderr[-500:]
