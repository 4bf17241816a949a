"""tenantstore's OpenTelemetry instruments, created once per object that records them.

The metrics go through the OpenTelemetry API: without an SDK installed by the
application they cost a no-op. Figures counted per secret on the hot path
(decryptions, encryptions, cache lookups, failures) are added to plain
counters keyed by their attributes and reported by observable instruments
when a reader collects, so even with an SDK a warm read pays a dict update,
not an instrument call. Per-batch and per-run figures are recorded as they
happen. Attributes stay low-cardinality: column, key id, reason, operation,
outcome; never a tenant id (that belongs in an audit event).

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

from collections import Counter
from collections.abc import Callable, Iterable
from importlib import metadata

from opentelemetry import metrics as otel
from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation

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
    """

    __slots__ = (
        "_counts",
        "_histograms",
        "_meter",
        "_primary",
        "_runner",
        "check_passed",
        "live",
    )

    def __init__(self, meter_provider: MeterProvider | None = None) -> None:
        provider = meter_provider or otel.get_meter_provider()
        meter = self._meter = provider.get_meter("tenantstore", _version())
        self._counts: dict[str, Counter[tuple[str, ...]]] = {
            name: Counter() for name in _ATTRIBUTES
        }
        for name in _ATTRIBUTES:
            meter.create_observable_counter(
                f"tenantstore.{name}",
                callbacks=[self._reporter(name)],
                unit="{secret}",
                description=_DESCRIPTIONS[name],
            )
        self._histograms = {
            "batch": meter.create_histogram(
                "tenantstore.worker.batch.size",
                unit="{request}",
                description="Requests carried by one worker-thread batch",
            ),
            "wait": meter.create_histogram(
                "tenantstore.worker.queue.wait",
                unit="s",
                description="How long the oldest request of a batch waited for the worker",
            ),
            "duration": meter.create_histogram(
                "tenantstore.runner.duration", unit="s", description="Duration of a runner run"
            ),
        }
        self._runner = meter.create_counter(
            "tenantstore.runner.secrets",
            unit="{secret}",
            description="Secrets a runner processed, by outcome",
        )
        self._primary: str | None = None
        self.check_passed: bool | None = None
        meter.create_observable_gauge(
            "tenantstore.keys.primary",
            callbacks=[self._report_primary],
            unit="1",
            description="1 for the primary key id this process encrypts with",
        )
        meter.create_observable_gauge(
            "tenantstore.keys.check",
            callbacks=[self._report_check],
            unit="1",
            description="1 when the last key check passed, 0 when it failed",
        )
        self.live: dict[str, int] = Counter()
        for name, text in (
            ("invalidations", "Tenants dropped from the live cache by a notification"),
            ("flushes", "Times the live cache was emptied"),
            ("bypassed", "Calls answered from the database while the listener was down"),
            ("reconnects", "Times the live cache's listener connected again"),
        ):
            meter.create_observable_counter(
                f"tenantstore.live_cache.{name}",
                callbacks=[self._report_live(name)],
                unit="{event}",
                description=text,
            )

    def __repr__(self) -> str:
        return "<Metrics>"

    # -- the hot path: plain counters ---------------------------------------

    def decrypted(self, column: str, key_id: str, count: int = 1) -> None:
        """`count` secrets of `column` decrypted under `key_id`."""
        self._counts["decrypt"][column, key_id] += count

    def encrypted(self, column: str, key_id: str, count: int = 1) -> None:
        """`count` secrets of `column` encrypted under `key_id`."""
        self._counts["encrypt"][column, key_id] += count

    def decrypt_failed(self, column: str, reason: str) -> None:
        """A secret of `column` could not be decrypted: wrong_key, corrupt or plaintext_refused."""
        self._counts["decrypt.failures"][column, reason] += 1

    def cache(self, cache: str, hits: int, misses: int) -> None:
        """Lookups in `cache` (secrets, tenants, live): how many hit and missed."""
        if hits:
            self._counts["cache.hits"][(cache,)] += hits
        if misses:
            self._counts["cache.misses"][(cache,)] += misses

    def count(self, name: str, attributes: tuple[str, ...]) -> int:
        """The running total of a hot-path counter (for tests and health checks)."""
        return self._counts[name][attributes]

    def _reporter(self, name: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        keys = _ATTRIBUTES[name]
        counts = self._counts[name]

        def report(options: CallbackOptions) -> Iterable[Observation]:
            return [
                Observation(total, dict(zip(keys, values, strict=True)))
                for values, total in list(counts.items())
            ]

        return report

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

    # -- keys ------------------------------------------------------------------

    def primary_key(self, key_id: str) -> None:
        """The primary key id this process encrypts with (reported as a gauge of 1)."""
        self._primary = key_id

    def _report_primary(self, options: CallbackOptions) -> Iterable[Observation]:
        if self._primary is None:
            return []
        return [Observation(1, {"tenantstore.key_id": self._primary})]

    def _report_check(self, options: CallbackOptions) -> Iterable[Observation]:
        if self.check_passed is None:
            return []
        return [Observation(1 if self.check_passed else 0)]

    # -- the live cache --------------------------------------------------------

    def _report_live(self, name: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def report(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(self.live[name])]

        return report
