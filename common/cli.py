"""Turn a job's frozen settings dataclass into command-line flags, and run the job.

Each field becomes ``--field-name``; its help text and choices come from the field's metadata:

    @dataclass(frozen=True)
    class Settings:
        source: str = field(metadata={"help": "dataset root, local path or s3://"})
        size: int = field(default=64, metadata={"help": "output side in pixels"})

    def main(argv=None):
        cli.main(Settings, run, argv, __doc__)

Fields without a default are required flags; bools become ``--flag/--no-flag``; tuples take
comma-separated values.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import types
import typing
from collections.abc import Callable, Sequence

from common.errors import ConfigError

log = logging.getLogger(__name__)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _tuple_parser(item: type) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        return tuple(item(part.strip()) for part in text.split(",") if part.strip())

    return parse


def build_parser(cls: type, description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if typing.get_origin(kind) in (typing.Union, types.UnionType):
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        kwargs: dict = {"help": f.metadata.get("help", ""), "dest": f.name}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is tuple:
            kwargs["type"] = _tuple_parser(typing.get_args(kind)[0])
            kwargs["metavar"] = "A,B,..."
        else:
            kwargs["type"] = kind
        if f.default is not dataclasses.MISSING:
            kwargs["default"] = f.default
            if f.default is not None and kind is not bool:
                kwargs["help"] += f" (default: {_show(f.default)})"
        elif f.default_factory is not dataclasses.MISSING:
            kwargs["default"] = f.default_factory()
        else:
            kwargs["required"] = True
        parser.add_argument(_flag(f.name), **kwargs)
    return parser


def _show(value: object) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def parse(cls: type, argv: Sequence[str] | None = None, description: str | None = None):
    """Parse flags into an instance of the settings dataclass ``cls``."""
    args = build_parser(cls, description).parse_args(argv)
    return cls(**vars(args))


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )


def connect_ray() -> None:
    """Connect to Ray: the cluster under ``ray job submit`` (``RAY_ADDRESS``), else a local one.

    Jobs call this after their checks, so that bad configuration fails before Ray starts.
    """
    import ray  # imported here so that --help and flag errors answer without loading Ray

    if not ray.is_initialized():
        ray.init(logging_level=logging.WARNING)


def main(cls: type, run: Callable, argv: Sequence[str] | None, description: str | None) -> None:
    """Parse flags and call ``run(settings)``.

    A ``ConfigError`` ends the process with its one sentence on stderr and exit status 2.
    """
    cfg = parse(cls, argv, description)
    setup_logging()
    try:
        run(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
