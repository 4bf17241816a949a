"""PostgresSink against a real PostgreSQL: fields, order, batches, back-pressure, drops, outages."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import asyncpg
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from tenantstore import ConfigurationError, KeyRing, TenantRepository
from tenantstore.audit import AuditEvent, AuditLog, audit_actor
from tenantstore.audit.pg import PostgresSink
from tenantstore.migrate import upgrade

SECRET = "AIza-planted-secret-0123456789"
TOKEN_SECRET = "ya29.planted-access-token"
WEBHOOK = "whsec_planted_webhook"


@pytest.fixture
async def audited(pool: asyncpg.Pool, keyring: KeyRing) -> asyncpg.Pool:
    """The test's pool on a database migrated to the latest version (audit tables included)."""
    await upgrade(pool, keyring)
    return pool


@pytest.fixture
def reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture
def provider(reader: InMemoryMetricReader) -> MeterProvider:
    return MeterProvider(metric_readers=[reader])


def events(count: int, prefix: str = "t", **fields: object) -> list[AuditEvent]:
    return [
        AuditEvent("read", "tenants", "gemini_api_key", f"{prefix}{i:05d}", "kid", "ok", **fields)  # type: ignore[arg-type]
        for i in range(count)
    ]


def points(reader: InMemoryMetricReader, name: str) -> dict[tuple[tuple[str, object], ...], float]:
    """The data points of instrument `name`, by their attributes."""
    data = reader.get_metrics_data()
    found: dict[tuple[tuple[str, object], ...], float] = {}
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    for point in metric.data.data_points:
                        found[tuple(sorted((point.attributes or {}).items()))] = point.value  # type: ignore[union-attr]
    return found


async def wait_until(check: Callable[[], Awaitable[bool]], what: str, limit: float = 60) -> None:
    """Poll `check` until it holds (a wait, not a timed assertion: `limit` only stops a hang)."""
    deadline = time.monotonic() + limit
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        await asyncio.sleep(0.02)


async def rows(pool: asyncpg.Pool, process: str | None = None) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT * FROM tenantstore_audit WHERE $1::text IS NULL OR process = $1 ORDER BY id",
        process,
    )


async def session(pool: asyncpg.Pool, process: str) -> asyncpg.Record:
    row = await pool.fetchrow(
        "SELECT * FROM tenantstore_audit_sessions WHERE process = $1", process
    )
    assert row is not None
    return row


async def writer_waits_for_a_lock(pool: asyncpg.Pool) -> bool:
    return bool(
        await pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND query LIKE 'COPY%'"
        )
    )


