"""tenantstore's OpenTelemetry instruments, created once per object that records them.

The metrics go through the OpenTelemetry API: without an SDK installed by the
application they cost a no-op. Figures counted per secret on the hot path
(decryptions, encryptions, cache lookups, failures) are added to plain
counters keyed by their attributes and handed to the instruments at most
once a second (and on `flush()`, which `aclose()` calls), so even with an
SDK a warm read pays a dict update, not an instrument call (~5 us each with
the SDK). Every instrument is synchronous, so any number of tenantstore
objects can share a meter provider: their counts add up. Attributes stay
low-cardinality: column, key id, reason, operation, outcome; never a tenant
id (that belongs in an audit event).

Instruments (names and units in the OpenTelemetry semantic-conventions style):

| name | kind | unit | attributes |
| --- | --- | --- | --- |
| tenantstore.decrypt | counter | {secret} | column, key_id |
| tenantstore.encrypt | counter | {secret} | column, key_id |
| tenantstore.decrypt.failures | counter | {secret} | column, reason |
| tenantstore.cache.hits, tenantstore.cache.misses | counter | {secret} | cache |
| tenantstore.worker.batch.size | histogram | {request} | |
| tenantstore.worker.queue.wait | histogram | s | |
| tenantstore.runner.secrets | counter | {secret} | operation, table, column, outcome |
| tenantstore.runner.duration | histogram | s | operation, table, outcome |
| tenantstore.keys.primary | gauge | 1 | key_id |
| tenantstore.keys.check | gauge | 1 | (1 the last key check passed, 0 it failed) |
| tenantstore.live_cache.* | counter | {event} | see `live_cache` |

Attribute keys carry the `tenantstore.` prefix (`tenantstore.column`, ...).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from importlib import metadata

from opentelemetry import metrics as otel
from opentelemetry.metrics import MeterProvider

__all__ = ["Metrics"]

_ATTRIBUTES = {
    "decrypt": ("tenantstore.column", "tenantstore.key_id"),
    "encrypt": ("tenantstore.column", "tenantstore.key_id"),
    "decrypt.failures": ("tenantstore.column", "tenantstore.reason"),
    "cache.hits": ("tenantstore.cache",),
    "cache.misses": ("tenantstore.cache",),
}
_DESCRIPTIONS = {
    "decrypt": "Secrets decrypted",
    "encrypt": "Secrets encrypted",
    "decrypt.failures": "Secrets not decrypted: wrong_key, corrupt or plaintext_refused",
    "cache.hits": "Secrets or tenants served from a cache",
    "cache.misses": "Secrets or tenants not found in a cache",
}


def _version() -> str:
    try:
        return metadata.version("tenantstore")
    except metadata.PackageNotFoundError:  # pragma: no cover - an uninstalled checkout
        return "0.0.0"


class Metrics:
    """The instruments of one repository, `AsyncCrypto`, runner or cache.

    Args:
        meter_provider: the provider to take the meter from; None uses the
            global one (`opentelemetry.metrics.get_meter_provider()`), which is
            a no-op until the application installs an SDK. tenantstore never
            installs one.
        flush_interval: the most seconds hot-path counts wait before they
            reach the instruments.
        clock: a monotonic clock in seconds (tests pin it).
    """

    __slots__ = (
        "_check",
        "_clock",
        "_counters",
        "_flushed_at",
        "_histograms",
        "_live",
        "_pending",
        "_primary",
        "_runner",
        "flush_interval",
        "last_check",
        "live_events",
        "totals",
    )

    def __init__(
        self,
        meter_provider: MeterProvider | None = None,
        *,
        flush_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        provider = meter_provider or otel.get_meter_provider()
        meter = provider.get_meter("tenantstore", _version())
        self.flush_interval = flush_interval
        self.last_check: bool | None = None
        self.live_events: Counter[str] = Counter()
        """Every live-cache event so far (for tests and health checks)."""
        self._clock = clock
        self._flushed_at = clock()
        self._pending: dict[str, Counter[tuple[str, ...]]] = {
            name: Counter() for name in _ATTRIBUTES
        }
        self.totals: dict[str, Counter[tuple[str, ...]]] = {name: Counter() for name in _ATTRIBUTES}
        """Every hot-path count so far, flushed or not (for tests and health checks)."""
        self._counters = {
            name: meter.create_counter(
                f"tenantstore.{name}", unit="{secret}", description=_DESCRIPTIONS[name]
            )
            for name in _ATTRIBUTES
        }
        self._histograms = {
            "batch": meter.create_histogram(
                "tenantstore.worker.batch.size",
                unit="{request}",
                description="Requests carried by one worker-thread batch",
                explicit_bucket_boundaries_advisory=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512],
            ),
            "wait": meter.create_histogram(
                "tenantstore.worker.queue.wait",
                unit="s",
                description="How long the oldest request of a batch waited for the worker",
                explicit_bucket_boundaries_advisory=[
                    0.0005,
                    0.001,
                    0.002,
                    0.004,
                    0.008,
                    0.016,
                    0.032,
                    0.064,
                    0.128,
                    0.256,
                    1.0,
                ],
            ),
            "duration": meter.create_histogram(
                "tenantstore.runner.duration",
                unit="s",
                description="Duration of a runner run",
                explicit_bucket_boundaries_advisory=[1, 5, 15, 60, 300, 900, 1800, 3600, 7200],
            ),
        }
        self._runner = meter.create_counter(
            "tenantstore.runner.secrets",
            unit="{secret}",
            description="Secrets a runner processed, by outcome",
        )
        self._primary = meter.create_gauge(
            "tenantstore.keys.primary",
            unit="1",
            description="1 for the primary key id this process encrypts with",
        )
        self._check = meter.create_gauge(
            "tenantstore.keys.check",
            unit="1",
            description="1 when the last key check passed, 0 when it failed",
        )
        self._live = {
            name: meter.create_counter(
                f"tenantstore.live_cache.{name}", unit="{event}", description=text
            )
            for name, text in (
                ("invalidations", "Tenants dropped from the live cache by a notification"),
                ("flushes", "Times the live cache was emptied"),
                ("bypassed", "Calls answered from the database while the listener was down"),
                ("reconnects", "Times the live cache's listener connected again"),
            )
        }

    def __repr__(self) -> str:
        return "<Metrics>"

    # -- the hot path: plain counters, flushed now and then ---------------------

    def _add(self, name: str, attributes: tuple[str, ...], count: int) -> None:
        self._pending[name][attributes] += count
        self.totals[name][attributes] += count
        if self._clock() - self._flushed_at >= self.flush_interval:
            self.flush()

    def flush(self) -> None:
        """Hand the hot-path counts gathered since the last flush to the instruments."""
        self._flushed_at = self._clock()
        for name, pending in self._pending.items():
            if pending:
                keys, counter = _ATTRIBUTES[name], self._counters[name]
                for values, count in list(pending.items()):
                    counter.add(count, dict(zip(keys, values, strict=True)))
                pending.clear()

    def decrypted(self, column: str, key_id: str, count: int = 1) -> None:
        """`count` secrets of `column` decrypted under `key_id`."""
        self._add("decrypt", (column, key_id), count)

    def encrypted(self, column: str, key_id: str, count: int = 1) -> None:
        """`count` secrets of `column` encrypted under `key_id`."""
        self._add("encrypt", (column, key_id), count)

    def decrypt_failed(self, column: str, reason: str) -> None:
        """A secret of `column` could not be decrypted: wrong_key, corrupt or plaintext_refused."""
        self._add("decrypt.failures", (column, reason), 1)

    def cache(self, cache: str, hits: int, misses: int) -> None:
        """Lookups in `cache` (secrets, tenants, live): how many hit and missed."""
        if hits:
            self._add("cache.hits", (cache,), hits)
        if misses:
            self._add("cache.misses", (cache,), misses)

    def count(self, name: str, attributes: tuple[str, ...]) -> int:
        """The running total of a hot-path counter (for tests and health checks)."""
        return self.totals[name][attributes]

    # -- per batch, per run ----------------------------------------------------

    def batch(self, requests: int, waited: float) -> None:
        """One worker batch: how many requests it carried, how long its oldest waited."""
        self._histograms["batch"].record(requests)
        self._histograms["wait"].record(waited)

    def runner_secrets(
        self, operation: str, table: str, column: str, outcome: str, count: int
    ) -> None:
        """A runner's secrets of `column` with `outcome` (changed, skipped, failed, ...)."""
        if count:
            self._runner.add(
                count,
                {
                    "tenantstore.operation": operation,
                    "tenantstore.table": table,
                    "tenantstore.column": column,
                    "tenantstore.outcome": outcome,
                },
            )

    def run_finished(self, operation: str, table: str, seconds: float, outcome: str) -> None:
        """A runner run ended: completed, failed or interrupted."""
        self._histograms["duration"].record(
            seconds,
            {
                "tenantstore.operation": operation,
                "tenantstore.table": table,
                "tenantstore.outcome": outcome,
            },
        )

    # -- keys and the live cache -------------------------------------------------

    def primary_key(self, key_id: str) -> None:
        """The primary key id this process encrypts with (reported as a gauge of 1)."""
        self._primary.set(1, {"tenantstore.key_id": key_id})

    def key_check(self, passed: bool) -> None:
        """The outcome of the last key check (a gauge: 1 passed, 0 failed)."""
        self.last_check = passed
        self._check.set(1 if passed else 0)

    def live(self, event: str, count: int = 1) -> None:
        """A live-cache event: invalidations, flushes, bypassed, reconnects."""
        if count:
            self.live_events[event] += count
            self._live[event].add(count)
