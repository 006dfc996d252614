"""Turn a job's frozen settings dataclass into command-line flags, and run the job.

Each field becomes ``--field-name``; its help text and choices come from the field's metadata:

    @dataclass(frozen=True)
    class Settings:
        source: str = field(metadata={"help": "dataset root, local path or s3://"})
        size: int = field(default=64, metadata={"help": "output side in pixels"})

    def main(argv=None):
        cli.main(Settings, run, argv, __doc__)

Fields without a default are required flags; a bool that defaults to off is a switch
(``--overwrite``), one that is on or unset by default also has ``--no-flag``; tuples take
comma-separated values. Each default is shown once, unless the help text already says it.
A flag that was renamed stays known for one release under its old name, in the class's
``RENAMED`` (``{"old_name": "new_name"}``): given, it fails in one line naming the new one.
``--verbose`` (Ray's own lines) is added to the jobs that start Ray.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import signal
import sys
import threading
import types
import typing
from collections.abc import Callable, Sequence

from common import storage
from common.errors import ConfigError, find_config_error

log = logging.getLogger(__name__)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _tuple_parser(item: type) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        return tuple(item(part.strip()) for part in text.split(",") if part.strip())

    return parse


def build_parser(cls: type, description: str | None = None,
                 prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        optional = typing.get_origin(kind) in (typing.Union, types.UnionType)
        if optional:
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        kwargs: dict = {"help": f.metadata.get("help", ""), "dest": f.name}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if kind is bool and f.default is False:
            kwargs["action"] = "store_true"  # an off switch: no meaningless --no-flag
        elif kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction  # on by default, or unset (None)
        elif typing.get_origin(kind) is tuple:
            kwargs["type"] = _tuple_parser(typing.get_args(kind)[0])
            kwargs["metavar"] = "A,B,..."
        else:
            kwargs["type"] = kind
        if f.default is not dataclasses.MISSING:
            kwargs["default"] = f.default
            if "default" not in kwargs["help"] and f.default is not False:
                kwargs["help"] += f" (default: {_show(f.default)})"
        elif f.default_factory is not dataclasses.MISSING:
            kwargs["default"] = f.default_factory()
        else:
            kwargs["required"] = True
        parser.add_argument(_flag(f.name), **kwargs)
    for old, new in getattr(cls, "RENAMED", {}).items():
        parser.add_argument(_flag(old), nargs="?", help=argparse.SUPPRESS, action=_Renamed,
                            default=argparse.SUPPRESS, new=_flag(new))
    return parser


class _Renamed(argparse.Action):
    """A flag's old name: one line naming the new one."""

    def __init__(self, *args, new: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        raise ConfigError(f"{option_string} is now {self.new}")


def _show(value: object) -> str:
    if value is None or value == ():
        return "none"
    if value is True:
        return "on"
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def parse(cls: type, argv: Sequence[str] | None = None, description: str | None = None,
          prog: str | None = None, uses_ray: bool = True):
    """Parse flags into an instance of the settings dataclass ``cls``."""
    return _parse(cls, argv, description, prog, uses_ray)[0]


def _parse(cls: type, argv: Sequence[str] | None, description: str | None,
           prog: str | None = None, uses_ray: bool = True) -> tuple[object, bool]:
    """The settings, and whether ``--verbose`` (not a setting; jobs that start Ray) was given."""
    parser = build_parser(cls, description, prog or _prog(cls))
    if uses_ray:
        parser.add_argument("--verbose", action="store_true",
                            help="also show Ray's own lines: its INFO logs and the workers' output")
    args = vars(parser.parse_args(argv))
    verbose = args.pop("verbose", False)
    return cls(**args), verbose


def _prog(cls: type) -> str:
    """How the user ran the job: its console script (fooling-attack), else python -m module."""
    script = os.path.basename(sys.argv[0]) if sys.argv else ""
    if script.startswith("fooling-"):
        return script
    main = getattr(sys.modules.get("__main__"), "__spec__", None)  # python -m <this module>
    return f"python -m {main.name if main is not None else module_name(cls)}"


def module_name(cls: type) -> str:
    """The importable name of the module that defines ``cls``, also when it runs as ``-m``."""
    module = sys.modules.get(cls.__module__)
    spec = getattr(module, "__spec__", None)
    return spec.name if spec is not None else cls.__module__


class _MainName(logging.Filter):
    """Log records of a module run with ``python -m`` carry its name, not ``__main__``."""

    def __init__(self, name: str):
        super().__init__()
        self.main = name

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "__main__":
            record.name = self.main
        return True


def setup_logging(verbose: bool = False) -> None:
    """Our lines at INFO on stderr, named by module (``pipelines.ingest``, also under ``-m``).

    ``verbose`` also lets Ray's own lines through when the job connects (connect_ray).
    """
    global _verbose
    _verbose = verbose
    logging.basicConfig(level=logging.INFO, force=True, handlers=[_Stderr()])
    for handler in logging.getLogger().handlers:
        handler.setFormatter(_Lines(terminal=sys.stderr.isatty()))
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_MainName(spec.name))


