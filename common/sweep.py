"""The tables of the jobs that train several models: the sweep's ``<sweep>/sweep.parquet`` and
``sweep.md``, and the hardening rounds' ``<out>/harden.parquet`` and ``harden.md``, written and
read here.

One row per trained setting, ``SweepRow`` (its fields are the columns, common/tables.py): its
validation accuracy and losses, the weight norms, the median sign strength that fools it, and the
model's URI. One row per hardening round, ``HardenRow`` (training.harden): its accuracy, the
share of fooling images its background class catches, and exact's minimal L-inf.

    >>> files = write_sweep("out/sweep", rows)      # [SweepRow] -> [{path, rows}] for the manifest
    >>> rows = read_sweep("out/sweep")              # refuses an unfinished sweep or a bad table
    >>> rows = read_harden("out/harden")            # [HardenRow], checked
"""

from __future__ import annotations

from dataclasses import dataclass

from common import schema, tables
from common.tables import read_table, write_table

TABLE = schema.SWEEP_TABLE
HARDEN = schema.HARDEN_TABLE


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


@dataclass(frozen=True)
class HardenRow:
    """One round of training.harden: the model trained on the real classes and the fooling
    images of the rounds so far, measured on the validation images."""

    mode: str  # plain (round 0), background or adversarial
    round: int
    reg: float  # L2 strength, the same every round
    classes: int  # of the model: C, or C + 1 with the background class
    val_top1: float  # argmax over every class of the model: a real image called background is wrong
    val_top5: float
    background_trained: float | None  # of the fooling images added this round, called background
    background_fresh: float | None  # of fresh ones (validation images, the same attack), likewise
    fresh_target: float | None  # of the fresh ones, still scored as their target
    fresh_label: float | None  # of the fresh ones, scored as their source image's class
    median_linf: float | None  # exact, validation images x real targets, fooled pairs that had
    p90_linf: float | None  # to move; None: none was fooled
    success_rate: float  # of those pairs, fooled (a target must beat the background too)
    pairs: int
    fooled_added: int  # fooling images added to the training set this round
    fooled_total: int  # fooling images the model trained on (rounds 1..round)
    model: str  # the round's model output (absolute URI)


def _share(v: float | None) -> str:
    return "" if v is None else f"{v:.1%}"


def harden_markdown(rows: list[HardenRow]) -> str:
    """The rounds as Markdown: accuracy, background shares and exact's minimal L-inf."""
    return tables.markdown(
        ["mode", "round", "val top-1", "val top-5", "bg (trained)", "bg (fresh)",
         "fresh: target", "fresh: label", "median L-inf", "p90 L-inf", "fooled", "added",
         "trained on"], "lr" + "r" * 11,
        ([r.mode, str(r.round), f"{r.val_top1:.1%}", f"{r.val_top5:.1%}",
          _share(r.background_trained), _share(r.background_fresh), _share(r.fresh_target),
          _share(r.fresh_label), "" if r.median_linf is None else f"{r.median_linf:g}",
          "" if r.p90_linf is None else f"{r.p90_linf:g}", f"{r.success_rate:.1%}",
          str(r.fooled_added), str(r.fooled_total)] for r in rows))


def write_harden(out: str, rows: list[HardenRow]) -> list[dict]:
    """Write harden.parquet and harden.md; returns their manifest entries."""
    return write_table(out, HARDEN, HardenRow, rows, harden_markdown(rows))


def read_harden(uri: str) -> list[HardenRow]:
    """The rows of a finished training.harden output, checked against ``HardenRow``."""
    return read_table(uri, "harden", HARDEN, HardenRow)
