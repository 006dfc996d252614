"""The sweep table's contract: ``<sweep>/sweep.parquet`` and ``sweep.md``, written and read here.

One row per trained setting, ``SweepRow`` (its fields are the columns, common/tables.py): its
validation accuracy and losses, the weight norms, the median sign strength that fools it, and the
model's URI.

    >>> files = write_sweep("out/sweep", rows)      # [SweepRow] -> [{path, rows}] for the manifest
    >>> rows = read_sweep("out/sweep")              # refuses an unfinished sweep or a bad table
"""

from __future__ import annotations

from dataclasses import dataclass

from common import schema, tables
from common.tables import read_table, write_table

TABLE = schema.SWEEP_TABLE


@dataclass(frozen=True)
class SweepRow:
    """One training of the sweep (training.sweep); the model's manifest has the rest."""

    reg: float  # L2 strength
    robust_eps: float  # the robust objective's L-inf radius, pixel levels (0: plain cross-entropy)
    val_top1: float  # the last epoch's, clean validation images
    val_top5: float
    val_loss: float
    train_loss: float  # the certified bound when robust_eps > 0
    train_top1: float
    w_norm: float  # ||W|| as trained (normalized inputs)
    w_pixels_norm: float  # ||W|| of weights.npz (raw pixels)
    epochs: int
    median_sign_eps: float  # the sign method's median fooling strength, pixel levels
    model: str  # the training's output (absolute URI)


def markdown(rows: list[SweepRow]) -> str:
    """The table as Markdown: reg and robust radius vs accuracy, weight norms and the strength
    that fools."""
    return tables.markdown(
        ["reg", "robust eps", "val top-1", "val top-5", "val loss", "train loss", "‖W‖",
         "‖W‖ (pixels)", "median sign eps"], "r" * 9,
        ([f"{r.reg:g}", f"{r.robust_eps:g}", f"{r.val_top1:.1%}", f"{r.val_top5:.1%}",
          f"{r.val_loss:.3f}", f"{r.train_loss:.3f}", f"{r.w_norm:.4g}", f"{r.w_pixels_norm:.4g}",
          f"{r.median_sign_eps:g}"] for r in rows))


def write_sweep(out: str, rows: list[SweepRow]) -> list[dict]:
    """Write sweep.parquet and sweep.md; returns their manifest entries."""
    return write_table(out, TABLE, SweepRow, rows, markdown(rows))


def read_sweep(sweep: str) -> list[SweepRow]:
    """The rows of a finished sweep, checked against ``SweepRow``."""
    return read_table(sweep, "sweep", TABLE, SweepRow)