class _Stderr(logging.StreamHandler):
    """A handler on whatever ``sys.stderr`` is when a line is written, not the stream it was
    when logging was set up (a tool or a test may have replaced or closed that one since)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ sets it; the property decides
        pass


class _Lines(logging.Formatter):
    """For a person at a terminal ``16:20:01 training.train: message`` (the level only when it
    is a warning or worse); in a file, full timestamps and every level."""

    def __init__(self, terminal: bool):
        if terminal:
            super().__init__("%(asctime)s %(name)s: %(message)s", "%H:%M:%S")
        else:
            super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.terminal = terminal

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        if self.terminal and record.levelno >= logging.WARNING:
            stamp, rest = line.split(" ", 1)
            line = f"{stamp} {record.levelname} {rest}"
        return line


_verbose = False  # set once per process by setup_logging, like the logging configuration itself

# Lines Ray prints on every successful run that look like trouble and are not: the notice that
# token authentication is on (it is how a cluster should run).
_RAY_NOTICES = ("ray._private.authentication.authentication_token_setup",)


def _quiet_ray() -> None:
    """Ray's own console lines at WARNING and above only; its log files keep everything."""
    import ray.data
    from ray._private.log import PlainRayHandler
    from ray.util.debug import log_once

    for name in _RAY_NOTICES:
        logging.getLogger(name).setLevel(logging.ERROR)
    # Ray Data logs each dataset's execution plan and progress at INFO to the console
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, PlainRayHandler):
            handler.setLevel(logging.WARNING)
    # the jobs show their own progress (common/progress.py); Ray Data's bars count blocks. It
    # warns, once per process, that its bars are off: that once is spent here.
    ray.data.DataContext.get_current().enable_progress_bars = False
    log_once("ray_data_progress_manager_disabled")
    # a failed task's error, logged by Ray Data with its traceback, is raised in the driver too,
    # where main prints it in one line; Ray Data's log file keeps the traceback
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, PlainRayHandler):
            handler.addFilter(lambda record: record.levelno < logging.ERROR)


def connect_ray(verbose: bool | None = None, dashboard: bool | None = None) -> None:
    """Connect to Ray: the cluster under ``ray job submit`` (``RAY_ADDRESS``), else a local one.

    Jobs call this after their checks, so that bad configuration fails before Ray starts. By
    default the driver prints the job's own lines only: the workers' output stays in Ray's log
    files (``/tmp/ray/session_latest/logs``) and the jobs' progress and results reach the driver
    through common/progress.py. ``verbose`` (``--verbose``) brings Ray's lines back.
    ``dashboard=False`` starts a local Ray without its dashboard (about 2 s less start-up on 2
    cores); a cluster's dashboard is the cluster's business.
    """
    import ray  # imported here so that --help and flag errors answer without loading Ray

    verbose = _verbose if verbose is None else verbose
    if not sys.stderr.isatty():  # no colour codes in a log file
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    if not verbose:
        _quiet_ray()
    if not ray.is_initialized():
        global _started_ray
        with _held_signals():  # a Ctrl-C inside ray.init has ended in a segfault
            ray.init(logging_level=logging.INFO if verbose else logging.WARNING,
                     log_to_driver=verbose, include_dashboard=dashboard)
            _started_ray = True
            _take_signals()  # back from Ray's C++ handler, which prints a stack on SIGTERM


_started_ray = False  # whether this process started (or connected to) Ray: main stops it


