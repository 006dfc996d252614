"""The report's words (report/story.py): the headline against budget tables built by hand, and
the easiest and hardest lists (report/charts.py's ends)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from common import schema
from report import charts, story


def budget_table(linf: dict[str, list[float]]) -> pd.DataFrame:
    """The budget table of pairs whose minimal L-inf are given (inf: never fooled), per method."""
    rows = []
    for method, values in linf.items():
        values = np.asarray(values)
        rows += [{schema.ORIGIN: "val", schema.METHOD: method, schema.S_BUDGET: b,
                  schema.S_FOOLED_FRACTION: float(np.mean(values <= b)),
                  schema.S_BOUND_FRACTION: 1.0} for b in range(256)]
    return pd.DataFrame(rows)


def test_the_headline_is_the_median_pair_that_had_to_move_of_exact_when_it_ran():
    """Two pairs per method need no change (the model already predicts the target): the
    headline's numbers and its words are over the other five, as the tables are."""
    budget = budget_table({"sign": [0, 0, 3, 9, 12, 40, np.inf],
                           "exact": [0, 0, 2, 5, 7, 30, np.inf]})
    assert story.headline_method(["template", "sign", "exact"]) == "exact"
    assert story.headline_method(["template", "sign"]) == "sign"
    assert story.moved_within(budget, "exact", 7)[2] == 5
    assert story.moved_quantile(budget, "exact", 0.5, 7) == 7  # 3 of the 5 within 7
    assert story.moved_quantile(budget, "sign", 0.9, 7) is None  # one pair is never fooled
    text = story.headline(budget, "exact", pairs=7)
    assert "7 levels out of 255" in text and "exact, the true minimum" in text
    assert "5 (validation image, target) pairs that had to move" in text
    assert "did not already predict the target; the other 2 need no change" in text


def test_the_headline_quantiles_are_the_tables_quantiles():
    """The oracle: numpy's quantile of the L-inf of the pairs that had to move, as the summary's
    quantile columns are; the headline prints its two numbers with one precision."""
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 50, 501):
        linf = np.concatenate([np.zeros(rng.integers(0, 9)), rng.integers(1, 80, n)])
        budget = budget_table({"exact": linf})
        for q in (0.1, 0.5, 0.9):
            assert story.moved_quantile(budget, "exact", q, len(linf)) == pytest.approx(
                np.quantile(linf[linf > 0], q))
    text = story.headline(budget_table({"exact": [0, 2, 5, 8, 9]}), "exact", pairs=5)
    assert "6.5 levels out of 255" in text and "at most 8.7." in text  # 8.7, not 8.70 or 9


def test_fewer_than_half_fooled_is_said_so():
    text = story.headline(budget_table({"sign": [1, np.inf, np.inf]}), "sign", pairs=3)
    assert "Fewer than half" in text and "levels out of 255" not in text


def test_the_easiest_and_hardest_lists_never_share_a_class():
    """With fewer than twice ``top`` classes the lists are the two halves (the middle class of an
    odd count among the easiest), else the ``top`` at each end."""
    for n, top, sizes in ((10, 8, (5, 5)), (11, 8, (6, 5)), (40, 8, (8, 8)), (1, 8, (1, 0))):
        rows = pd.DataFrame({"target": range(n), "v": np.arange(n)[::-1] % 7})
        easiest, hardest = charts.ends(rows, "v", top)
        assert (len(easiest), len(hardest)) == sizes
        assert not set(easiest.target) & set(hardest.target)
        assert list(easiest.v) == sorted(easiest.v) and list(hardest.v) == sorted(hardest.v)[::-1]
        assert len(hardest) == 0 or hardest.v.min() >= easiest.v.max()


def test_the_sample_is_named_plainly():
    ingest = {schema.M_CLASSES: ["a", "b"], schema.M_IMAGE_SHAPE: [64, 64, 3],
              schema.M_COUNTS: {"train": {"written": 3000}, "val": {"written": 500}}}
    assert "built-in sample, not ImageNet" in story.data_text(ingest, "shapes", "d")
    assert "real photograph" in story.data_text(ingest, "photos", "d")
    text = story.data_text(ingest, None, "d")
    assert "sample" not in text and "3,000 training and 500 validation images of 2" in text


def test_exact_l2_is_named_the_true_minimal_l2_change_and_headlines_l2():
    """The L2 sentence reads exact-l2's rows of a budget_l2 table (here on budgets 0..255, where
    the grid's are round numbers): the median of the pairs that had to move."""
    assert story.method_name("exact-l2") == "exact-l2, the true minimal L2 change"
    assert story.headline_method(["sign", "exact", "exact-l2"]) == "exact"
    text = story.headline_l2(budget_table({"exact-l2": [0, 30, 50, 70]}), pairs=4)
    assert "at most <b>50 levels</b>" in text and "true minimal L2 change" in text
    assert story.headline_l2(budget_table({"exact-l2": [9, np.inf, np.inf]}), pairs=3) == ""


def test_five_methods_fit_a_laptops_page_and_the_l2_chart_draws():
    """Charts with a panel per method wrap five methods into rows: each drawing shrinks into a
    1280-pixel page without its phone drawing (report/page.py's rule)."""
    from report.page import CHART_MIN, PAGE_MARGIN, png_width

    methods = list(schema.METHODS)
    hist = pd.DataFrame({schema.ORIGIN: "val", schema.METHOD: methods, "strength": 3.0,
                         schema.S_COUNT: 5})
    rows = pd.DataFrame({schema.ORIGIN: "val", schema.METHOD: np.repeat(methods, 6),
                         schema.TARGET: np.tile(range(6), 5), "linf_q50": range(30)})
    for png in (charts.strength_histograms(hist),
                charts.ranked_bars(rows, schema.TARGET, "linf_q50", list("abcdef"), "t", 3),
                charts.budget_curves(budget_table({m: [0, 3, 9] for m in methods}), norm="L2")):
        assert CHART_MIN * png_width(png) + PAGE_MARGIN <= 1280
