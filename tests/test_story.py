"""The report's words (report/story.py): the headline against budget tables built by hand."""

from __future__ import annotations

import numpy as np
import pandas as pd

from common import schema
from report import story


def budget_table(linf: dict[str, list[float]]) -> pd.DataFrame:
    """The budget table of pairs whose minimal L-inf are given (inf: never fooled), per method."""
    rows = []
    for method, values in linf.items():
        values = np.asarray(values)
        rows += [{schema.ORIGIN: "val", schema.METHOD: method, schema.S_BUDGET: b,
                  schema.S_FOOLED_FRACTION: float(np.mean(values <= b)),
                  schema.S_BOUND_FRACTION: 1.0} for b in range(256)]
    return pd.DataFrame(rows)


def test_the_headline_is_the_median_pair_of_exact_when_it_ran():
    budget = budget_table({"sign": [3, 9, 12, 40, np.inf], "exact": [2, 5, 7, 30, np.inf]})
    assert story.headline_method(["template", "sign", "exact"]) == "exact"
    assert story.headline_method(["template", "sign"]) == "sign"
    assert story.budget_reaching(budget, "exact", 0.5) == 7  # 3 of 5 pairs within 7
    assert story.budget_reaching(budget, "sign", 0.9) is None  # one pair is never fooled
    text = story.headline(budget, "exact", pairs=5)
    assert "7 levels out of 255" in text and "exact, the true minimum" in text


def test_fewer_than_half_fooled_is_said_so():
    text = story.headline(budget_table({"sign": [1, np.inf, np.inf]}), "sign", pairs=3)
    assert "Fewer than half" in text and "levels out of 255" not in text


def test_the_sample_is_named_plainly():
    ingest = {schema.M_CLASSES: ["a", "b"], schema.M_IMAGE_SHAPE: [64, 64, 3],
              schema.M_COUNTS: {"train": {"written": 3000}, "val": {"written": 500}}}
    assert "generated sample, not ImageNet" in story.data_text(ingest, True, "d")
    text = story.data_text(ingest, False, "d")
    assert "sample" not in text and "3,000 training and 500 validation images of 2" in text
