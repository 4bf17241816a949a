"""LiveCache: tenants from memory, fresh after every committed write, whoever wrote it.

The reader is this process (a repository with a live cache); the writer is
another process (`Writer`) that writes through its own repository or with
plain SQL. Freshness is polled with a deadline: the tests assert values,
never durations.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest

from tenantstore import (
    ConfigurationError,
    KeyRing,
    LiveCache,
    Tenant,
    TenantRepository,
)
from tenantstore.audit import audit_actor
from tenantstore.migrate import upgrade

DEADLINE = 20.0  # seconds a change may take to show (generous: the machine is shared)
LONG_ID = "L" * 255
WIDE_ID = "é" * 255  # 510 bytes
ODD_ID = 'quo"te\nand\\slash'

# The writer process: JSON commands on stdin, "ok" on stdout once committed.
# Its secrets come through the environment, never argv.
WRITER = """
import asyncio, json, os, sys
import asyncpg
from tenantstore import KeyRing, TenantRepository

async def main():
    keyring = KeyRing(os.environ["ENCRYPTION_KEY"])
    pool = await asyncpg.create_pool(os.environ["TS_DATABASE_URL"], min_size=1, max_size=2)
    repo = TenantRepository(pool, keyring)
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        c = json.loads(line)
        op, tenant_id, value = c["op"], c["id"], c.get("value")
        if op == "repo_set":
            await repo.set_secrets(tenant_id, gemini_api_key=value)
        elif op == "repo_create":
            await repo.create_tenant(tenant_id, "N", gemini_api_key=value)
        elif op == "repo_delete":
            await repo.delete_tenant(tenant_id)
        elif op == "sql_update":
            await pool.execute(
                "UPDATE tenants SET gemini_api_key = $2, name = $3 WHERE tenant_id = $1",
                tenant_id, keyring.encrypt(value), "by sql",
            )
        elif op == "sql_insert":
            await pool.execute(
                "INSERT INTO tenants (tenant_id, name, gemini_api_key) VALUES ($1, 'N', $2)",
                tenant_id, keyring.encrypt(value),
            )
        elif op == "sql_delete":
            await pool.execute("DELETE FROM tenants WHERE tenant_id = $1", tenant_id)
        print("ok", flush=True)
    await pool.close()

asyncio.run(main())
"""


class Writer:
    """A writer process: `await writer.do("sql_update", id, value)` returns once committed."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def do(self, op: str, tenant_id: str, value: str | None = None) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, "id": tenant_id, "value": value}).encode())
        self.proc.stdin.write(b"\n")
        await self.proc.stdin.drain()
        line = await asyncio.wait_for(self.proc.stdout.readline(), 60)
        assert line == b"ok\n", f"the writer failed on {op}"


@asynccontextmanager
async def writer_process(url: str, key: str) -> AsyncIterator[Writer]:
    """Start a writer process on the database at `url`; stop it on the way out."""
    env = {**os.environ, "ENCRYPTION_KEY": key, "TS_DATABASE_URL": url}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        WRITER,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        yield Writer(proc)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        await asyncio.wait_for(proc.wait(), 30)


@pytest.fixture
async def writer(database_url: str, key: str) -> AsyncIterator[Writer]:
    async with writer_process(database_url, key) as process:
        yield process


@pytest.fixture
async def migrated(pool: asyncpg.Pool, keyring: KeyRing) -> asyncpg.Pool:
    await upgrade(pool, keyring)
    return pool


def live_cache(url: str, **options: Any) -> LiveCache:
    """A cache that notices trouble and reconnects quickly, as tests want."""
    options = {"health_interval": 1.0, "reconnect_delay": (0.05, 0.5), **options}
    return LiveCache(listen_dsn=url, **options)


@pytest.fixture
async def reader(
    migrated: asyncpg.Pool, database_url: str, keyring: KeyRing
) -> AsyncIterator[TenantRepository]:
    async with TenantRepository(migrated, keyring, live_cache=live_cache(database_url)) as repo:
        yield repo


def cache_of(repo: TenantRepository) -> LiveCache:
    cache = repo._live
    assert cache is not None
    return cache


async def until_live(repo: TenantRepository) -> None:
    await asyncio.wait_for(cache_of(repo).wait_live(), DEADLINE)


def hits(repo: TenantRepository) -> int:
    return repo.crypto.metrics.count("cache.hits", ("live",))


def misses(repo: TenantRepository) -> int:
    return repo.crypto.metrics.count("cache.misses", ("live",))


