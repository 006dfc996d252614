"""The settings-dataclass -> flags helper (common/cli.py)."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import pytest

from common import cli


@dataclass(frozen=True)
class Example:
    source: str = field(metadata={"help": "where from"})
    size: int = field(default=64, metadata={"help": "side in pixels"})
    rate: float = field(default=0.5, metadata={"help": "a rate"})
    splits: tuple[str, ...] = field(default=("train", "val"), metadata={"help": "which"})
    limit: int | None = field(default=None, metadata={"help": "at most"})
    mode: str = field(default="squash", metadata={"help": "how", "choices": ("squash", "crop")})
    overwrite: bool = field(default=False, metadata={"help": "replace"})


def test_defaults_and_types():
    cfg = cli.parse(Example, ["--source", "s3://b/x"])
    assert cfg == Example(source="s3://b/x")
    cfg = cli.parse(Example, ["--source", "x", "--size", "32", "--rate", "1e-3", "--splits", "val",
                              "--limit", "5", "--mode", "crop", "--overwrite"])
    assert cfg == Example("x", 32, 1e-3, ("val",), 5, "crop", True)


def test_bad_flags_exit_with_usage(capsys):
    for argv in ([], ["--source", "x", "--mode", "stretch"], ["--source", "x", "--size", "big"]):
        with pytest.raises(SystemExit) as e:
            cli.parse(Example, argv)
        assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_help_explains_every_flag():
    text = cli.build_parser(Example, "doc").format_help()
    for f in fields(Example):
        assert "--" + f.name.replace("_", "-") in text
        assert f.metadata["help"] in text
    assert "(default: train,val)" in text and "(default: none)" in text
    assert "--overwrite" in text and "--no-overwrite" not in text  # a switch, no negation
    assert text.count("default:") == sum(f.default is not False for f in fields(Example)
                                         if f.default is not dataclasses.MISSING)


@pytest.mark.parametrize("module", ["pipelines.ingest", "pipelines.sample", "pipelines.preview",
                                    "training.train"])
def test_job_help_runs(module):
    """The usage names the module the user ran (training.train, whose settings live elsewhere)."""
    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert out.startswith(f"usage: python -m {module} ") and "--" in out
    assert "(default: all) (default" not in out
    # --verbose brings back Ray's own lines: only the jobs that start Ray have it
    assert ("--verbose" in out) == (module in ("pipelines.ingest", "training.train"))


def test_verbose_is_no_setting(capsys):
    """--verbose selects what is printed, so it stays out of the settings (and the manifests)."""
    cfg, verbose = cli._parse(Example, ["--source", "x", "--verbose"], None)
    assert verbose and cfg == cli.parse(Example, ["--source", "x"])


JOBS = ["pipelines.ingest", "pipelines.sample", "pipelines.preview", "training.train",
        "training.sweep", "training.harden", "attacks.fool", "attacks.summary", "report.build",
        "attacks.frontier", "attacks.transfer"]


def test_help_answers_without_importing_ray_or_pyplot():
    """Every job's flags come from its module alone: --help needs no Ray, and no module selects a
    matplotlib backend or loads pyplot's global state."""
    code = "\n".join([
        "import importlib, sys",
        "from common import cli",
        f"for name in {JOBS!r}:",
        "    cli.build_parser(importlib.import_module(name).Settings).format_help()",
        "import report.charts, attacks.figures, report.models, common.templates",
        "print(sorted(m for m in ('ray', 'matplotlib.pyplot') if m in sys.modules))",
    ])
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_reading_commands_do_not_load_torch():
    """The attack's summary and report read Parquet and draw: torch (2 to 4 s to import on 2
    cores, once pulled in by a constant of the template attack) stays out of them."""
    code = ("import sys, attacks.summary, report.build, report.show\n"
            "print('torch' in sys.modules, 'numba' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False False"


# --- failures from outside: signals and storage, each in one line (main) -------------------------


@dataclass(frozen=True)
class Nothing:
    output: str = field(default="out", metadata={"help": "where"})


def _main(run) -> int:
    with pytest.raises(SystemExit) as e:
        cli.main(Nothing, run, [], None)
    return e.value.code


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_ends_a_job_in_one_line(capsys, sig, status):
    before = signal.getsignal(sig)

    def run(cfg):
        os.kill(os.getpid(), sig)
        time.sleep(5)  # the handler raises here, in the main thread
        raise AssertionError("not interrupted")

    assert _main(run) == status
    assert capsys.readouterr().err == cli.INTERRUPTED + "\n"
    assert signal.getsignal(sig) is before  # the handlers main found are back


def test_a_signal_while_ray_starts_is_raised_once_it_has_started(capsys):
    done = []

    def run(cfg):
        with cli._held_signals():  # what connect_ray holds around ray.init
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
            done.append("init")
        done.append("after")

    assert _main(run) == 130 and done == ["init"]
    assert capsys.readouterr().err == cli.INTERRUPTED + "\n"


def test_libraries_cannot_take_the_signals_while_a_job_runs(capsys):
    """Ray Train's fit sets a SIGINT handler that 'gracefully' aborts the run and returns;
    ray.init one for SIGTERM that exits mid-call. While a job runs, main's stay."""
    seen = []

    def run(cfg):
        signal.signal(signal.SIGINT, lambda *a: seen.append("library's"))
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)

    assert _main(run) == 143 and seen == []
    usr1 = signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # other signals are free
    signal.signal(signal.SIGUSR1, usr1)


