"""LiveCache when its listener fails: terminated, server restarted, a pooler, lost notifications.

While the listener is down (held down by revoking its role's LOGIN, so the
window is known), every call must read the database and return what was
last committed; once it is back, the cache serves from memory again with
nothing from before. The "pooler" is a small proxy in this process: it
passes the protocol through but can rewrite the backend process id (as
PgBouncer does) or swallow notifications (as a transaction-pooled
connection would).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import asyncpg
import pytest
from test_live_cache import (
    cache_of,
    gemini,
    hits,
    live_cache,
    poll,
    until_live,
    until_value,
    writer_process,
)

from tenantstore import DatabaseError, KeyRing, TenantRepository
from tenantstore.migrate import upgrade


def as_user(url: str, user: str) -> str:
    """`url` logging in as `user` (no password: the test servers trust local logins)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}@{host}"))


class Role:
    """A login role of its own for the listener, whose LOGIN a test can take away."""

    def __init__(self, admin: asyncpg.Pool) -> None:
        self.admin = admin
        self.name = f"ts_listener_{uuid.uuid4().hex[:10]}"

    async def create(self) -> None:
        await self.admin.execute(f'CREATE ROLE "{self.name}" LOGIN')

    async def login(self, allowed: bool) -> None:
        await self.admin.execute(f'ALTER ROLE "{self.name}" {"LOGIN" if allowed else "NOLOGIN"}')

    async def terminate(self) -> None:
        """End the role's sessions: the listener's connection."""
        ended = await self.admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = $1",
            self.name,
        )
        assert ended == 1

    async def drop(self) -> None:
        await self.admin.execute(f'DROP ROLE IF EXISTS "{self.name}"')


@pytest.fixture
async def role(pool: asyncpg.Pool) -> AsyncIterator[Role]:
    role = Role(pool)
    await role.create()
    try:
        yield role
    finally:
        await role.drop()


async def until_down(repo: TenantRepository) -> None:
    await poll(lambda: asyncio.sleep(0, cache_of(repo).live), lambda live: not live)


def bypassed(repo: TenantRepository) -> int:
    return repo.crypto.metrics.live_events["bypassed"]


def reconnects(repo: TenantRepository) -> int:
    return repo.crypto.metrics.live_events["reconnects"]


async def test_a_terminated_listener_sends_calls_to_the_database_until_it_is_back(
    pool: asyncpg.Pool, database_url: str, keyring: KeyRing, key: str, role: Role
) -> None:
    await upgrade(pool, keyring)
    cache = live_cache(as_user(database_url, role.name))
    async with (
        TenantRepository(pool, keyring, live_cache=cache) as repo,
        writer_process(database_url, key) as writer,
    ):
        await repo.create_tenant("acme", "Acme", gemini_api_key="v0")
        await until_live(repo)
        assert gemini(await repo.get_tenant("acme")) == "v0"
        assert gemini(await repo.get_tenant("acme")) == "v0"  # in memory now
        await role.login(False)
        await role.terminate()
        await until_down(repo)
        assert len(cache) == 0
        for version, op in enumerate(("sql_update", "repo_set"), 1):
            await writer.do(op, "acme", f"v{version}")
            before = bypassed(repo)
            assert gemini(await repo.get_tenant("acme")) == f"v{version}"  # at once
            assert gemini(await repo.get_tenant("acme")) == f"v{version}"
            assert bypassed(repo) == before + 2
        await role.login(True)
        await until_live(repo)
        assert reconnects(repo) == 1
        assert gemini(await repo.get_tenant("acme")) == "v2"
        before = hits(repo)
        assert gemini(await repo.get_tenant("acme")) == "v2"
        assert hits(repo) == before + 1  # serving from memory again
        await writer.do("sql_update", "acme", "v3")
        assert set(await until_value(repo, "acme", "v3")) <= {"v2", "v3"}


# -- a PostgreSQL of the test's own, to restart ----------------------------------------------


@pytest.fixture
def own_server() -> Iterator[Any]:
    """A second embedded PostgreSQL in a temporary directory; stopped and deleted after."""
    from pgserver import postgres_server
    from pgserver._commands import pg_ctl

    root = Path(tempfile.mkdtemp(prefix="tenantstore-pg-restart-"))
    server = postgres_server.get_server(root / "pgdata", cleanup_mode="delete")
    try:
        yield server
    finally:
        # Stopped here: after a restart, pgserver's handle knows the old postmaster only.
        try:
            pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=server.pgdata, user=server.system_user)
        except Exception:  # noqa: S110 - already stopped
            pass
        server.cleanup()
        shutil.rmtree(root, ignore_errors=True)


def restart(server: Any) -> None:
    """`pg_ctl restart`: every connection is cut, the server comes back on the same socket."""
    from pgserver._commands import pg_ctl

    pg_ctl(
        ["-w", "-m", "fast", "-l", str(server.log), "restart"],
        pgdata=server.pgdata,
        user=server.system_user,
        timeout=60,
    )


