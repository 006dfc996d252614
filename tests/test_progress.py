"""common/progress.py: the meter's arithmetic, and counts that Ray tasks send reach the driver."""

from __future__ import annotations

import logging
import re

import pytest

from common import progress
from common.progress import Meter


def test_line_gives_count_percent_rate_and_eta():
    m = Meter("attack", total=10_000, unit="pairs", start=0.0)
    assert m.line(now=5.0) == "attack: 0/10,000 pairs (0%)"  # nothing measured, nothing guessed
    m.update(1_000, now=10.0)  # the first count: work started then (start-up is not work)
    assert m.line(now=10.5) == "attack: 1,000/10,000 pairs (10%)"  # under a second: no rate
    m.update(3_000, now=20.0)
    # (3,000 - 1,000) pairs in 10 s = 200 pairs/s; 7,000 to go = 35 s
    assert m.line(now=20.0) == "attack: 3,000/10,000 pairs (30%), 200 pairs/s, ETA 0:00:35"


def test_line_without_a_total_and_past_it():
    m = Meter("train", total=None, unit="samples", start=0.0)
    m.update(500, now=1.0)
    m.update(2_500, now=3.0)
    assert m.line(now=3.0) == "train: 2,500 samples, 1,000 samples/s"


def test_a_slow_unit_is_shown_as_seconds_each():
    m = Meter("sweep", total=3, unit="models", start=0.0)
    m.update(1, now=35.0)
    m.update(2, now=70.0)
    assert m.line(now=70.0) == "sweep: 2/3 models (67%), 35 s per model, ETA 0:00:35"
    over = Meter("train", total=100, unit="samples", start=0.0)
    over.update(50, now=0.0)
    over.update(150, now=10.0)  # a retried epoch counts again: no negative ETA
    assert over.line(now=10.0).endswith("ETA 0:00:00")


@pytest.mark.parametrize("seconds, text", [(0, "0:00:00"), (59.6, "0:01:00"), (3725, "1:02:05")])
def test_clock(seconds, text):
    assert progress.clock(seconds) == text


def test_counted_passes_items_through_and_counts_their_size():
    class Counter:
        n = 0

        class add:  # noqa: N801 - shaped like an actor method: counter.add.remote(n)
            @staticmethod
            def remote(n):
                Counter.n += n

    items = [[1, 2], [3], [4, 5, 6]]
    assert list(progress.counted(items, Counter)) == items
    assert Counter.n == 6
    assert list(progress.counted(items, None)) == items


def test_workers_counts_and_notes_reach_the_driver_log(ray_local, caplog):
    import ray

    @ray.remote(num_cpus=0)
    def work(counter, n: int, i: int) -> None:
        ray.get(counter.add.remote(n))  # delivered before the task ends (workers need not wait)
        if i == 0:
            counter.note.remote("epoch 1/1: a line from a worker")

    log = logging.getLogger("test.progress")
    with caplog.at_level(logging.INFO, logger="test.progress"):
        with progress.watch(log, "attack", total=4 * 250, unit="pairs", every=0.0,
                            live=False) as counter:
            ray.get([work.remote(counter, 250, i) for i in range(4)])
    lines = [r.getMessage() for r in caplog.records if r.name == "test.progress"]
    assert "epoch 1/1: a line from a worker" in lines
    counts = [int(m.group(1).replace(",", "")) for line in lines
              if (m := re.match(r"attack: ([\d,]+)/1,000 pairs", line))]
    assert counts and counts[-1] == 1_000 and counts == sorted(counts), lines
