"""Progress reporting for batch runs: a bar on a terminal, log lines elsewhere.

`make_progress` picks the reporter; each is a `(done, total)` callable the
runner calls after every batch, with `close()` for the end. Formatting is the
pure function `format_progress`.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Literal, Protocol, TextIO

from tqdm import tqdm

__all__ = ["LogProgress", "Reporter", "TqdmProgress", "format_progress", "make_progress"]

logger = logging.getLogger("tenantstore")

Mode = Literal["auto", "bar", "log", "none"]


class Reporter(Protocol):
    """A progress sink: called after every batch, closed at the end."""

    def __call__(self, done: int, total: int) -> None: ...

    def close(self) -> None: ...


def format_progress(label: str, done: int, total: int, elapsed: float) -> str:
    """`encrypt: 120000/1000000 rows (12.0%), 85000 rows/s, ETA 10s`."""
    rate = done / elapsed if elapsed > 0 else 0.0
    percent = 100.0 * done / total if total else 100.0
    eta = f"{(total - done) / rate:.0f}s" if rate > 0 and total >= done else "?"
    return f"{label}: {done}/{total} rows ({percent:.1f}%), {rate:.0f} rows/s, ETA {eta}"


class LogProgress:
    """Logs a progress line at most every `interval` seconds, and once at the end."""

    def __init__(
        self,
        label: str,
        *,
        interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.interval = interval
        self.clock = clock
        self.started = clock()
        self.last_logged = self.started
        self.last: tuple[int, int] | None = None

    def __call__(self, done: int, total: int) -> None:
        self.last = (done, total)
        now = self.clock()
        if now - self.last_logged >= self.interval:
            self.last_logged = now
            logger.info("%s", format_progress(self.label, done, total, now - self.started))

    def close(self) -> None:
        if self.last is not None:
            done, total = self.last
            elapsed = self.clock() - self.started
            logger.info("%s", format_progress(self.label, done, total, elapsed))


class TqdmProgress:
    """A tqdm bar on stderr: rows done / total, rows per second and ETA."""

    def __init__(self, label: str, *, file: TextIO | None = None) -> None:
        file = file or sys.stderr
        # A terminal reporting a zero size (a bare pty) would hide the bar: assume 80x24.
        sized = _columns(file) > 0
        self.bar = tqdm(
            desc=label,
            unit="rows",
            unit_scale=True,
            file=file,
            ncols=None if sized else 80,
            nrows=None if sized else 24,
        )
        self.seen = 0

    def __call__(self, done: int, total: int) -> None:
        if self.bar.total != total:
            self.bar.total = total
        self.bar.update(done - self.seen)
        self.seen = done

    def close(self) -> None:
        self.bar.close()


def _columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, AttributeError, ValueError):
        return 0


class _NoProgress:
    def __call__(self, done: int, total: int) -> None:
        pass

    def close(self) -> None:
        pass


def make_progress(label: str, mode: Mode = "auto", *, stream: TextIO | None = None) -> Reporter:
    """A bar when `stream` (stderr) is a terminal, log lines when not, nothing for "none"."""
    stream = stream or sys.stderr
    if mode == "auto":
        mode = "bar" if stream.isatty() else "log"
    if mode == "bar":
        return TqdmProgress(label, file=stream)
    if mode == "log":
        return LogProgress(label)
    return _NoProgress()