async def test_a_server_restart_sends_calls_to_the_database_then_serves_fresh_again(
    own_server: Any, keyring: KeyRing, key: str
) -> None:
    url = own_server.get_uri()
    pool = await asyncpg.create_pool(url, min_size=1, max_size=4)
    try:
        await upgrade(pool, keyring)
        role = Role(pool)
        await role.create()
        cache = live_cache(as_user(url, role.name))
        async with TenantRepository(pool, keyring, live_cache=cache) as repo:
            await repo.create_tenant("acme", "Acme", gemini_api_key="v0")
            await until_live(repo)
            assert gemini(await repo.get_tenant("acme")) == "v0"
            assert gemini(await repo.get_tenant("acme")) == "v0"
            await role.login(False)
            await asyncio.to_thread(restart, own_server)
            await until_down(repo)

            async def read() -> Any:
                try:
                    return gemini(await repo.get_tenant("acme"))
                except DatabaseError:  # a pool connection the restart cut, once
                    return DatabaseError

            assert (await poll(read, lambda v: v is not DatabaseError))[-1] == "v0"
            async with writer_process(url, key) as writer:
                await writer.do("sql_update", "acme", "v1")
                before = bypassed(repo)
                assert gemini(await repo.get_tenant("acme")) == "v1"
                assert bypassed(repo) == before + 1
                await role.login(True)
                await until_live(repo)
                assert reconnects(repo) == 1
                assert gemini(await repo.get_tenant("acme")) == "v1"
                before = hits(repo)
                assert gemini(await repo.get_tenant("acme")) == "v1"
                assert hits(repo) == before + 1
                await writer.do("repo_set", "acme", "v2")
                assert set(await until_value(repo, "acme", "v2")) <= {"v1", "v2"}
        await role.drop()
    finally:
        await pool.close()


# -- a pooler in between -------------------------------------------------------------------


class Proxy:
    """A TCP proxy to the test server that can act like a pooler.

    `fake_pid`: rewrite the process id of BackendKeyData, as PgBouncer does.
    `drop_notifications`: swallow NotificationResponse messages, as a
    connection whose LISTEN went to another server connection would.
    """

    def __init__(self, target: str) -> None:
        parts = urlsplit(target)
        host = parse_qs(parts.query).get("host", [parts.hostname or "localhost"])[0]
        self.port = parts.port or 5432
        self.host = host
        self.user = parts.username or "postgres"
        self.database = parts.path.lstrip("/")
        self.fake_pid = False
        self.drop_notifications = False
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Proxy:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"postgresql://{self.user}@127.0.0.1:{port}/{self.database}?sslmode=disable"

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if self.host.startswith("/"):
            server_r, server_w = await asyncio.open_unix_connection(
                f"{self.host}/.s.PGSQL.{self.port}"
            )
        else:
            server_r, server_w = await asyncio.open_connection(self.host, self.port)

        async def upstream() -> None:
            while data := await client_r.read(65536):
                server_w.write(data)
                await server_w.drain()
            server_w.close()

        async def downstream() -> None:
            buffer = b""
            while data := await server_r.read(65536):
                buffer += data
                out = bytearray()
                while len(buffer) >= 5 and len(buffer) >= 1 + int.from_bytes(buffer[1:5], "big"):
                    end = 1 + int.from_bytes(buffer[1:5], "big")
                    message, buffer = buffer[:end], buffer[end:]
                    if message[:1] == b"K" and self.fake_pid:
                        pid = int.from_bytes(message[5:9], "big") ^ 0x5A5A
                        message = message[:5] + pid.to_bytes(4, "big") + message[9:]
                    if message[:1] == b"A" and self.drop_notifications:
                        continue
                    out += message
                client_w.write(out)
                await client_w.drain()
            client_w.close()

        await asyncio.gather(upstream(), downstream(), return_exceptions=True)


async def test_a_listener_url_that_reaches_a_pooler_is_refused_with_a_clear_message(
    pool: asyncpg.Pool, database_url: str, keyring: KeyRing, caplog: pytest.LogCaptureFixture
) -> None:
    await upgrade(pool, keyring)
    caplog.set_level(logging.INFO, logger="tenantstore.live_cache")
    async with Proxy(database_url) as proxy:
        proxy.fake_pid = True
        async with TenantRepository(pool, keyring, live_cache=live_cache(proxy.url)) as repo:
            await repo.create_tenant("acme", "Acme")

            def refused() -> bool:
                return any("connection pooler" in r.getMessage() for r in caplog.records)

            await poll(lambda: asyncio.sleep(0, refused()), bool)
            assert not cache_of(repo).live
            assert await repo.get_tenant("acme") is not None
            assert bypassed(repo) == 1
    [record] = [r for r in caplog.records if "connection pooler" in r.getMessage()]
    assert record.levelno == logging.ERROR
    assert "LISTEN needs a direct connection" in record.getMessage()


async def test_notifications_that_stop_arriving_are_noticed_and_the_cache_bypassed(
    pool: asyncpg.Pool, database_url: str, keyring: KeyRing, caplog: pytest.LogCaptureFixture
) -> None:
    """The connection stays up but delivers nothing (a silent failure): the health check."""
    await upgrade(pool, keyring)
    caplog.set_level(logging.INFO, logger="tenantstore.live_cache")
    async with Proxy(database_url) as proxy:
        cache = live_cache(proxy.url, health_interval=0.2, probe_timeout=0.5)
        async with TenantRepository(pool, keyring, live_cache=cache) as repo:
            await repo.create_tenant("acme", "Acme", gemini_api_key="v0")
            await until_live(repo)
            assert gemini(await repo.get_tenant("acme")) == "v0"
            proxy.drop_notifications = True
            await until_down(repo)
            await pool.execute("UPDATE tenants SET gemini_api_key = $1", keyring.encrypt("v1"))
            assert gemini(await repo.get_tenant("acme")) == "v1"  # the database, not memory
            proxy.drop_notifications = False
            await until_live(repo)
            assert gemini(await repo.get_tenant("acme")) == "v1"
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "a test notification did not come back within 0.5s" in text