@pytest.mark.parametrize("error, line", [
    (OSError(errno.ENOSPC, "Error writing bytes to file", "/x/train/part-00003.parquet"),
     "error: /x/train/part-00003.parquet: No space left on device"),
    (OSError(errno.ENOSPC, "Error writing bytes to file"), "error: out: No space left on device"),
    (OSError("When getting information for key 'p/manifest.json' in bucket 'b': AWS Error "
             "ACCESS_DENIED during HeadObject operation: No response body."),
     "error: s3://b/p/manifest.json: access denied (ACCESS_DENIED on HeadObject); check "
     "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL and AWS_REGION (or AWS_PROFILE)"),
])
def test_a_storage_error_escaping_a_job_is_one_line(capsys, error, line):
    def run(cfg):
        raise error

    assert _main(run) == 2
    assert capsys.readouterr().err == line + "\n"


def test_a_bug_still_shows_its_traceback():
    def run(cfg):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(Nothing, run, [], None)


# --- one vocabulary of flags across the jobs ------------------------------------------------------

JOBS = ("pipelines.sample", "pipelines.ingest", "pipelines.preview", "training.train",
        "training.sweep", "training.harden", "attacks.fool", "attacks.summary", "attacks.frontier",
        "attacks.transfer", "report.build", "report.show")
RAY_JOBS = {"pipelines.ingest", "training.train", "training.sweep", "attacks.fool",
            "attacks.frontier"}
# Names that said a size without its unit, or the same idea twice: each job's new name.
RETIRED = {"--out", "--workers", "--batch-rows"}


def flags(module: str) -> dict[str, str]:
    """--flag -> help text of a job, as its parser has them (the retired names hidden)."""
    import importlib

    mod = importlib.import_module(module)
    parser = cli.build_parser(mod.Settings)
    if module in RAY_JOBS:
        parser.add_argument("--verbose", action="store_true")
    return {s: a.help for a in parser._actions for s in a.option_strings
            if a.help != argparse.SUPPRESS}


def test_one_vocabulary_of_flags_across_the_jobs():
    every = {m: flags(m) for m in JOBS}
    for module, known in every.items():
        assert not RETIRED & set(known), (module, RETIRED & set(known))
        # --batch-size is training's global batch of samples only; other sizes say their unit
        assert ("--batch-size" in known) == (module in ("training.train", "training.sweep",
                                                        "training.harden"))
        assert ("--verbose" in known) == (module in RAY_JOBS), module
        assert "--output" in known or module in ("attacks.summary", "pipelines.preview")
        for flag in set(known) & {"--results", "--data", "--model"}:
            assert "--output" not in known or known[flag] != known["--output"], (module, flag)
    # the attack outputs a job reads are --results everywhere, the dataset --data
    assert "--results" in every["attacks.summary"] and "--output" not in every["attacks.summary"]
    assert all("--num-workers" in every[m] for m in ("attacks.fool", "attacks.frontier",
                                                      "training.train", "pipelines.sample"))


