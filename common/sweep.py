"""The sweep table's contract: ``<sweep>/sweep.parquet`` and ``sweep.md``, written and read here.

One row per trained setting (columns in common/schema.py, ``SWEEP_COLUMNS``): its validation
accuracy and losses, the weight norms, the median sign strength that fools it, and the model's URI.

    >>> files = write_sweep("out/sweep", rows)      # [{path, rows}] for the manifest
    >>> table = read_sweep("out/sweep")             # refuses an unfinished sweep or a bad table
"""

from __future__ import annotations

import pyarrow as pa

from common import schema
from common.tables import read_table, write_table

TABLE = schema.SWEEP_TABLE


def markdown(rows: list[dict]) -> str:
    """The table as Markdown: reg and robust radius vs accuracy, weight norms and the strength
    that fools."""
    lines = ["| reg | robust eps | val top-1 | val top-5 | val loss | train loss | ‖W‖ | "
             "‖W‖ (pixels) | median sign eps |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['reg']:g} | {r['robust_eps']:g} | {r['val_top1']:.1%} | "
                     f"{r['val_top5']:.1%} | {r['val_loss']:.3f} | {r['train_loss']:.3f} | "
                     f"{r['w_norm']:.4g} | "
                     f"{r['w_pixels_norm']:.4g} | {r['median_sign_eps']:g} |")
    return "\n".join(lines) + "\n"


def write_sweep(out: str, rows: list[dict]) -> list[dict]:
    """Write sweep.parquet and sweep.md; returns their manifest entries."""
    return write_table(out, TABLE, rows, schema.SWEEP_COLUMNS, markdown(rows))


def read_sweep(sweep: str) -> pa.Table:
    """The table of a finished sweep, with every column of the contract."""
    return read_table(sweep, "sweep", TABLE, schema.SWEEP_COLUMNS)