def gemini(tenant: Tenant | None) -> str | None:
    if tenant is None or tenant.gemini_api_key is None:
        return None
    return tenant.gemini_api_key.get_secret_value()


async def poll(read: Callable[[], Awaitable[Any]], done: Callable[[Any], bool]) -> list[Any]:
    """Read until `done(value)`; return every value read. Fails after `DEADLINE`."""
    seen: list[Any] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while True:
        seen.append(await read())
        if done(seen[-1]):
            return seen
        assert loop.time() < deadline, f"still {seen[-1]!r} after {len(seen)} reads"
        await asyncio.sleep(0.002)


async def until_value(repo: TenantRepository, tenant_id: str, expected: str | None) -> list[Any]:
    """Poll `get_tenant` until its Gemini key is `expected`; return every key read."""
    seen = await poll(lambda: repo.get_tenant(tenant_id), lambda t: gemini(t) == expected)
    return [gemini(t) for t in seen]


# -- configuration ---------------------------------------------------------------------


@pytest.mark.parametrize("dsn", [None, "", "   "])
def test_without_a_listener_url_the_mode_refuses_to_start(dsn: str | None) -> None:
    with pytest.raises(ConfigurationError, match=r"LiveCache needs listen_dsn: .*PgBouncer"):
        LiveCache(listen_dsn=dsn)


