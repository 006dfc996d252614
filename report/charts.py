"""The report's charts, drawn from the summary tables (pandas DataFrames) with matplotlib.

Every function returns PNG bytes; drawn on matplotlib Figure objects (no pyplot, no display needed).

    >>> png = budget_curves(budget)    # success rate vs L-inf budget, certified bound beside it
    >>> png = budget_curves(budget_l2, norm="L2")    # the same against the L2 budget
"""

from __future__ import annotations

import math

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # no pyplot: no global state, no backend to pick

from attacks.figures import short, to_png  # noqa: E402
from common.schema import METHODS

COLORS = {"template": "tab:blue", "sign": "tab:orange", "iterative": "tab:green",
          "exact": "tab:red", "exact-l2": "tab:purple"}
AXIS_NAMES = {"linf_q50": "median L-inf", "linf_mean": "mean L-inf"}
PHONE_WIDTH = 4.2  # inches: a narrow figure's width, ~460 pixels, shown on a phone at ~3/4 size
# methods side by side in a chart with a panel per method; more wrap into balanced rows: four
# 4.4-inch panels at 110 dpi (~1,940 pixels) still shrink into a 1280-pixel page (page.CHART_MIN)
MAX_COLS = 4
# per norm: the method whose curve is the true minimum, the largest budget, the x axis, the
# legend's names where the method's is not enough (each exact method is the minimum of its own
# norm only)
NORMS = {"L-inf": ("exact", 255, "L-inf budget (pixel levels of 255)",
                   {"exact": "exact (the true minimum)", "exact-l2": "exact-l2 (the minimal L2)"}),
         "L2": ("exact-l2", math.inf, "L2 budget (length of the whole change, pixel levels)",
                {"exact": "exact (the minimal L-inf)",
                 "exact-l2": "exact-l2 (the true minimal L2)"})}


def in_order(methods) -> list[str]:
    """The distinct methods in the attack job's order (template, sign, iterative, exact)."""
    return sorted(set(methods), key=lambda m: (m not in METHODS, METHODS.index(m)
                                               if m in METHODS else 0, m))


def panels(rows: int, cols: int, size: tuple[float, float], narrow: bool = False
           ) -> tuple[Figure, list[list]]:
    """A figure of ``rows`` x ``cols`` panels of ``size`` inches and its axes as [row][col];
    ``narrow`` (for a phone's screen): the same panels in one column, column after column."""
    w, h = size
    if not narrow:
        fig = Figure(figsize=(w * cols, h * rows))
        return fig, fig.subplots(rows, cols, squeeze=False)
    fig = Figure(figsize=(PHONE_WIDTH, h * rows * cols), layout="constrained")
    flat = fig.subplots(rows * cols, 1, squeeze=False)[:, 0]
    return fig, [[flat[c * rows + r] for c in range(cols)] for r in range(rows)]


