"""Progress reporting for batch runs: a bar on a terminal, log lines elsewhere.

`make_progress` picks the reporter; each is a `(done, total)` callable the
runner calls after every batch, with `close()` for the end. Formatting is the
pure function `format_progress`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Literal, Never, Protocol, TextIO

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

__all__ = [
    "LogProgress",
    "Reporter",
    "TqdmProgress",
    "format_progress",
    "make_progress",
    "redirect_logging",
]

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
            self.last = None  # closed twice (by the runner, then the CLI): logged once
            elapsed = self.clock() - self.started
            logger.info("%s", format_progress(self.label, done, total, elapsed))
            self.started = self.last_logged = self.clock()


class TqdmProgress:
    """A tqdm bar on stderr: rows done / total, rows per second and ETA.

    The bar is drawn from the first call, when the total is known (the runner
    calls `(0, total)` once it has counted), so it never starts without one.
    """

    def __init__(self, label: str, *, file: TextIO | None = None) -> None:
        self.label = label
        self.file = file or sys.stderr
        self.bar: tqdm[Never] | None = None
        self.seen = 0

    def __call__(self, done: int, total: int) -> None:
        bar = self.bar
        if bar is None:
            # A terminal reporting a zero size (a bare pty) would hide the bar: assume 80x24.
            sized = _columns(self.file) > 0
            bar = self.bar = tqdm(
                desc=self.label,
                total=total,
                unit="rows",
                unit_scale=True,
                file=self.file,
                ncols=None if sized else 80,
                nrows=None if sized else 24,
            )
        if bar.total != total:
            bar.total = total
        bar.update(done - self.seen)
        self.seen = done

    def close(self) -> None:
        """Close the bar; a later call (the next data step of `up`) draws a new one."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            self.seen = 0


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


@contextlib.contextmanager
def redirect_logging(progress: Reporter) -> Iterator[None]:
    """While a bar is shown, send tenantstore's log lines through tqdm, above the bar."""
    if isinstance(progress, TqdmProgress):
        with logging_redirect_tqdm(loggers=[logger]):
            yield
    else:
        yield
