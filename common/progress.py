"""Progress of a long phase, in the units a user thinks in: images, samples, pairs, models.

The driver owns the display; Ray workers feed it counts (and the odd line, such as an epoch's
metrics) through a small actor, so that nothing depends on the workers' own logs reaching the
driver (they do not, by default: common/cli.py):

    with progress.watch(log, "attack", total=pairs, unit="pairs") as counter:
        ...  # in the workers: counter.add.remote(n); counter.note.remote("a line to show")

On a terminal it draws a live bar (tqdm); anywhere else (a log file, ``ray job logs``) it logs
one short line every ``every`` seconds instead of redrawing:

    attack: 1,234/10,000 pairs (12%), 456 pairs/s, ETA 0:00:19
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

POLL_S = 0.5  # how often the driver asks the counter: cheap (one small actor call)
EVERY_S = 10.0  # one progress line this often when the output is not a terminal
QUIET_TIMES = 6  # ... and this many times less often while the count stands still


def clock(seconds: float) -> str:
    """``h:mm:ss``, as tqdm shows an ETA."""
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


@dataclass
class Meter:
    """Counts toward a total and says how fast; pure, so that it is tested without Ray.

    The rate is measured from the first count on (start-up is not work), excluding that first
    count, which may hold work done before anyone looked.
    """

    what: str
    total: int | None
    unit: str
    start: float = field(default_factory=time.monotonic)
    done: int = 0
    first: tuple[float, int] | None = None  # (when, done) at the first count

    def update(self, done: int, now: float | None = None) -> None:
        self.done = done
        if self.first is None and done > 0:
            self.first = (now if now is not None else time.monotonic(), done)

    def rate(self, now: float | None = None) -> float | None:
        """Units per second since the first count; None until a second has passed."""
        if self.first is None:
            return None
        elapsed = (now if now is not None else time.monotonic()) - self.first[0]
        return (self.done - self.first[1]) / elapsed if elapsed >= 1 else None

    def line(self, now: float | None = None) -> str:
        """``what: done/total unit (pct), rate unit/s, ETA h:mm:ss``; what is not known yet (the
        total, the rate) is left out rather than guessed."""
        rate = self.rate(now)
        text = f"{self.what}: {self.done:,}"
        text += f"/{self.total:,} {self.unit} ({100 * self.done / self.total:.0f}%)" \
            if self.total else f" {self.unit}"
        if rate:  # slow units (models, epochs) as seconds each: "0 models/s" says nothing
            text += (f", {rate:,.0f} {self.unit}/s" if rate >= 1
                     else f", {1 / rate:,.0f} s per {self.unit.rstrip('s')}")
            if self.total:
                text += f", ETA {clock(max(self.total - self.done, 0) / rate)}"
        return text


class _Counter:
    """The actor the workers report to: a running count and lines for the driver to show."""

    def __init__(self):
        self.n, self.notes = 0, []

    def add(self, n: int) -> None:
        self.n += n

    def note(self, text: str) -> None:
        self.notes.append(text)

    def take(self) -> tuple[int, list[str]]:
        notes, self.notes = self.notes, []
        return self.n, notes


class _Display:
    """A live bar on a terminal, else a log line every ``every`` seconds when the count moved
    (and every QUIET_TIMES x ``every`` when it did not: the job is still there)."""

    def __init__(self, log: logging.Logger, meter: Meter, every: float, live: bool):
        self.log, self.meter, self.every = log, meter, every
        self.bar = None
        self.last, self.shown = time.monotonic(), 0
        if live:
            from tqdm import tqdm

            self.bar = tqdm(total=meter.total, desc=meter.what, unit=f" {meter.unit}",
                            unit_scale=True, dynamic_ncols=True, leave=False, file=sys.stderr)

    def show(self, done: int, notes: list[str]) -> None:
        for text in notes:
            self.log.info("%s", text)
        if self.bar is not None:
            self.bar.update(done - self.meter.done)
        self.meter.update(done)
        now = time.monotonic()
        due = now - self.last >= self.every * (1 if done != self.shown else QUIET_TIMES)
        if self.bar is None and done and due:
            self.log.info("%s", self.meter.line(now))
            self.last, self.shown = now, done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextlib.contextmanager
def watch(log: logging.Logger, what: str, total: int | None, unit: str,
          every: float = EVERY_S, live: bool | None = None) -> Iterator[object]:
    """Show the progress of ``what`` while the block runs; yields the actor handle that workers
    feed with ``add.remote(n)`` and ``note.remote(text)``. The job logs its own summary."""
    import ray

    counter = ray.remote(num_cpus=0)(_Counter).remote()
    meter = Meter(what, total, unit)
    live = sys.stderr.isatty() if live is None else live
    stack = contextlib.ExitStack()
    if live:  # log lines print above the bar instead of through it
        from tqdm.contrib.logging import logging_redirect_tqdm

        stack.enter_context(logging_redirect_tqdm())
    display = _Display(log, meter, every, live)
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(POLL_S):
            try:
                display.show(*ray.get(counter.take.remote(), timeout=30))
            except Exception:  # a missed poll shows later; the work goes on regardless
                log.debug("progress poll failed", exc_info=True)

    thread = threading.Thread(target=poll, name=f"progress-{what}", daemon=True)
    thread.start()
    try:
        yield counter
    finally:
        stop.set()
        thread.join()
        with contextlib.suppress(Exception):
            display.show(*ray.get(counter.take.remote(), timeout=30))
        display.close()
        stack.close()
        ray.kill(counter)


def counted(items, counter, size=len) -> Iterator:
    """Pass ``items`` through, adding each one's ``size`` to ``counter`` (None: no counting)."""
    for item in items:
        if counter is not None:
            counter.add.remote(size(item))
        yield item