def method_panels(methods: int, rows: int, size: tuple[float, float], narrow: bool = False
                  ) -> tuple[Figure, list[list]]:
    """A figure of ``rows`` panels per method and its axes as [method][row]: the methods side by
    side, in balanced rows of at most MAX_COLS (the unused places left blank); ``narrow``: one
    column, as ``panels``."""
    if narrow:
        fig, axes = panels(rows, methods, size, True)
        return fig, [[axes[r][m] for r in range(rows)] for m in range(methods)]
    lines = math.ceil(methods / MAX_COLS)
    cols = math.ceil(methods / lines)
    fig, axes = panels(rows * lines, cols, size)
    grid = [[axes[m // cols * rows + r][m % cols] for r in range(rows)]
            for m in range(lines * cols)]
    for unused in grid[methods:]:
        for ax in unused:
            ax.set_visible(False)
    return fig, grid[:methods]


def budget_curves(budget: pd.DataFrame, narrow: bool = False, norm: str = "L-inf") -> bytes:
    """Fraction of pairs fooled within each budget of ``norm`` (the summary's budget table for
    L-inf, budget_l2 for L2), per method and origin; the dashed line is the tightest certified
    bound of the methods (exact's LP-dual certificate for L-inf, exact-l2's for L2, where they
    ran): no attack can fool a larger fraction within that budget. The exact (exact-l2) curve is
    the true minimum, within the rounding to whole levels. ``narrow``: the panels stacked, for a
    phone."""
    best, largest, xlabel, labels = NORMS[norm]
    origins = sorted(budget["origin"].unique(), key=lambda o: o != "val")
    fig, axes = panels(1, len(origins), (6.2, 4), narrow)
    for ax, origin in zip(axes[0], origins):
        rows = budget[budget["origin"] == origin]
        for method in in_order(rows["method"]):
            curve = rows[rows["method"] == method]
            color = COLORS.get(method)
            ax.plot(curve["budget"], curve["fooled_fraction"], label=labels.get(method, method),
                    color=color, lw=2 if method == best else 1.5)
        bound = rows.groupby("budget")["bound_fraction"].min()
        ax.plot(bound.index, bound.values, "k--", lw=1, label="certified bound (any attack)")
        top = rows.loc[rows["fooled_fraction"] < 0.999, "budget"].max()
        end = min(largest, rows["budget"].max())
        ax.set_xlim(0, max(8, min(end, 1.2 * (top if np.isfinite(top) else end))))
        ax.set_ylim(0, 1.02)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("fraction of pairs fooled")
        ax.set_title("validation images" if origin == "val" else "random-noise starts")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    return to_png(fig)


def strength_histograms(hist: pd.DataFrame, narrow: bool = False) -> bytes:
    """The distribution of the strength each method needed (fooled pairs), one panel a method;
    ``narrow``: the panels stacked, for a phone."""
    hist = hist[hist["origin"] == "val"] if (hist["origin"] == "val").any() else hist
    methods = in_order(hist["method"])
    fig, axes = method_panels(len(methods), 1, (4.2, 3.2), narrow)
    for (ax,), method in zip(axes, methods):
        rows = hist[hist["method"] == method]
        # one bin per pixel level (the template's strengths lie on a finer grid): one patch, not
        # thousands of bars
        per_level = np.bincount(np.floor(rows["strength"]).astype(int), weights=rows["count"])
        ax.stairs(per_level, np.arange(len(per_level) + 1), fill=True,
                  color=COLORS.get(method, "gray"))
        ax.set_xlim(0, max(len(per_level), 1))
        ax.set_title(f"{method}: strength needed")
        ax.set_xlabel("strength (pixel units)")
        ax.set_ylabel("pairs")
    return to_png(fig)


def ends(rows: pd.DataFrame, value: str, top: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The easiest and the hardest rows by ``value`` (smallest first, largest first): ``top``
    each, never the same row in both; with fewer than 2 * ``top`` rows, the two halves."""
    rows = rows.sort_values(value, kind="stable")
    n = len(rows)
    return rows.head(min(top, n - n // 2)), rows.tail(min(top, n // 2))[::-1]


def ranked_bars(frame: pd.DataFrame, key: str, value: str, names: list[str], title: str,
                top: int, narrow: bool = False) -> bytes:
    """The ``top`` easiest and hardest classes by the L-inf needed (``value``), per method
    (``ends``); ``narrow``: the panels stacked, each method's two together, for a phone."""
    methods = in_order(frame["method"])
    fig, axes = method_panels(len(methods), 2, (4.4, 3.2), narrow)
    for col, method in enumerate(methods):
        for row, (part, label) in enumerate(zip(ends(frame[frame["method"] == method], value,
                                                     top), ("easiest", "hardest"))):
            ax = axes[col][row]
            ax.barh([short(names[i]) for i in part[key]], part[value],
                    color=COLORS.get(method, "gray"))
            ax.invert_yaxis()
            ax.set_title(f"{method}: {label}", fontsize=10)
            ax.set_xlabel(AXIS_NAMES.get(value, value) + " needed (pixel levels)")
            ax.tick_params(axis="y", labelsize=9 if narrow else 8)
    fig.suptitle(title)
    if not narrow:
        fig.tight_layout()
    return to_png(fig)


def tradeoff(sweep: pd.DataFrame) -> bytes:
    """Regularization against validation accuracy and the median strength needed to fool."""
    fig = Figure(figsize=(6.2, 4))
    ax = fig.subplots()
    ax.semilogx(sweep["reg"], 100 * sweep["val_top1"], "o-", color="tab:blue", label="val top-1")
    ax.semilogx(sweep["reg"], 100 * sweep["val_top5"], "s--", color="tab:blue", alpha=0.5,
                label="val top-5")
    ax.set_xlabel("L2 regularization strength (reg)")
    ax.set_ylabel("validation accuracy (%)", color="tab:blue")
    other = ax.twinx()
    other.semilogx(sweep["reg"], sweep["median_sign_eps"], "^-", color="tab:red",
                   label="median eps to fool (sign)")
    other.set_ylabel("median sign-step eps to fool (pixel levels)", color="tab:red")
    lines = ax.get_legend_handles_labels()
    more = other.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="center left", fontsize=8)
    ax.set_title("the regularization trade-off")
    ax.grid(alpha=0.3)
    return to_png(fig)