def test_a_malformed_listener_url_is_refused_without_showing_its_password() -> None:
    with pytest.raises(ConfigurationError) as info:
        LiveCache(listen_dsn="postgresql://app:hunter2@db:54x32/app")
    assert "invalid database URL" in str(info.value)
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize(
    "options",
    [{"max_tenants": 0}, {"health_interval": 0}, {"reconnect_delay": (1.0, 0.5)}],
)
def test_out_of_range_settings_are_configuration_errors(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        LiveCache(listen_dsn="postgresql://localhost/app", **options)


async def test_one_cache_serves_one_repository(migrated: asyncpg.Pool, keyring: KeyRing) -> None:
    cache = LiveCache(listen_dsn="postgresql://localhost/app")
    TenantRepository(migrated, keyring, live_cache=cache)
    with pytest.raises(ConfigurationError, match="already serves another"):
        TenantRepository(migrated, keyring, live_cache=cache)


async def test_a_live_cache_refuses_a_bare_connection(
    migrated: asyncpg.Pool, database_url: str, keyring: KeyRing
) -> None:
    """Through one connection, a row of its open transaction could be cached for all."""
    conn = await asyncpg.connect(database_url)
    try:
        with pytest.raises(TypeError, match="needs an asyncpg pool"):
            TenantRepository(conn, keyring, live_cache=live_cache(database_url))
    finally:
        await conn.close()


def test_repr_shows_state_and_size_but_not_the_url() -> None:
    cache = LiveCache(listen_dsn="postgresql://app:hunter2@localhost/app", max_tenants=5)
    assert repr(cache) == "<LiveCache bypassed 0/5>"


# -- serving from memory ----------------------------------------------------------------


async def test_a_loaded_tenant_is_served_from_memory_and_audited_on_every_hit(
    reader: TenantRepository, caplog: pytest.LogCaptureFixture
) -> None:
    await reader.create_tenant("acme", "Acme", gemini_api_key="AIza-1", oauth_refresh_token="r")
    await until_live(reader)
    caplog.set_level(logging.INFO, logger="tenantstore.audit")
    caplog.clear()
    with audit_actor("user:42"):
        first = await reader.get_tenant("acme")
        before = hits(reader)
        second = await reader.get_tenant("acme")
    assert hits(reader) == before + 1
    assert second is first  # the very entry kept in memory
    audited = [r.audit for r in caplog.records if r.name == "tenantstore.audit"]  # type: ignore[attr-defined]
    reads = [event for event in audited if event["operation"] == "read"]
    key_id = reader.crypto.keyring.primary_key_id
    expected = [
        ("gemini_api_key", "acme", key_id, "user:42"),
        ("oauth_refresh_token", "acme", key_id, "user:42"),
    ]
    assert [(r["column"], r["key"], r["key_id"], r["actor"]) for r in reads] == expected * 2
    assert all("AIza" not in r.getMessage() for r in caplog.records)


async def test_get_tenants_mixes_hits_and_one_load_for_the_rest(
    reader: TenantRepository,
) -> None:
    for name in ("a", "b", "c"):
        await reader.create_tenant(name, name.upper(), gemini_api_key=f"k-{name}")
    await until_live(reader)
    await reader.get_tenant("a")
    before_hits, before_misses = hits(reader), misses(reader)
    found = await reader.get_tenants(["a", "b", "c", "nobody"])
    assert {t: gemini(v) for t, v in found.items()} == {"a": "k-a", "b": "k-b", "c": "k-c"}
    assert (hits(reader) - before_hits, misses(reader) - before_misses) == (1, 3)
    again = await reader.get_tenants(["c", "b"])
    assert set(again) == {"b", "c"}
    assert hits(reader) - before_hits == 3


async def test_memory_is_bounded_by_max_tenants_least_recently_used_first(
    migrated: asyncpg.Pool, database_url: str, keyring: KeyRing
) -> None:
    cache = live_cache(database_url, max_tenants=2)
    async with TenantRepository(migrated, keyring, live_cache=cache) as repo:
        for name in ("a", "b", "c"):
            await repo.create_tenant(name, name)
        await until_live(repo)
        for name in ("a", "b", "a", "c"):  # b is the least recently used when c comes
            await repo.get_tenant(name)
        assert len(cache) == 2
        before = misses(repo)
        await repo.get_tenant("a")
        await repo.get_tenant("c")
        assert misses(repo) == before
        await repo.get_tenant("b")
        assert misses(repo) == before + 1


async def test_a_write_through_the_repository_is_read_back_at_once(
    migrated: asyncpg.Pool, database_url: str, keyring: KeyRing
) -> None:
    """Read-your-writes in one process, with no notification to help.

    The repository's connection runs with `session_replication_role =
    replica`, under which triggers do not fire: its writes notify nobody.
    """
    pool = await asyncpg.create_pool(
        database_url, min_size=1, max_size=2,
        server_settings={"session_replication_role": "replica"},
    )  # fmt: skip
    try:
        async with TenantRepository(pool, keyring, live_cache=live_cache(database_url)) as repo:
            await repo.create_tenant("acme", "Acme", gemini_api_key="old")
            await until_live(repo)
            assert gemini(await repo.get_tenant("acme")) == "old"
            before = hits(repo)
            assert gemini(await repo.get_tenant("acme")) == "old"
            assert hits(repo) == before + 1  # from memory
            await repo.set_secrets("acme", gemini_api_key="new")
            assert gemini(await repo.get_tenant("acme")) == "new"
            assert gemini(await repo.get_tenant("acme")) == "new"
            await repo.delete_tenant("acme")
            assert await repo.get_tenant("acme") is None
    finally:
        await pool.close()


async def test_calls_before_start_read_the_database_and_count_as_bypassed(
    migrated: asyncpg.Pool, database_url: str, keyring: KeyRing
) -> None:
    repo = TenantRepository(migrated, keyring, live_cache=live_cache(database_url))
    await repo.create_tenant("acme", "Acme", gemini_api_key="k")
    assert gemini(await repo.get_tenant("acme")) == "k"
    assert (await repo.get_tenants(["acme"])).keys() == {"acme"}
    assert repo.crypto.metrics.live_events["bypassed"] == 2
    assert hits(repo) == misses(repo) == 0
    await repo.aclose()


# -- freshness across processes ---------------------------------------------------------


async def test_every_committed_write_of_another_process_shows_and_the_old_value_never_returns(
    reader: TenantRepository, writer: Writer
) -> None:
    """Repository writes and plain SQL, on ids of 255 characters and odd ones."""
    ids = ["plain", LONG_ID, WIDE_ID, ODD_ID]
    for tenant_id in ids:
        await reader.create_tenant(tenant_id, "N", gemini_api_key="v0")
    await until_live(reader)
    for tenant_id in ids:
        assert gemini(await reader.get_tenant(tenant_id)) == "v0"
        for version, op in enumerate(("repo_set", "sql_update", "repo_set", "sql_update"), 1):
            old, new = f"v{version - 1}", f"v{version}"
            await writer.do(op, tenant_id, new)
            seen = await until_value(reader, tenant_id, new)
            assert set(seen[:-1]) <= {old}
            before = hits(reader)
            for _ in range(5):  # from memory now, and never the old value again
                assert gemini(await reader.get_tenant(tenant_id)) == new
            assert hits(reader) == before + 5


async def test_deletes_and_inserts_of_another_process_show(
    reader: TenantRepository, writer: Writer
) -> None:
    for tenant_id in ("by-sql", LONG_ID):
        await reader.create_tenant(tenant_id, "N", gemini_api_key="first")
    await until_live(reader)
    for tenant_id, delete, insert in (
        ("by-sql", "sql_delete", "sql_insert"),
        (LONG_ID, "repo_delete", "repo_create"),
    ):
        assert gemini(await reader.get_tenant(tenant_id)) == "first"
        await writer.do(delete, tenant_id)
        assert set(await until_value(reader, tenant_id, None)) <= {"first", None}
        for _ in range(3):
            assert await reader.get_tenant(tenant_id) is None
        await writer.do(insert, tenant_id, "second")
        assert set(await until_value(reader, tenant_id, "second")) <= {None, "second"}
        for _ in range(3):
            assert gemini(await reader.get_tenant(tenant_id)) == "second"


async def test_a_read_under_way_when_its_tenant_changes_keeps_nothing_stale(
    reader: TenantRepository, migrated: asyncpg.Pool, keyring: KeyRing
) -> None:
    """The read saw the row before the write; the invalidation came while it ran."""
    await reader.create_tenant("slow", "S", gemini_api_key="old")
    await reader.create_tenant("marker", "M")
    await until_live(reader)
    cache = cache_of(reader)
    await reader.get_tenant("marker")
    plain = TenantRepository(migrated, keyring)
    read_done, release = asyncio.Event(), asyncio.Event()

    async def slow_load(tenant_id: str) -> tuple[Tenant, tuple[str | None, ...]] | None:
        tenant = await plain.get_tenant(tenant_id)  # the database's answer, before the write
        assert tenant is not None
        read_done.set()
        await release.wait()
        return tenant, (keyring.primary_key_id, None, None, None)

    stale_read = asyncio.create_task(cache.get("slow", slow_load))
    await read_done.wait()
    # One statement for both rows: once `marker` is gone, the notification naming
    # `slow` too has been applied.
    await migrated.execute(
        "UPDATE tenants SET gemini_api_key = $1 WHERE tenant_id = ANY ($2::text[])",
        keyring.encrypt("new"),
        ["slow", "marker"],
    )
    await poll(lambda: asyncio.sleep(0, len(cache)), lambda size: size == 0)
    release.set()
    entry = await stale_read
    assert entry is not None and gemini(entry[0]) == "old"  # what that read returned
    before = misses(reader)
    assert gemini(await reader.get_tenant("slow")) == "new"
    assert misses(reader) == before + 1  # the old value was not kept


async def test_two_reads_that_disagree_keep_neither(
    reader: TenantRepository, keyring: KeyRing
) -> None:
    """One read saw the old row, one the new; the notification between them is not here yet.

    (`get_tenants` and `get_tenant` read separately; `get_tenant` calls share one read.)
    """
    await reader.create_tenant("t", "T", gemini_api_key="db")
    await until_live(reader)
    cache = cache_of(reader)
    stored = await reader.get_tenant("t")
    assert stored is not None
    old = Tenant.model_validate({**stored.model_dump(), "gemini_api_key": "old"})
    new = Tenant.model_validate({**stored.model_dump(), "gemini_api_key": "new"})
    cache.invalidate(["t"])
    gates = [asyncio.Event(), asyncio.Event()]

    key_ids = (keyring.primary_key_id, None, None, None)

    async def load_new(tenant_ids: list[str]) -> list[tuple[Tenant, tuple[str | None, ...]]]:
        await gates[0].wait()
        return [(new, key_ids)]

    async def load_old(tenant_id: str) -> tuple[Tenant, tuple[str | None, ...]]:
        await gates[1].wait()
        return old, key_ids

    reads = [
        asyncio.create_task(cache.get_many(["t"], load_new)),
        asyncio.create_task(cache.get("t", load_old)),
    ]
    await asyncio.sleep(0)
    gates[0].set()
    await reads[0]
    assert len(cache) == 1  # the first answer is kept...
    gates[1].set()
    await reads[1]
    assert len(cache) == 0  # ...until another read disagrees: neither stays
    assert gemini(await reader.get_tenant("t")) == "db"


async def test_concurrent_misses_of_one_tenant_share_one_read_and_each_is_audited(
    reader: TenantRepository, keyring: KeyRing, caplog: pytest.LogCaptureFixture
) -> None:
    await reader.create_tenant("hot", "H", gemini_api_key="k")
    await until_live(reader)
    cache = cache_of(reader)
    release = asyncio.Event()
    loads: list[str] = []

    async def load(tenant_id: str) -> tuple[Tenant, tuple[str | None, ...]] | None:
        loads.append(tenant_id)
        await release.wait()
        tenant = await TenantRepository(reader._db, keyring).get_tenant(tenant_id)
        assert tenant is not None
        return tenant, (keyring.primary_key_id, None, None, None)

    caplog.set_level(logging.INFO, logger="tenantstore.audit")
    caplog.clear()  # the writes above may have been logged, when another test enabled it
    calls = [asyncio.create_task(cache.get("hot", load)) for _ in range(5)]
    await asyncio.sleep(0)
    release.set()
    entries = await asyncio.gather(*calls)
    assert loads == ["hot"]
    assert all(entry is entries[0] for entry in entries)
    joined = [
        r
        for r in caplog.records
        if r.name == "tenantstore.audit" and r.audit["operation"] == "read"  # type: ignore[attr-defined]
    ]
    assert len(joined) == 5  # one read event per call: the first from its load, the rest here
    assert gemini(await reader.get_tenant("hot")) == "k"


async def test_callers_waiting_on_a_read_that_an_invalidation_overtook_read_again(
    reader: TenantRepository, keyring: KeyRing
) -> None:
    await reader.create_tenant("hot", "H", gemini_api_key="k")
    await until_live(reader)
    cache = cache_of(reader)
    release = asyncio.Event()
    loads: list[str] = []
    key_ids = (keyring.primary_key_id, None, None, None)
    fresh = await reader.get_tenant("hot")
    assert fresh is not None
    stale = Tenant.model_validate({**fresh.model_dump(), "gemini_api_key": "stale"})
    cache.invalidate(["hot"])

    async def load(tenant_id: str) -> tuple[Tenant, tuple[str | None, ...]]:
        loads.append(tenant_id)
        if len(loads) == 1:
            await release.wait()
            return stale, key_ids  # read before the change the invalidation announces
        return fresh, key_ids

    first = asyncio.create_task(cache.get("hot", load))
    await asyncio.sleep(0)
    waiting = [asyncio.create_task(cache.get("hot", load)) for _ in range(3)]
    await asyncio.sleep(0)
    cache.invalidate(["hot"])
    release.set()
    assert gemini((await first)[0]) == "stale"  # type: ignore[index]
    assert [gemini(entry[0]) for entry in await asyncio.gather(*waiting)] == ["k"] * 3  # type: ignore[index]
    assert loads == ["hot", "hot"]  # one more read, shared by the three


# -- what the listener refuses, and closing ------------------------------------------------


async def test_without_migration_0007_the_cache_never_serves_and_says_why(
    pool: asyncpg.Pool, database_url: str, keyring: KeyRing, caplog: pytest.LogCaptureFixture
) -> None:
    await upgrade(pool, keyring, target=4)
    caplog.set_level(logging.INFO, logger="tenantstore.live_cache")
    async with TenantRepository(pool, keyring, live_cache=live_cache(database_url)) as repo:
        await repo.create_tenant("acme", "Acme")

        def refused() -> bool:
            return any("migration 0007" in r.getMessage() for r in caplog.records)

        await poll(lambda: asyncio.sleep(0, refused()), bool)
        assert not cache_of(repo).live
        assert (await repo.get_tenant("acme")) is not None
        assert repo.crypto.metrics.live_events["bypassed"] == 1
    [record] = [r for r in caplog.records if "migration 0007" in r.getMessage()]
    assert record.levelno == logging.ERROR


async def test_an_unreachable_listener_is_logged_without_its_password_and_bypassed(
    migrated: asyncpg.Pool, keyring: KeyRing, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tenantstore.live_cache")
    cache = live_cache("postgresql://app:hunter2@127.0.0.1:1/app")
    async with TenantRepository(migrated, keyring, live_cache=cache) as repo:
        await repo.create_tenant("acme", "Acme")
        await poll(lambda: asyncio.sleep(0, "listener failed" in caplog.text), bool)
        assert (await repo.get_tenant("acme")) is not None
        assert repo.crypto.metrics.live_events["bypassed"] == 1
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "listener failed: ConnectionRefusedError" in text
    assert "hunter2" not in text


async def test_closing_the_repository_closes_the_listener_connection(
    migrated: asyncpg.Pool, database_url: str, keyring: KeyRing
) -> None:
    count = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name = 'tenantstore live cache'"
    )
    cache = live_cache(database_url)
    async with TenantRepository(migrated, keyring, live_cache=cache) as repo:
        await until_live(repo)
        assert await migrated.fetchval(count) == 1
    assert not cache.live
    await poll(lambda: migrated.fetchval(count), lambda n: n == 0)
    with pytest.raises(RuntimeError, match="closed"):
        await cache.start()
