"""The report's words: what the page shows, its headline number, each method in one sentence.

    >>> method = headline_method(["template", "sign", "exact"])        # "exact"
    >>> headline(budget, method, pairs=15_000)       # one HTML paragraph, pairs that had to move
    >>> headline_l2(budget_l2, pairs=15_000)         # exact-l2's median L2, when it ran

Pure functions of the summary tables (pandas) and the manifests; no I/O.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from common import schema
from report.page import esc, levels, number, percent

if TYPE_CHECKING:
    import pandas as pd

# The pairs that the tables and the headline measure (attacks/summary.py's "moved"), in words
HAD_TO_MOVE = "the model did not already predict the target"

METHOD_TEXT = {
    "template": "adds a multiple of the target class's template W[t] to the image, the blog's "
                "step, growing it until the model says the target.",
    "sign": "adds the same small change to every pixel, up or down by the sign of the gradient of "
            "the target's log-probability (the fast gradient sign method of Goodfellow et al.).",
    "iterative": "repeats one-level sign steps, each time recomputing the gradient and staying "
                 "within a growing L-inf ball (Kurakin et al.'s basic iterative method).",
    "exact": "solves for the smallest possible L-inf change that makes the target win (a linear "
             "program per pair, certified by its dual): the true minimum, within one level.",
    "exact-l2": "solves for the smallest possible L2 change that makes the target win (a quadratic "
                "program per pair, certified by its dual), then rounds it to whole levels.",
}

HOW_TO_READ = (
    "<p><b>Reading the curves.</b> For each L-inf budget on the x axis (the largest change of any "
    "pixel, in levels of 0..255), a curve gives the fraction of all (image, target) pairs whose "
    "stored fooling image is classified as the target within that budget. A curve further left "
    "is a stronger attack. The dashed line is the <b>certified bound</b>: for each pair, "
    "max over rival classes k of (s<sub>k</sub> − s<sub>t</sub>) / ‖W[t] − W[k]‖<sub>1</sub> is "
    "a distance no change can beat, so no attack whatsoever can fool more pairs within a budget "
    "than the dashed line allows. Where exact ran, its curve is the true minimum. On validation "
    "images the curves start above zero: the pairs whose target the model already predicted are "
    "fooled with no change (the headline and the tables leave them out).</p>")


HOW_TO_READ_L2 = (
    "<p>The same against the L2 budget: the length of the whole change, the square root of the "
    "sum of every pixel value's squared change, in levels. The dashed line is the certified "
    "bound <code>bound_l2</code> of each pair (exact-l2's, from its quadratic program's dual, "
    "where it ran): no attack can fool more pairs within a budget. Exact-l2's curve is the true "
    "minimal L2 change, rounded to whole levels; the L-inf methods' curves show how much longer "
    "their changes are. Budgets lie on a grid of round numbers (steps of 0.5% to 5%).</p>")


def headline_method(methods) -> str:
    """The method whose numbers headline the page: exact (the true minimum) when it ran."""
    methods = list(methods)
    for m in ("exact", "sign", "iterative", "template"):
        if m in methods:
            return m
    return methods[0]


NAMES = {"exact": "exact, the true minimum", "exact-l2": "exact-l2, the true minimal L2 change"}


def method_name(method: str) -> str:
    return NAMES.get(method, f"the {method} method")


def moved_within(budget: pd.DataFrame, method: str, pairs: int, origin: str = "val"
                 ) -> tuple[np.ndarray, np.ndarray, int]:
    """The budgets (0..255), how many pairs that had to move are fooled within each, and how many
    had to move, of the ``pairs`` in the budget table's rows of ``method`` and ``origin``.

    A pair had to move when the model did not already predict the target for the original image
    (pred != target). Those that did not are fooled unchanged, at L-inf 0, and only they: a
    stored image that differs from the original is at least one level away. So the pairs
    fooled within budget 0 are the ones left out.
    """
    rows = budget[(budget[schema.ORIGIN] == origin) & (budget[schema.METHOD] == method)]
    rows = rows.sort_values(schema.S_BUDGET)
    within = np.rint(rows[schema.S_FOOLED_FRACTION].to_numpy() * pairs).astype(np.int64)
    already = int(within[0]) if len(within) else 0
    return rows[schema.S_BUDGET].to_numpy(), within - already, pairs - already


def moved_quantile(budget: pd.DataFrame, method: str, q: float, pairs: int,
                   origin: str = "val") -> float | None:
    """The ``q`` quantile of the L-inf change that the pairs which had to move needed, by numpy's
    linear rule as the summary's quantile columns, those never fooled counting as beyond every
    budget (None: the quantile falls on one of them)."""
    b, moved, n = moved_within(budget, method, pairs, origin)
    if n <= 0:
        return None
    pos = q * (n - 1)
    lo, hi = np.searchsorted(moved, [math.floor(pos), math.ceil(pos)], "right")
    if hi >= len(moved):
        return None
    return float(b[lo] + (b[hi] - b[lo]) * (pos - math.floor(pos)))


def headline(budget: pd.DataFrame, method: str, pairs: int) -> str:
    """The page's one number: the L-inf change that fools the median validation pair that had to
    move, over the same pairs as the page's tables."""
    n = moved_within(budget, method, pairs)[2]
    half, most = (moved_quantile(budget, method, q, pairs) for q in (0.5, 0.9))
    rest = f"; the other {number(pairs - n)} need no change" if n < pairs else ""
    who = f"the {number(n)} (validation image, target) pairs that had to move"
    why = f"({HAD_TO_MOVE}{rest})"
    if half is None:
        return (f'<p class="headline">Fewer than half of {who} {why} were fooled by '
                f"{esc(method_name(method))}.</p>")
    half_text, most_text = levels.same([half, most if most is not None else half])
    more = f" Nine in ten need at most {most_text}." if most is not None else ""
    return (f'<p class="headline">The median validation image becomes any class you choose with '
            f"a change of <b>{half_text} levels out of 255</b> per pixel, or less. "
            f'<span style="font-size:70%">Median over {who}, as in the tables below {why}; '
            f"{esc(method_name(method))}.{more}</span></p>")


