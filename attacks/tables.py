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
    # exact-l2's median minimal L2 over the same pairs as median_linf; None where it did not run
    # (or fooled none)
    median_l2: float | None = None

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
         "fooled", "median L2 to fool (exact-l2)"], "lrrrrrlrr",
        ([r.series, f"{r.reg:g}", f"{r.robust_eps:g}", str(r.round), f"{r.val_top1:.1%}",
          "none fooled" if r.median_linf is None else f"{r.median_linf:g}", r.method,
          f"{r.success_rate:.1%}", "–" if r.median_l2 is None else f"{r.median_l2:.4g}"]
         for r in rows))


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


# The columns added to frontier tables since the first ones, each with its default, in the
# groups they came in: series and round, then median_l2
_ADDED = (("series", "round"), ("median_l2",))


def read_frontier(uri: str) -> list[FrontierRow]:
    """The rows of a finished frontier output; a table written before a group of the _ADDED
    columns reads with their defaults (before series and round: L2 and robust rows of round 0;
    before median_l2: None)."""
    try:
        return read_table(uri, "frontier", FRONTIER, FrontierRow)
    except ConfigError:
        missing = _missing_added(uri)
        if not missing:
            raise
    before = make_dataclass("_FrontierBefore", [
        (f.name, f.type) for f in fields(FrontierRow) if f.name not in missing], frozen=True)
    return [FrontierRow(**asdict(r)) for r in read_table(uri, "frontier", FRONTIER, before)]


def _missing_added(uri: str) -> set[str]:
    """The groups of _ADDED columns that the frontier table lacks whole; none when it lacks part
    of a group (damaged) or its schema cannot be read."""
    fs, path = storage.filesystem(storage.join(uri, f"{FRONTIER}.parquet"))
    try:
        names = pq.read_schema(path, filesystem=fs).names
    except (OSError, ValueError):
        return set()
    missing = set()
    for group in _ADDED:
        absent = {c for c in group if c not in names}
        if absent and absent != set(group):
            return set()
        missing |= absent
    return missing


def write_transfer(out: str, rows: list[TransferRow]) -> list[dict]:
    """Write transfer.parquet and transfer.md; returns their manifest entries."""
    return write_table(out, TRANSFER, TransferRow, rows, transfer_markdown(rows))


def read_transfer(uri: str) -> list[TransferRow]:
    """The rows of a finished transfer output."""
    return read_table(uri, "transfer", TRANSFER, TransferRow)
