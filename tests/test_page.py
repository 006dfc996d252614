"""The report's HTML pieces (report/page.py): numbers for people, escaping."""

from __future__ import annotations

import pytest

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
