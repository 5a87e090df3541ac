"""Progress for the long steps outside training: scoring, eval, predict, tokenization, loading, export.

On a terminal this is a tqdm bar (count, rate, ETA). When stderr is not a terminal (a log file, CI,
a pipe), tqdm would write carriage-return redraws that turn into one unreadable line; instead a plain
line is printed at most every ``interval`` seconds and once at the end, e.g.
``scoring: 30/60 rows (50%), 12s elapsed, ETA 12s``. tqdm has no mode that prints such lines, which is
why the second half is written here. ``GLMTUNE_PROGRESS=0`` silences both;
``GLMTUNE_PROGRESS_INTERVAL=SECONDS`` sets the plain-line interval (default 30). In plain mode a step
that finishes within ``quiet_below`` seconds (5, or the interval if shorter) prints nothing.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, TypeVar

__all__ = ["Progress", "track"]

T = TypeVar("T")

# Seconds between plain lines when stderr is not a terminal.
DEFAULT_INTERVAL = 30.0
# Plain mode stays silent for steps shorter than this (seconds): a 2-second tokenization needs no log.
DEFAULT_QUIET_BELOW = 5.0


def _fmt(seconds: float) -> str:
    from tqdm import tqdm

    return tqdm.format_interval(max(0.0, seconds))


class Progress:
    """A counter with an ETA: ``with Progress(total, "scoring", "rows") as p: ... p.update(n)``."""

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str = "it",
        *,
        stream: IO[str] | None = None,
        enabled: bool | None = None,
        interval: float | None = None,
        quiet_below: float | None = None,
    ):
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = stream if stream is not None else sys.stderr
        self.n = 0
        self.lines = 0
        if enabled is None:
            enabled = os.environ.get("GLMTUNE_PROGRESS", "1") not in ("0", "false", "no")
        self.enabled = enabled
        if interval is None:
            interval = float(os.environ.get("GLMTUNE_PROGRESS_INTERVAL", DEFAULT_INTERVAL))
        self.interval = interval
        self.quiet_below = min(DEFAULT_QUIET_BELOW, interval) if quiet_below is None else quiet_below
        self._start = self._last = time.monotonic()
        self._bar = None
        if enabled and _is_tty(self.stream):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=f" {unit}", leave=False, file=self.stream)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        finished = self.total is not None and self.n >= self.total  # close() prints the closing line
        if (
            n
            and not finished
            and self.enabled
            and now - self._last >= self.interval
            and now - self._start >= self.quiet_below
        ):
            self._print(now)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            return
        now = time.monotonic()
        # The closing line: always after earlier lines (the log shows where the step ended), else only
        # for a step long enough to be worth a line.
        if self.enabled and (self.lines or now - self._start >= self.quiet_below):
            self._print(now, done=True)
        self.enabled = False

    def _print(self, now: float, done: bool = False) -> None:
        elapsed = now - self._start
        if self.total:
            pct = f" ({100 * self.n / self.total:.0f}%)"
            count = f"{self.n}/{self.total} {self.unit}"
        else:
            pct, count = "", f"{self.n} {self.unit}"
        if done:
            tail = f", done in {_fmt(elapsed)}"
        elif self.total and self.n:
            tail = f", {_fmt(elapsed)} elapsed, ETA {_fmt(elapsed / self.n * (self.total - self.n))}"
        else:
            tail = f", {_fmt(elapsed)} elapsed"
        print(f"{self.desc}: {count}{pct}{tail}", file=self.stream, flush=True)
        self.lines += 1
        self._last = now

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track(items: Iterable[T], desc: str, unit: str = "it", total: int | None = None, **kwargs) -> Iterator[T]:
    """Iterate ``items`` with a :class:`Progress` (total from ``len(items)`` where it has one)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(total, desc, unit, **kwargs) as p:
        for item in items:
            yield item
            p.update(1)


def _is_tty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
