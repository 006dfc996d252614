"""The report's HTML pieces (report/page.py): numbers for people, escaping, narrow screens."""

from __future__ import annotations

import numpy as np
import pytest

from attacks import figures
from report import page


@pytest.mark.parametrize("value, shown", [
    (3000, "3,000"), (3000.0, "3,000"), (2620.4, "2,620"), (22.5, "22.5"), (0.006911, "0.00691"),
    (1e-4, "1×10⁻⁴"), (float("nan"), "–"), (None, "–"), (0.0, "0")])
def test_numbers_for_people(value, shown):
    assert page.number(value) == shown


def test_percent_and_tables_escape():
    assert page.percent(0.998) == "99.8%" and page.percent(1.0) == "100%"
    html = page.table([{"name": "<b>", "rate": 0.5}],
                      [("name", "class"), ("rate", "x", page.percent)])
    assert "&lt;b&gt;" in html and "50%" in html and "<b>" not in html


def test_numbers_of_one_kind_print_with_one_precision():
    """A column (or a sentence) of levels or percentages: the decimals the most precise needs."""
    assert page.levels.same([26.0, 26.2, 134.8]) == ["26.0", "26.2", "134.8"]
    assert page.levels.same([24.0, 35.0, float("nan")]) == ["24", "35", "–"]
    assert page.percent.same([1.0, 0.998, 0.725]) == ["100.0%", "99.8%", "72.5%"]
    assert page.percent(0.9997) == "99.97%" and page.percent(0.0312) == "3.12%"  # never 100%
    assert page.levels(2620.4) == "2,620" and page.ratio(1.0234) == "1.02"
    html = page.table([{"c": "a", "v": 26.0, "n": 3}, {"c": "b", "v": 26.2, "n": 4000}],
                      [("c", "class"), ("v", "mean L-inf", page.levels), ("n", "pairs")])
    assert ">26.0<" in html and ">26.2<" in html and ">4,000<" in html


def test_tables_and_charts_fit_a_narrow_screen():
    """Tables scroll in their own box; a chart keeps a legible least width, and its phone
    drawing takes its place on a screen narrower than that."""
    assert page.table([{"a": 1}], [("a", "a")]).startswith('<div class="scroll"><table')
    wide, narrow = (figures.png(np.zeros(w * 10 * 3, np.uint8), (10, w, 3)) for w in (1000, 400))
    alone = page.img("budget", wide, "caption")
    assert 'class="scroll"><img' in alone and "min-width:600px" in alone
    both = page.img("budget", wide, "caption", narrow=narrow)
    assert '<source media="(max-width:640px)"' in both and "min-width:240px" in both
    assert "<figcaption>caption</figcaption>" in both