@pytest.mark.parametrize("module, old, new", [
    ("pipelines.sample", "--out", "--output"), ("attacks.summary", "--output", "--results"),
    ("attacks.fool", "--batch-size", "--pairs-per-batch"), ("attacks.fool", "--workers",
                                                             "--num-workers"),
    ("attacks.transfer", "--batch-rows", "--pairs-per-batch"),
    ("pipelines.ingest", "--batch-size", "--images-per-task"),
    ("attacks.frontier", "--workers", "--num-workers")])
def test_a_renamed_flag_says_its_new_name_in_one_line(module, old, new, capsys):
    import importlib

    with pytest.raises(SystemExit) as e:
        importlib.import_module(module).main([old, "x"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err == f"error: {old} is now {new}"



def test_log_lines_are_short_on_a_terminal_and_full_in_a_file():
    info = logging.LogRecord("training.train", logging.INFO, "x", 1, "epoch %d", (3,), None)
    warn = logging.LogRecord("training.train", logging.WARNING, "x", 1, "slow", (), None)
    term, file = cli._Lines(terminal=True), cli._Lines(terminal=False)
    assert re.fullmatch(r"\d\d:\d\d:\d\d training\.train: epoch 3", term.format(info))
    assert re.fullmatch(r"\d\d:\d\d:\d\d WARNING training\.train: slow", term.format(warn))
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO training\.train: epoch 3",
                        file.format(info))


# --- help in the users' words ---------------------------------------------------------------------

CONSTANT = re.compile(r"\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b")  # BUDGET_MB, LOG_STEP
SOURCE = re.compile(r"[\w./-]*\w\.py\b")  # attacks/worker.py, sources.py
PACKAGES = ("common", "pipelines", "training", "attacks", "report", "infra", "benchmarks")
MODULE = re.compile(rf"\b(?:{'|'.join(PACKAGES)})(?:\.\w+)+")  # common.progress
_STEMS = {p.stem for pkg in PACKAGES for p in (Path(cli.__file__).parents[1] / pkg).rglob("*.py")}
# a module's name and one of its names, schema.had_to_move (not a file: sample.json, model.pt)
MEMBER = re.compile(rf"\b(?:{'|'.join(sorted(_STEMS - {'__init__', '__main__'}))})\."
                    r"(?!(?:py|json|md|png|parquet|npz|pt|csv|txt|html|tar|mat)\b)[a-z_]\w*")


def code_names(text: str) -> list[str]:
    """The names of code in a text: constants, Python files, and modules or their members other
    than the jobs (a job's module is a command: python -m attacks.fool)."""
    return (CONSTANT.findall(text) + SOURCE.findall(text)
            + [m for m in MODULE.findall(text) if m not in JOBS] + MEMBER.findall(text))


def test_code_names_are_found():
    text = ("under BUDGET_MB; in steps of LOG_STEP decades; columns in common/schema.py; "
            "(pipelines/sources.py, tars.py); see common.progress, as attacks.fool does; "
            "schema.had_to_move")
    assert code_names(text) == ["BUDGET_MB", "LOG_STEP", "common/schema.py",
                                "pipelines/sources.py", "tars.py", "common.progress",
                                "schema.had_to_move"]
    assert code_names("ILSVRC2012_val_00000001, LOC_val_solution.csv, L-inf, python -m "
                      "attacks.fool, sample.json, model.pt, sweep.parquet, 0..255 HWC, "
                      "ln(C), e.g. the sample.") == []


@pytest.mark.parametrize("module", JOBS)
def test_help_speaks_the_users_words(module):
    """A job's --help (its description and every flag's help) says what a user can act on: the
    value and what it means, not the name of a constant, a source file or an internal module."""
    import importlib

    mod = importlib.import_module(module)
    parser = cli.build_parser(mod.Settings, mod.__doc__)
    assert mod.__doc__ and mod.__doc__.strip() in parser.format_help()
    texts = [mod.__doc__] + [a.help for a in parser._actions if a.help != argparse.SUPPRESS]
    assert [name for text in texts for name in code_names(text)] == []