def headline_l2(budget_l2: pd.DataFrame, pairs: int) -> str:
    """The true minimal L2 change (exact-l2) of the median validation pair that had to move, from
    the budget_l2 table: the first of its budgets (round numbers) that holds the median, so at
    most that."""
    half = moved_quantile(budget_l2, "exact-l2", 0.5, pairs)
    if half is None:
        return ""
    budgets = moved_within(budget_l2, "exact-l2", pairs)[0]
    half = float(budgets[np.searchsorted(budgets, half * (1 - 1e-9))])
    return (f"<p>Measured by the length of the whole change instead (L2), the median of those "
            f"pairs needs at most <b>{levels(half)} levels</b> ({esc(NAMES['exact-l2'])}).</p>")


def data_text(ingest: dict | None, sample_kind: str | None, data_uri: str) -> str:
    """What the model was trained and attacked on, saying plainly when it is the sample
    (``sample_kind``: pipelines.sample's --kind, None for other data)."""
    if ingest is None:
        return f"<p>The data ({esc(data_uri)}) could not be read; its manifest is needed.</p>"
    counts = ingest.get(schema.M_COUNTS, {})
    split = {"train": "training", "val": "validation"}
    images = " and ".join(f"{number(counts[s]['written'])} {split[s]}" for s in split
                          if "written" in counts.get(s, {}))
    h, w, _ = ingest[schema.M_IMAGE_SHAPE]
    what = (f"{images or 'the'} images of {number(len(ingest[schema.M_CLASSES]))} classes, "
            f"resized to {h}×{w} pixels")
    looks = {"photos": "each class random crops of one real photograph that scikit-image, "
                       "scikit-learn or matplotlib ships",
             "shapes": "each class a coloured shape on a background of its own, with noise"}
    if sample_kind:
        return (f"<p><b>The data is the built-in sample, not ImageNet</b> "
                f"(<code>pipelines.sample</code>: {looks.get(sample_kind, sample_kind)}): "
                f"{what}. The numbers show the method at work; the blog's are measured on "
                f"ImageNet's 1.28 million images.</p>")
    source = ingest.get(schema.M_SOURCE)
    where = f", read from <code>{esc(str(source))}</code>" if source else ""
    return f"<p>The data: {what}{where}.</p>"


def model_text(model: dict, C: int, D: int) -> str:
    """The classifier in one paragraph: its shape, regularization, accuracy."""
    final = model.get(schema.M_FINAL) or {}
    config = model.get(schema.M_CONFIG) or {}
    acc = ""
    if "val_top1" in final:
        acc = (f" It classifies {percent(final['val_top1'])} of the validation images correctly "
               f"(top-5: {percent(final.get('val_top5'))}; training top-1 "
               f"{percent(final.get('train_top1'))}).")
    reg = f", L2 regularization {number(config['reg'])}" if "reg" in config else ""
    epochs = f", {number(config['epochs'])} epochs" if "epochs" in config else ""
    chance = ""
    if schema.M_INITIAL_LOSS in model:
        chance = (f" Its first loss was {number(model[schema.M_INITIAL_LOSS])} "
                  f"(ln {C} = {math.log(C):.2f} for a guess).")
    return (f"<p>The model is a linear softmax classifier on raw pixels: scores = W x + b with "
            f"W of {number(C)} classes × {number(D)} pixel values{reg}{epochs}.{acc}{chance} "
            f"Its gradient with respect to the image is a row of W, which is why a little of a "
            f"class's template, added to any image, moves it towards that class.</p>")


def methods_text(methods) -> str:
    items = "".join(f"<li><b>{esc(m)}</b> {esc(METHOD_TEXT.get(m, ''))}</li>" for m in methods)
    return f"<ul>{items}</ul>"


LEAD = (
    "<p class=\"lead\">A linear classifier trained on raw pixels can be made to say any class you "
    "choose by a change too small to notice, as Karpathy showed in “Breaking Linear Classifiers "
    "on ImageNet” (2015). This page shows it for every (validation image, target class) pair of "
    "this run: how small the change can be, what the fooling images look like, and which classes "
    "are easy or hard to reach. Sizes of a change are in pixel levels out of 255: L-inf is the "
    "largest change of any pixel, L2 the length of the whole change.</p>")
