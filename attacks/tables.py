"""The attack's model-comparison tables: the frontier (attacks.frontier) and the transfer table
(attacks.transfer), each ``<out>/<name>.parquet`` beside ``<name>.md`` (common/tables.py).

A row's fields are the table's columns. No torch here: the report reads these tables too.

    >>> files = write_frontier("out/frontier", rows)    # rows: [FrontierRow]; manifest entries
    >>> rows = read_frontier("out/frontier")            # [FrontierRow], checked
    >>> rows = read_transfer("out/transfer")            # [TransferRow], checked
"""

from __future__ import annotations

from dataclasses import dataclass

from common import schema
from common.tables import read_table, write_table

FRONTIER = schema.FRONTIER_TABLE
TRANSFER = schema.TRANSFER_TABLE


@dataclass(frozen=True)
class FrontierRow:
    """One model of the sweeps: its setting and accuracy (from its sweep) against the strength
    that fools it (from its attack, validation images)."""

    sweep: str  # the sweep output the model came from (absolute URI)
    reg: float
    robust_eps: float
    val_top1: float
    val_top5: float
    method: str  # exact when it was run, else sign
    median_linf: float | None  # over the fooled pairs that had to move; None: none was fooled
    success_rate: float
    pairs: int
    model: str
    attack: str  # the attack output (absolute URI)


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
    lines = ["| reg | robust eps | val top-1 | median L-inf to fool | method | fooled |",
             "|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        median = "none fooled" if r.median_linf is None else f"{r.median_linf:g}"
        lines.append(f"| {r.reg:g} | {r.robust_eps:g} | {r.val_top1:.1%} | "
                     f"{median} | {r.method} | {r.success_rate:.1%} |")
    return "\n".join(lines) + "\n"


def transfer_markdown(rows: list[TransferRow]) -> str:
    lines = ["| scoring model | same | method | origin | pairs | to target | moved | "
             "median p_target |", "|---|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.scoring_model} | {'yes' if r.same_model else ''} | "
                     f"{r.method} | {r.origin} | {r.pairs} | {r.target_rate:.1%} | "
                     f"{r.moved_rate:.1%} | {r.median_p_target:.3g} |")
    return "\n".join(lines) + "\n"


def write_frontier(out: str, rows: list[FrontierRow]) -> list[dict]:
    """Write frontier.parquet and frontier.md; returns their manifest entries."""
    return write_table(out, FRONTIER, FrontierRow, rows, frontier_markdown(rows))


def read_frontier(uri: str) -> list[FrontierRow]:
    """The rows of a finished frontier output."""
    return read_table(uri, "frontier", FRONTIER, FrontierRow)


def write_transfer(out: str, rows: list[TransferRow]) -> list[dict]:
    """Write transfer.parquet and transfer.md; returns their manifest entries."""
    return write_table(out, TRANSFER, TransferRow, rows, transfer_markdown(rows))


def read_transfer(uri: str) -> list[TransferRow]:
    """The rows of a finished transfer output."""
    return read_table(uri, "transfer", TRANSFER, TransferRow)
