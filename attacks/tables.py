"""The attack's model-comparison tables: the frontier (attacks.frontier) and the transfer table
(attacks.transfer), each ``<out>/<name>.parquet`` beside ``<name>.md`` (common/tables.py).

A row's fields are the table's columns. No torch here: the report reads these tables too.

    >>> files = write_frontier("out/frontier", rows)    # rows: [FrontierRow]; manifest entries
    >>> rows = read_frontier("out/frontier")            # [FrontierRow], checked
    >>> rows = read_transfer("out/transfer")            # [TransferRow], checked
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, make_dataclass

import pyarrow.parquet as pq

from common import schema, storage
from common.errors import ConfigError
from common.tables import markdown, read_table, write_table

FRONTIER = schema.FRONTIER_TABLE
TRANSFER = schema.TRANSFER_TABLE


SERIES = ("L2", "robust", schema.HARDEN_PLAIN, *schema.HARDEN_MODES)  # the series column's values


@dataclass(frozen=True)
class FrontierRow:
    """One model of the sweeps, or one round of training.harden: its setting and accuracy (from
    its sweep or its round) against the strength that fools it (from its attack, or measured by
    harden the same way: exact, validation images)."""

    sweep: str  # the sweep or harden output the model came from (absolute URI)
    reg: float
    robust_eps: float
    val_top1: float
    val_top5: float
    method: str  # exact when it was run, else sign
    median_linf: float | None  # over the fooled pairs that had to move; None: none was fooled
    success_rate: float
    pairs: int
    model: str
    attack: str  # the attack output (absolute URI); for a harden round, the harden output
    series: str = ""  # L2, robust (from robust_eps when not given), plain, background, adversarial
    round: int = 0  # the harden round (0: the model as trained, a sweep's included)

    def __post_init__(self):
        if not self.series:  # frozen: set once, here
            object.__setattr__(self, "series", "robust" if self.robust_eps else "L2")


@dataclass(frozen=True)
class TransferRow:
    """One (source model, scoring model, method, origin): how the attack's stored images for the
    source model are classified by the scoring model."""

    source_model: str  # the model the attack made its images for
    scoring_model: str
    same_model: bool  # the scoring weights' sha256 is the attack's
    method: str
    origin: str  # val or noise
    pairs: int
    target_rate: float  # scored as the intended target
    moved_rate: float  # scored differently from the scoring model's class for the original
    median_p_target: float  # from a log10 histogram (attacks.transfer.LOG_STEP decades)


def frontier_markdown(rows: list[FrontierRow]) -> str:
    return markdown(
        ["series", "reg", "robust eps", "round", "val top-1", "median L-inf to fool", "method",
         "fooled"], "lrrrrrlr",
        ([r.series, f"{r.reg:g}", f"{r.robust_eps:g}", str(r.round), f"{r.val_top1:.1%}",
          "none fooled" if r.median_linf is None else f"{r.median_linf:g}", r.method,
          f"{r.success_rate:.1%}"] for r in rows))


def transfer_markdown(rows: list[TransferRow]) -> str:
    return markdown(
        ["scoring model", "same", "method", "origin", "pairs", "to target", "moved",
         "median p_target"], "llllrrrr",
        ([r.scoring_model, "yes" if r.same_model else "", r.method, r.origin, str(r.pairs),
          f"{r.target_rate:.1%}", f"{r.moved_rate:.1%}", f"{r.median_p_target:.3g}"]
         for r in rows))


def write_frontier(out: str, rows: list[FrontierRow]) -> list[dict]:
    """Write frontier.parquet and frontier.md; returns their manifest entries."""
    return write_table(out, FRONTIER, FrontierRow, rows, frontier_markdown(rows))


# The rows of frontier tables written before the series and round columns
_ADDED = ("series", "round")
_FrontierBefore = make_dataclass("_FrontierBefore", [
    (f.name, f.type) for f in fields(FrontierRow) if f.name not in _ADDED], frozen=True)


def read_frontier(uri: str) -> list[FrontierRow]:
    """The rows of a finished frontier output (a table written before the series and round
    columns reads as L2 and robust rows of round 0)."""
    try:
        return read_table(uri, "frontier", FRONTIER, FrontierRow)
    except ConfigError:
        fs, path = storage.filesystem(storage.join(uri, f"{FRONTIER}.parquet"))
        try:
            names = pq.read_schema(path, filesystem=fs).names
        except (OSError, ValueError):
            names = _ADDED
        if any(c in names for c in _ADDED):
            raise
    return [FrontierRow(**asdict(r)) for r in read_table(uri, "frontier", FRONTIER,
                                                         _FrontierBefore)]


def write_transfer(out: str, rows: list[TransferRow]) -> list[dict]:
    """Write transfer.parquet and transfer.md; returns their manifest entries."""
    return write_table(out, TRANSFER, TransferRow, rows, transfer_markdown(rows))


def read_transfer(uri: str) -> list[TransferRow]:
    """The rows of a finished transfer output."""
    return read_table(uri, "transfer", TRANSFER, TransferRow)