INTERRUPTED = "interrupted; the same command resumes"


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM in a job. A KeyboardInterrupt, so that Ray's blocking calls, which look
    for Ctrl-C while they wait, give way to it (they raise a plain KeyboardInterrupt instead:
    the signal's number is kept in _signals)."""


@dataclasses.dataclass
class _Signals:
    received: int | None = None  # the first SIGINT or SIGTERM: it decides the exit status
    holding: bool = False  # while Ray starts or stops, a signal is noted, not raised
    owned: Callable | None = None  # while main's handlers are in place: the real signal.signal


_signals = _Signals()
_CAUGHT = (signal.SIGINT, signal.SIGTERM)


def _on_signal(signum: int, frame) -> None:
    if _signals.received is None:
        _signals.received = signum
    if not _signals.holding:
        raise Interrupted(signum)


@contextlib.contextmanager
def _owning_signals():
    """SIGINT and SIGTERM raise Interrupted in the main thread while a job runs.

    Ray and its libraries set handlers of their own in the driver: ray.init one for SIGTERM
    that exits in the middle of whatever runs (a C++ abort, Ray's processes left behind), Ray
    Train's fit one for SIGINT that aborts the run and returns as if it had ended, Ray Tune's
    one that ends a sweep early with partial results. So, like Ray's own DeferSigint, this
    leaves ``signal.signal`` unable to change these two signals in this process while the job
    runs; other signals and other processes (forked workers) are untouched.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    real, pid = signal.signal, os.getpid()
    before = {s: signal.getsignal(s) for s in _CAUGHT}
    _signals.received, _signals.holding = None, False

    def kept(signum, handler):
        if signum in _CAUGHT and os.getpid() == pid:
            return signal.getsignal(signum)
        return real(signum, handler)

    signal.signal, _signals.owned = kept, real
    _take_signals()
    try:
        yield
    finally:
        signal.signal, _signals.owned = real, None
        for s, handler in before.items():
            real(s, handler)


def _take_signals() -> None:
    """Point SIGINT and SIGTERM at _on_signal, in the kernel too (sigaction): starting Ray puts
    its C++ failure handler on SIGTERM underneath Python's."""
    if _signals.owned is not None:
        for s in _CAUGHT:
            _signals.owned(s, _on_signal)


@contextlib.contextmanager
def _held_signals():
    """A SIGINT or SIGTERM that arrives inside the block is raised once the block is done."""
    held, _signals.holding = _signals.holding, True
    try:
        yield
    finally:
        _signals.holding = held
    if _signals.owned and not held and _signals.received is not None:
        raise Interrupted(_signals.received)


def _end(status: int, line: str) -> typing.NoReturn:
    """Stop the Ray this process started (its processes with it), print ``line``, exit."""
    _signals.holding = True  # a second Ctrl-C while Ray stops is noted, not raised
    if _started_ray:
        import ray

        ray.shutdown()
    print(line, file=sys.stderr, flush=True)
    sys.exit(status)


def _output(cfg: object) -> str | None:
    """The job's output, where a full disk is reported when the error names no file."""
    return getattr(cfg, "output", None)


def main(cls: type, run: Callable, argv: Sequence[str] | None, description: str | None,
         uses_ray: bool = True) -> None:
    """Parse flags and call ``run(settings)``.

    A ``ConfigError``, or a storage failure (storage.describe_error: S3 refused or unreachable,
    a full disk), ends the process with one sentence on stderr and exit status 2; SIGINT
    (Ctrl-C) or SIGTERM with INTERRUPTED and 130 or 143. Either way, the Ray that the job
    started is shut down first, its processes with it.
    """
    try:
        cfg, verbose = _parse(cls, argv, description, uses_ray=uses_ray)
    except ConfigError as e:  # a renamed flag, or settings refused as they are made
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    setup_logging(verbose)
    with _owning_signals():
        try:
            run(cfg)
        except KeyboardInterrupt:
            _end(128 + (_signals.received or signal.SIGINT), INTERRUPTED)
        except ConfigError as e:  # raised for an S3 failure, it is said as the others are
            _end(2, f"error: {storage.describe_error(e) or e}")
        except Exception as e:
            if _signals.received is not None:  # Ray turned the interrupt into an error of its own
                _end(128 + _signals.received, INTERRUPTED)
            line = storage.describe_error(e, output=_output(cfg)) or find_config_error(e)
            if line is None:
                raise
            _end(2, f"error: {line}")
