"""The PostgreSQL audit sink's OpenTelemetry instruments (one set per meter provider),
and its rate-limited log line for dropped events.

As in `tenantstore.metrics`, the counts are plain attributes that observable
instruments report when a reader collects. The set is shared by every sink
of a provider: the SDK answers a second registration of an instrument name
with the first instrument, whose callback would never see a second sink.

| name | kind | unit | attributes |
| --- | --- | --- | --- |
| tenantstore.audit.dropped | counter | {event} | tenantstore.reason: full, closed, rejected, writer_failed, unflushed |
| tenantstore.audit.written | counter | {event} | |
| tenantstore.audit.write.failures | counter | {attempt} | |
| tenantstore.audit.buffered | gauge | {event} | |
"""  # noqa: E501

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections import Counter
from collections.abc import Iterable
from typing import Protocol

from opentelemetry import metrics as otel
from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation

from ..metrics import _version

__all__ = ["DropLog", "Figures", "figures_for"]

logger = logging.getLogger("tenantstore")


class _Buffered(Protocol):
    @property
    def buffered(self) -> int: ...


class Figures:
    """The counts of the sinks of one meter provider, and the instruments reporting them."""

    def __init__(self, provider: MeterProvider) -> None:
        self.dropped: Counter[str] = Counter()
        self.written = 0
        self.failures = 0
        self.sinks: weakref.WeakSet[_Buffered] = weakref.WeakSet()
        meter = provider.get_meter("tenantstore", _version())
        meter.create_observable_counter(
            "tenantstore.audit.dropped",
            callbacks=[self._report_dropped],
            unit="{event}",
            description="Audit events dropped: full buffer, closed sink, refused values, ...",
        )
        meter.create_observable_counter(
            "tenantstore.audit.written",
            callbacks=[lambda options: [Observation(self.written)]],
            unit="{event}",
            description="Audit events written to PostgreSQL",
        )
        meter.create_observable_counter(
            "tenantstore.audit.write.failures",
            callbacks=[lambda options: [Observation(self.failures)]],
            unit="{attempt}",
            description="Failed attempts to write audit events to PostgreSQL (each retried)",
        )
        meter.create_observable_gauge(
            "tenantstore.audit.buffered",
            callbacks=[lambda options: [Observation(sum(s.buffered for s in list(self.sinks)))]],
            unit="{event}",
            description="Audit events waiting in PostgreSQL sinks' buffers",
        )

    def _report_dropped(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(n, {"tenantstore.reason": r}) for r, n in list(self.dropped.items())]


_FIGURES: weakref.WeakKeyDictionary[MeterProvider, Figures] = weakref.WeakKeyDictionary()


def figures_for(provider: MeterProvider | None) -> Figures:
    """The figures of `provider` (None: the global provider), made on first use."""
    provider = provider or otel.get_meter_provider()
    figures = _FIGURES.get(provider)
    if figures is None:
        figures = _FIGURES[provider] = Figures(provider)
    return figures


class DropLog:
    """Log lines for dropped events: at once, then at most one per `interval`, none lost.

    Drops within the interval after a line are added up and logged when it
    ends (a timer on the running loop) or at `close()`, whichever comes first.
    """

    def __init__(self, who: str, interval: float) -> None:
        self._who = who
        self._interval = interval
        self._unlogged: Counter[str] = Counter()
        self._next = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def add(self, count: int, reason: str) -> None:
        """`count` events dropped for `reason` (full, closed, ...)."""
        self._unlogged[reason] += count
        now = time.monotonic()
        if now >= self._next:
            self._log()
        elif self._timer is None:
            with contextlib.suppress(RuntimeError):  # no running loop: logged at close
                loop = asyncio.get_running_loop()
                self._timer = loop.call_later(self._next - now, self._log)

    def close(self) -> None:
        """Log what is not logged yet, now."""
        if self._timer is not None:
            self._timer.cancel()
        self._log()

    def _log(self) -> None:
        self._timer = None
        if self._unlogged:
            reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(self._unlogged.items()))
            total = sum(self._unlogged.values())
            logger.warning("audit: %d events dropped by %s (%s)", total, self._who, reasons)
            self._unlogged.clear()
            self._next = time.monotonic() + self._interval
