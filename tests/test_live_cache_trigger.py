"""Migration 0007: what the tenants triggers notify, seen by a plain LISTEN connection."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import asyncpg
import pytest

from tenantstore import KeyRing
from tenantstore.live_cache import CHANNEL
from tenantstore.migrate import downgrade, upgrade

LONG_IDS = [f"{i:03d}" + "é" * 252 for i in range(40)]  # 255 characters, 507 bytes each


class Notifications:
    """Every payload on `CHANNEL`, in order, from a connection of its own.

    A marker notification sent after a statement comes back after that
    statement's own (delivery is in commit order), so `settle()` waits
    for everything already committed, with no sleep.
    """

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.payloads: list[str] = []
        self._marker: asyncio.Future[None] | None = None

    async def start(self) -> None:
        await self.conn.add_listener(CHANNEL, self._on)
        await self.conn.add_listener("test_marker", self._on_marker)

    def _on(self, conn: object, pid: int, channel: str, payload: object) -> None:
        assert isinstance(payload, str)
        self.payloads.append(payload)

    def _on_marker(self, conn: object, pid: int, channel: str, payload: object) -> None:
        if self._marker is not None and not self._marker.done():
            self._marker.set_result(None)

    async def settle(self) -> list[str]:
        """Every payload committed so far; the list starts afresh afterwards."""
        self._marker = asyncio.get_running_loop().create_future()
        await self.conn.execute("NOTIFY test_marker")
        await asyncio.wait_for(self._marker, 10)
        payloads, self.payloads = self.payloads, []
        return payloads


@pytest.fixture
async def notes(
    pool: asyncpg.Pool, database_url: str, keyring: KeyRing
) -> AsyncIterator[Notifications]:
    await upgrade(pool, keyring)
    conn = await asyncpg.connect(database_url)
    listener = Notifications(conn)
    await listener.start()
    try:
        yield listener
    finally:
        await conn.close()


def ids_in(payloads: list[str]) -> list[str]:
    """The tenant ids named by id payloads, in order (a flush payload names none)."""
    return [tenant_id for p in payloads if p != "*" for tenant_id in json.loads(p)]


async def test_insert_update_delete_notify_the_ids_they_touched(
    pool: asyncpg.Pool, notes: Notifications
) -> None:
    await pool.execute("INSERT INTO tenants (tenant_id, name) VALUES ('a', 'A'), ('b', 'B')")
    assert await notes.settle() == ['["a", "b"]']
    await pool.execute("UPDATE tenants SET gemini_api_key = 'token' WHERE tenant_id = 'a'")
    assert await notes.settle() == ['["a"]']
    await pool.execute("UPDATE tenants SET tenant_id = 'c' WHERE tenant_id = 'b'")
    assert await notes.settle() == ['["b", "c"]']  # the id before and after
    await pool.execute("DELETE FROM tenants WHERE tenant_id = 'a'")
    assert await notes.settle() == ['["a"]']


async def test_payload_never_holds_a_secret_or_a_token(
    pool: asyncpg.Pool, notes: Notifications, keyring: KeyRing
) -> None:
    token = keyring.encrypt("AIza-secret")
    await pool.execute(
        "INSERT INTO tenants (tenant_id, name, gemini_api_key) VALUES ('t', 'N', $1)", token
    )
    await pool.execute("UPDATE tenants SET oauth_access_token = $1", "ya29-plaintext")
    payloads = await notes.settle()
    assert payloads == ['["t"]', '["t"]']
    assert not any(text in p for p in payloads for text in (token, "AIza", "ya29", "N"))


async def test_statements_that_change_nothing_or_roll_back_notify_nothing(
    pool: asyncpg.Pool, notes: Notifications
) -> None:
    await pool.execute("INSERT INTO tenants (tenant_id, name) VALUES ('a', 'A')")
    await notes.settle()
    await pool.execute("UPDATE tenants SET name = 'x' WHERE tenant_id = 'missing'")
    await pool.execute("DELETE FROM tenants WHERE false")
    async with pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        await conn.execute("UPDATE tenants SET name = 'rolled back'")
        await tx.rollback()
    assert await notes.settle() == []


async def test_a_statement_over_many_rows_sends_one_notification_per_chunk_of_ids(
    pool: asyncpg.Pool, notes: Notifications
) -> None:
    """40 ids of 255 characters (20 kB): a few notifications, each under 8000 bytes."""
    await pool.execute(
        "INSERT INTO tenants (tenant_id, name) SELECT unnest($1::text[]), 'n'", LONG_IDS
    )
    payloads = await notes.settle()
    assert 1 < len(payloads) <= 8
    assert all(len(p.encode()) < 8000 for p in payloads)
    assert sorted(ids_in(payloads)) == sorted(LONG_IDS)
    await pool.execute("UPDATE tenants SET name = 'm'")  # one UPDATE: one batch again
    again = await notes.settle()
    assert len(again) == len(payloads)
    assert sorted(ids_in(again)) == sorted(LONG_IDS)


async def test_ids_that_do_not_fit_and_truncate_send_one_flush(
    pool: asyncpg.Pool, notes: Notifications
) -> None:
    many = [f"{i:04d}" + "x" * 251 for i in range(300)]  # 77 kB of ids: past 8 notifications
    await pool.execute("INSERT INTO tenants (tenant_id, name) SELECT unnest($1::text[]), 'n'", many)
    assert await notes.settle() == ["*"]
    await pool.execute("TRUNCATE tenants")
    assert await notes.settle() == ["*"]


async def test_one_id_too_long_for_a_payload_sends_a_flush(
    pool: asyncpg.Pool, notes: Notifications
) -> None:
    """1400 control characters: 1.4 kB stored, 8.4 kB once JSON-escaped."""
    huge = "\x01" * 1400
    await pool.execute("INSERT INTO tenants (tenant_id, name) VALUES ($1, 'n')", huge)
    assert await notes.settle() == ["*"]
    await pool.execute(
        "INSERT INTO tenants (tenant_id, name) VALUES ($1, 'n'), ('b', 'n')", huge + "2"
    )
    assert await notes.settle() == ["*"]


async def test_ids_are_json_escaped_whatever_they_hold(
    pool: asyncpg.Pool, notes: Notifications
) -> None:
    odd = ['quo"te', "back\\slash", "new\nline", "[*]", "*", "日本"]
    await pool.execute("INSERT INTO tenants (tenant_id, name) SELECT unnest($1::text[]), 'n'", odd)
    assert sorted(ids_in(await notes.settle())) == sorted(odd)


async def test_the_trigger_works_under_any_search_path(
    pool: asyncpg.Pool, notes: Notifications
) -> None:
    async with pool.acquire() as conn:
        await conn.execute("CREATE SCHEMA elsewhere")
        await conn.execute("SET search_path = elsewhere")
        await conn.execute("INSERT INTO public.tenants (tenant_id, name) VALUES ('s', 'S')")
        await conn.execute("RESET search_path")
    assert await notes.settle() == ['["s"]']


async def test_down_step_removes_the_triggers_and_function(
    pool: asyncpg.Pool, notes: Notifications, keyring: KeyRing
) -> None:
    await downgrade(pool, keyring)
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM pg_trigger "
            "WHERE tgrelid = 'tenants'::regclass AND tgname LIKE 'tenantstore%'"
        )
        == 0
    )
    assert await pool.fetchval("SELECT to_regproc('tenantstore_notify_tenant_changes')") is None
    await pool.execute("INSERT INTO tenants (tenant_id, name) VALUES ('quiet', 'Q')")
    assert await notes.settle() == []
    await upgrade(pool, keyring)
    await pool.execute("DELETE FROM tenants")
    assert await notes.settle() == ['["quiet"]']