class TableLock:
    """`LOCK TABLE tenantstore_audit IN SHARE MODE` held on a connection of its own:
    the sink's COPY waits behind it until `release()`."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.tx = conn.transaction()

    @classmethod
    async def take(cls, database_url: str) -> TableLock:
        lock = cls(await asyncpg.connect(database_url))
        await lock.tx.start()
        await lock.conn.execute("LOCK TABLE tenantstore_audit IN SHARE MODE")
        return lock

    async def release(self) -> None:
        if not self.conn.is_closed():
            await self.tx.commit()
            await self.conn.close()


# -- what lands in the table ----------------------------------------------------------


async def test_repository_reads_writes_and_clears_land_with_their_fields_and_no_secret(
    audited: asyncpg.Pool, keyring: KeyRing, key: str
) -> None:
    sink = PostgresSink(audited)
    async with TenantRepository(audited, keyring, audit=AuditLog(sink)) as repo:
        with audit_actor("user:42"):
            await repo.create_tenant(
                "acme", "Acme", gemini_api_key=SECRET, oauth_access_token=TOKEN_SECRET
            )
            await repo.get_tenant("acme")
            await repo.get_tenant("acme")  # from the repository's memo: still an access
            await repo.set_secrets("acme", webhook_signing_secret=WEBHOOK)
            await repo.set_secrets("acme", gemini_api_key=None)
        await repo.get_tenants(["acme"])  # no actor set
    key_id = keyring.primary_key_id
    got = [
        (r["operation"], r["table_name"], r["column_name"], r["row_key"], r["key_id"],
         r["outcome"], r["count"], r["actor"], r["seq"])
        for r in await rows(audited)
    ]  # fmt: skip
    assert got == [
        ("write", "tenants", "gemini_api_key", "acme", key_id, "ok", 1, "user:42", 1),
        ("write", "tenants", "oauth_access_token", "acme", key_id, "ok", 1, "user:42", 2),
        ("read", "tenants", "gemini_api_key", "acme", key_id, "ok", 1, "user:42", 3),
        ("read", "tenants", "oauth_access_token", "acme", key_id, "ok", 1, "user:42", 4),
        ("read", "tenants", "gemini_api_key", "acme", key_id, "ok", 1, "user:42", 5),
        ("read", "tenants", "oauth_access_token", "acme", key_id, "ok", 1, "user:42", 6),
        ("write", "tenants", "webhook_signing_secret", "acme", key_id, "ok", 1, "user:42", 7),
        ("clear", "tenants", "gemini_api_key", "acme", None, "ok", 1, "user:42", 8),
        ("read", "tenants", "oauth_access_token", "acme", key_id, "ok", 1, None, 9),
        ("read", "tenants", "webhook_signing_secret", "acme", key_id, "ok", 1, None, 10),
    ]
    assert {r["process"] for r in await rows(audited)} == {sink.process}
    # Neither a secret nor a token (nor the key) appears anywhere in the audit tables.
    stored = await audited.fetch(
        "SELECT oauth_access_token, webhook_signing_secret FROM tenants WHERE tenant_id = 'acme'"
    )
    text = await audited.fetchval(
        "SELECT string_agg(a::text, ' ') || (SELECT string_agg(s::text, ' ') "
        "FROM tenantstore_audit_sessions s) FROM tenantstore_audit a"
    )
    for planted in (SECRET, TOKEN_SECRET, WEBHOOK, *stored[0], key):
        assert planted not in text
    assert "gAAAAA" not in text  # how every Fernet token starts
    counts = await session(audited, sink.process)
    assert (counts["issued"], counts["written"], counts["dropped"]) == (10, 10, 0)
    assert counts["closed_at"] is not None


async def test_more_events_than_a_batch_keep_their_order_in_transactions_of_a_batch_each(
    audited: asyncpg.Pool,
) -> None:
    sink = PostgresSink(audited, batch=100, interval=0.05)
    sent = events(1050)
    for start in range(0, len(sent), 7):
        await sink.emit(sent[start : start + 7])
    await sink.flush()
    written = await rows(audited, sink.process)
    assert [r["row_key"] for r in written] == [e.key for e in sent]
    assert [r["seq"] for r in written] == list(range(1, 1051))
    per_transaction = await audited.fetch(
        "SELECT xmin::text, count(*) FROM tenantstore_audit GROUP BY 1"
    )
    assert len(per_transaction) >= 11
    assert max(r[1] for r in per_transaction) <= 100
    await sink.aclose()


async def test_values_the_server_refuses_are_written_escaped_not_lost(
    audited: asyncpg.Pool,
) -> None:
    sink = PostgresSink(audited)
    await sink.emit(events(1, actor="evil\x00actor") + events(1, prefix="lone\ud800"))
    await sink.aclose()
    written = await rows(audited, sink.process)
    assert [(r["actor"], r["row_key"]) for r in written] == [
        ("evil\\x00actor", "t00000"),
        (None, "lone\\ud80000000"),
    ]


# -- a full buffer ----------------------------------------------------------------------


async def test_a_full_buffer_makes_emit_wait_until_the_writer_makes_room(
    audited: asyncpg.Pool, database_url: str
) -> None:
    lock = await TableLock.take(database_url)
    sink = PostgresSink(audited, buffer=10, batch=5)
    try:
        await sink.emit(events(10))  # room for all: returns at once
        await wait_until(lambda: writer_waits_for_a_lock(audited), "the writer to block")
        blocked = asyncio.create_task(sink.emit(events(2, prefix="late")))
        for _ in range(20):
            await asyncio.sleep(0)
        assert not blocked.done()  # the COPY cannot finish while the lock is held
        assert sink.buffered == 10
    finally:
        await lock.release()
    await blocked
    await sink.aclose()
    written = await rows(audited, sink.process)
    assert [r["row_key"] for r in written] == [e.key for e in events(10) + events(2, "late")]
    counts = await session(audited, sink.process)
    assert (counts["issued"], counts["written"], counts["dropped"]) == (12, 12, 0)


async def test_a_full_buffer_with_on_full_drop_drops_counts_and_logs_once_per_interval(
    audited: asyncpg.Pool,
    database_url: str,
    reader: InMemoryMetricReader,
    provider: MeterProvider,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "tenantstore")
    lock = await TableLock.take(database_url)
    sink = PostgresSink(
        audited, buffer=10, batch=5, interval=600, on_full="drop", meter_provider=provider
    )
    try:
        await sink.emit(events(10))
        await sink.emit(events(5, prefix="dropped"))  # returns although the writer is stuck
        await sink.emit(events(3, prefix="dropped-too"))  # within the interval: not logged yet
        dropped = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
        assert len(dropped) == 1 and "5 events dropped" in dropped[0] and "full: 5" in dropped[0]
        assert points(reader, "tenantstore.audit.dropped") == {(("tenantstore.reason", "full"),): 8}
    finally:
        await lock.release()
    await sink.aclose()  # logs the drops not logged yet
    dropped = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(dropped) == 2 and "3 events dropped" in dropped[1]
    assert [r["row_key"] for r in await rows(audited, sink.process)] == [e.key for e in events(10)]
    counts = await session(audited, sink.process)
    assert (counts["issued"], counts["written"], counts["dropped"]) == (18, 10, 8)
    assert points(reader, "tenantstore.audit.written") == {(): 10}


# -- outages and closing ----------------------------------------------------------------


async def test_a_database_outage_is_logged_retried_and_loses_or_repeats_nothing(
    audited: asyncpg.Pool,
    database_url: str,
    server_url: str,
    reader: InMemoryMetricReader,
    provider: MeterProvider,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "tenantstore")
    name = urlsplit(database_url).path[1:]
    sink = PostgresSink(audited, batch=10, interval=0.01, meter_provider=provider)
    await sink.emit(events(5, prefix="before"))
    await sink.flush()
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
        )
        await sink.emit(events(20, prefix="during"))

        async def failed_twice() -> bool:
            return points(reader, "tenantstore.audit.write.failures").get((), 0) >= 2

        await wait_until(failed_twice, "two failed writes")
        assert sink.buffered > 0
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await admin.close()
    await sink.aclose()
    written = await rows(audited, sink.process)
    assert [r["row_key"] for r in written] == [
        e.key for e in events(5, "before") + events(20, "during")
    ]
    assert [r["seq"] for r in written] == list(range(1, 26))
    messages = [r.getMessage() for r in caplog.records]
    failures = [m for m in messages if "could not write" in m]
    assert failures and all("retrying in" in m for m in failures)
    assert any("wrote again after" in m for m in messages)
    assert not any(urlsplit(database_url).netloc in m for m in messages)


async def test_aclose_writes_everything_buffered_then_counts_later_events_as_dropped(
    audited: asyncpg.Pool,
    reader: InMemoryMetricReader,
    provider: MeterProvider,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "tenantstore")
    sink = PostgresSink(audited, interval=600, meter_provider=provider)  # no flush before close
    await sink.emit(events(7))
    assert await rows(audited) == []
    await sink.aclose()
    assert len(await rows(audited, sink.process)) == 7
    counts = await session(audited, sink.process)
    assert (counts["issued"], counts["written"], counts["closed_at"] is not None) == (7, 7, True)
    await sink.emit(events(2))  # after close: not written, but never silently gone
    assert points(reader, "tenantstore.audit.dropped") == {(("tenantstore.reason", "closed"),): 2}
    assert any("2 events dropped" in r.getMessage() for r in caplog.records)
    await sink.aclose()  # a second close does nothing
    assert len(await rows(audited, sink.process)) == 7


async def test_aclose_that_cannot_write_in_time_logs_and_records_the_loss(
    audited: asyncpg.Pool,
    database_url: str,
    reader: InMemoryMetricReader,
    provider: MeterProvider,
    caplog: pytest.LogCaptureFixture,
) -> None:
    lock = await TableLock.take(database_url)
    try:
        sink = PostgresSink(audited, batch=5, meter_provider=provider)
        await sink.emit(events(5))
        await wait_until(lambda: writer_waits_for_a_lock(audited), "the writer to block")
        await sink.aclose(timeout=0.2)
    finally:
        await lock.release()
    assert any("could not write 5 events" in r.getMessage() for r in caplog.records)
    counts = await session(audited, sink.process)
    assert counts["closed_at"] is not None
    assert counts["issued"] - counts["written"] - counts["dropped"] == 5
    assert points(reader, "tenantstore.audit.dropped") == {
        (("tenantstore.reason", "unflushed"),): 5
    }
    assert await rows(audited) == []


async def test_a_sink_made_from_a_url_writes_through_a_pool_of_its_own(
    audited: asyncpg.Pool, database_url: str
) -> None:
    async with PostgresSink(database_url) as sink:
        await sink.emit(events(3))
    assert len(await rows(audited, sink.process)) == 3
    assert (await session(audited, sink.process))["closed_at"] is not None


def test_bad_settings_are_configuration_errors_before_any_io() -> None:
    for settings in ({"buffer": 0}, {"batch": 0}, {"interval": 0}, {"on_full": "queue"}):
        with pytest.raises(ConfigurationError):
            PostgresSink("postgresql://localhost/x", **settings)
    with pytest.raises(ConfigurationError):
        PostgresSink("postgresql://[::1/x")
    with pytest.raises(TypeError):
        PostgresSink(42)  # type: ignore[arg-type]
