"""Audit events on the default logging sink: every access to a secret, with its actor."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest
from cryptography.fernet import Fernet

from tenantstore import AsyncCrypto, KeyRing, TenantDecryptionError, TenantRepository
from tenantstore.audit import AuditLog, LoggingSink, audit_actor, current_actor
from tenantstore.migrate import encrypt_secrets, upgrade

SECRET = "AIzaSy-audit-secret-0123456789abcdef"


class Events(logging.Handler):
    """Collects the `audit` dicts of the records on `tenantstore.audit`."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.events: list[dict[str, Any]] = []
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.events.append(record.audit)  # type: ignore[attr-defined]
        self.lines.append(record.getMessage())


@pytest.fixture
def events() -> Iterator[Events]:
    handler = Events()
    logger = logging.getLogger("tenantstore.audit")
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


@pytest.fixture
async def schema(pool: asyncpg.Pool, keyring: KeyRing) -> asyncpg.Pool:
    await upgrade(pool, keyring)
    return pool


def brief(events: Events) -> list[tuple[Any, ...]]:
    return [
        (e["operation"], e["column"], e["key"], e["key_id"], e["outcome"], e["actor"])
        for e in events.events
    ]


async def test_reads_writes_and_clears_are_audited_with_the_actor_never_the_secret(
    schema: asyncpg.Pool, keyring: KeyRing, events: Events
) -> None:
    repo = TenantRepository(schema, keyring)
    kid = keyring.primary_key_id
    with audit_actor("user:42"):
        assert current_actor() == "user:42"
        await repo.create_tenant("acme", "Acme", gemini_api_key=SECRET)
        await repo.get_tenant("acme")
        await repo.get_tenant("acme")  # from the cache: audited all the same
        await repo.set_secrets("acme", gemini_api_key=None, oauth_access_token="ya29-token")
    await repo.get_tenants(["acme"])  # no actor outside the block
    assert current_actor() is None
    assert brief(events) == [
        ("write", "gemini_api_key", "acme", kid, "ok", "user:42"),
        ("read", "gemini_api_key", "acme", kid, "ok", "user:42"),
        ("read", "gemini_api_key", "acme", kid, "ok", "user:42"),
        ("clear", "gemini_api_key", "acme", None, "ok", "user:42"),
        ("write", "oauth_access_token", "acme", kid, "ok", "user:42"),
        ("read", "oauth_access_token", "acme", kid, "ok", None),
    ]
    token = await schema.fetchval("SELECT oauth_access_token FROM tenants")
    text = repr(events.events) + "\n".join(events.lines)
    assert SECRET not in text and "ya29-token" not in text and token not in text


async def test_a_failed_read_is_audited_as_failed(
    schema: asyncpg.Pool, keyring: KeyRing, events: Events
) -> None:
    foreign = Fernet(Fernet.generate_key()).encrypt(b"x").decode()
    await schema.execute(
        "INSERT INTO tenants (tenant_id, name, oauth_refresh_token) VALUES ('a', 'A', $1)", foreign
    )
    with pytest.raises(TenantDecryptionError):
        await TenantRepository(schema, keyring).get_tenant("a")
    assert brief(events) == [("read", "oauth_refresh_token", "a", None, "failed", None)]


async def test_the_applications_own_values_are_audited_by_table_column_and_key(
    keyring: KeyRing, events: Events
) -> None:
    crypto = AsyncCrypto(keyring)
    with audit_actor("job:sync"):
        [token] = await crypto.encrypt_many(
            ["client-secret"], table="integrations", column="client_secret", keys=[7]
        )
        await crypto.decrypt_many([token], table="integrations", column="client_secret", keys=[7])
    assert [
        (e["operation"], e["table"], e["column"], e["key"], e["actor"]) for e in events.events
    ] == [
        ("encrypt", "integrations", "client_secret", "7", "job:sync"),
        ("decrypt", "integrations", "client_secret", "7", "job:sync"),
    ]


async def test_a_run_is_audited_once_per_column(
    schema: asyncpg.Pool, keyring: KeyRing, events: Events
) -> None:
    await schema.execute(
        "INSERT INTO tenants (tenant_id, name, gemini_api_key) "
        "VALUES ('a', 'A', 'k'), ('b', 'B', 'l')"
    )
    with audit_actor("ops:alice"):
        await encrypt_secrets(schema, keyring, columns=["gemini_api_key", "oauth_access_token"])
    assert [
        (e["operation"], e["column"], e["key"], e["outcome"], e["count"], e["actor"])
        for e in events.events
    ] == [
        ("encrypt", "gemini_api_key", None, "completed", 2, "ops:alice"),
        ("encrypt", "oauth_access_token", None, "completed", 0, "ops:alice"),
    ]


class Silent:
    """A sink nobody listens to: `emit` must never be called."""

    enabled = False
    emitted = 0

    async def emit(self, events: object) -> None:
        self.emitted += 1

    async def aclose(self) -> None:
        pass


async def test_no_event_is_built_or_emitted_while_no_sink_listens(
    schema: asyncpg.Pool, keyring: KeyRing
) -> None:
    """The default sink costs a level check; a disabled one is never handed events."""
    sink = Silent()
    assert not LoggingSink(logging.getLogger("tenantstore.audit.unheard")).enabled
    repo = TenantRepository(schema, keyring, audit=AuditLog(sink))
    await repo.create_tenant("acme", "Acme", gemini_api_key=SECRET)
    assert (await repo.get_tenant("acme")) is not None
    await repo.set_secrets("acme", gemini_api_key=None)
    assert sink.emitted == 0


def test_a_log_line_cannot_be_forged_by_a_key() -> None:
    import asyncio

    from tenantstore.audit import AuditEvent

    handler = Events()
    logger = logging.getLogger("tenantstore.audit.forge")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    event = AuditEvent("read", "tenants", "gemini_api_key", "x\nINFO audit forged", None, "ok")
    asyncio.run(LoggingSink(logger).emit([event]))
    assert "\n" not in handler.lines[0] and "x\\nINFO audit forged" in handler.lines[0]
    with pytest.raises(ValueError, match="non-empty"), audit_actor(""):
        pass
