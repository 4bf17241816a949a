"""TenantRepository against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import logging
import threading
from datetime import datetime

import asyncpg
import pytest
from cryptography.fernet import Fernet

from tenantstore import (
    AsyncCrypto,
    DatabaseError,
    DecryptionError,
    EncryptionError,
    InvalidTenantIdError,
    KeyRing,
    PlaintextSecretError,
    Tenant,
    TenantDecryptionError,
    TenantExistsError,
    TenantNotFoundError,
    TenantRepository,
    UnknownSecretError,
    create_pool,
    encryption,
)
from tenantstore.encryption import is_encrypted
from tenantstore.migrate import upgrade

API_KEY = "AIzaSyD-test-key-0123456789abcdefghijk"


@pytest.fixture
async def schema(pool: asyncpg.Pool, keyring: KeyRing) -> asyncpg.Pool:
    """The test database with tenantstore's schema applied."""
    await upgrade(pool, keyring)
    return pool


@pytest.fixture
async def repo(schema: asyncpg.Pool, keyring: KeyRing) -> TenantRepository:
    return TenantRepository(schema, keyring)


async def stored(pool: asyncpg.Pool, tenant_id: str) -> str | None:
    value: str | None = await pool.fetchval(
        "SELECT gemini_api_key FROM tenants WHERE tenant_id = $1", tenant_id
    )
    return value


async def test_create_then_get_round_trips_and_stores_a_token(
    repo: TenantRepository, schema: asyncpg.Pool, keyring: KeyRing
) -> None:
    created = await repo.create_tenant("acme", "Acme Inc", gemini_api_key=API_KEY)
    fetched = await repo.get_tenant("acme")
    assert fetched is not None
    assert fetched.gemini_api_key is not None
    assert fetched.gemini_api_key.get_secret_value() == API_KEY
    assert created == fetched
    assert isinstance(fetched.created_at, datetime) and fetched.created_at.tzinfo is not None
    raw = await stored(schema, "acme")
    assert raw is not None and raw != API_KEY and is_encrypted(raw)
    assert keyring.decrypt(raw) == API_KEY


async def test_get_unknown_tenant_is_none(repo: TenantRepository) -> None:
    assert await repo.get_tenant("nobody") is None


async def test_tenant_without_key(repo: TenantRepository) -> None:
    await repo.create_tenant("bare", "Bare")
    tenant = await repo.get_tenant("bare")
    assert tenant is not None and tenant.gemini_api_key is None


async def test_duplicate_create_raises_tenant_exists(repo: TenantRepository) -> None:
    await repo.create_tenant("acme", "Acme")
    with pytest.raises(TenantExistsError) as info:
        await repo.create_tenant("acme", "Other", gemini_api_key=API_KEY)
    assert info.value.tenant_id == "acme"
    # No driver error reachable from it (its DETAIL holds the row's values).
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__
    assert API_KEY not in str(info.value)


async def test_set_key_replaces_bumps_updated_at_and_clears(
    repo: TenantRepository, schema: asyncpg.Pool
) -> None:
    before = await repo.create_tenant("acme", "Acme", gemini_api_key="old-key")
    await repo.set_gemini_api_key("acme", API_KEY)
    after = await repo.get_tenant("acme")
    assert after is not None and after.gemini_api_key is not None
    assert after.gemini_api_key.get_secret_value() == API_KEY
    assert after.updated_at > before.updated_at
    assert is_encrypted(await stored(schema, "acme"))
    await repo.set_gemini_api_key("acme", None)
    cleared = await repo.get_tenant("acme")
    assert cleared is not None and cleared.gemini_api_key is None


async def test_set_key_of_unknown_tenant_raises(repo: TenantRepository) -> None:
    with pytest.raises(TenantNotFoundError) as info:
        await repo.set_gemini_api_key("ghost", API_KEY)
    assert info.value.tenant_id == "ghost" and isinstance(info.value, LookupError)


async def test_delete_reports_whether_it_existed(repo: TenantRepository) -> None:
    await repo.create_tenant("acme", "Acme")
    assert await repo.delete_tenant("acme") is True
    assert await repo.delete_tenant("acme") is False
    assert await repo.get_tenant("acme") is None


async def test_get_tenants_one_query_one_hop_unknown_absent(
    schema: asyncpg.Pool, keyring: KeyRing
) -> None:
    repo = TenantRepository(schema, keyring, cache_size=0)
    for i in range(5):
        await repo.create_tenant(f"t{i}", f"T{i}", gemini_api_key=f"key-{i}")
    batches = repo.crypto.coalescer.stats.batches
    found = await repo.get_tenants(["t0", "t3", "missing", "t4", "t3"])
    assert sorted(found) == ["t0", "t3", "t4"]
    assert {t: v.gemini_api_key.get_secret_value() for t, v in found.items()} == {  # type: ignore[union-attr]
        "t0": "key-0",
        "t3": "key-3",
        "t4": "key-4",
    }
    assert repo.crypto.coalescer.stats.batches == batches + 1
    assert await repo.get_tenants([]) == {}


async def test_iter_tenants_keyset_pages_in_order(schema: asyncpg.Pool, keyring: KeyRing) -> None:
    repo = TenantRepository(schema, keyring, cache_size=0)
    ids = [f"tenant-{i:03d}" for i in range(25)]
    for tenant_id in reversed(ids):
        await repo.create_tenant(tenant_id, tenant_id.upper(), gemini_api_key=f"k-{tenant_id}")
    batches = repo.crypto.coalescer.stats.batches
    seen = [t async for t in repo.iter_tenants(batch_size=10)]
    assert [t.tenant_id for t in seen] == ids
    assert all(t.gemini_api_key.get_secret_value() == f"k-{t.tenant_id}" for t in seen)  # type: ignore[union-attr]
    assert repo.crypto.coalescer.stats.batches == batches + 3  # one hop per page
    with pytest.raises(ValueError, match="batch_size"):
        [t async for t in repo.iter_tenants(batch_size=0)]


async def test_legacy_plaintext_is_read_unless_disallowed(
    repo: TenantRepository, schema: asyncpg.Pool, keyring: KeyRing
) -> None:
    await schema.execute(
        "INSERT INTO tenants (tenant_id, name, gemini_api_key) VALUES ('old', 'Old', $1)", API_KEY
    )
    tenant = await repo.get_tenant("old")
    assert tenant is not None and tenant.gemini_api_key is not None
    assert tenant.gemini_api_key.get_secret_value() == API_KEY
    strict = TenantRepository(schema, keyring, allow_plaintext=False)
    with pytest.raises(PlaintextSecretError) as info:
        await strict.get_tenant("old")
    assert info.value.tenant_id == "old" and API_KEY not in str(info.value)


async def test_undecryptable_value_raises_and_logs_tenant_id_only(
    repo: TenantRepository, schema: asyncpg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    foreign = Fernet(Fernet.generate_key()).encrypt(API_KEY.encode()).decode()
    await schema.execute(
        "INSERT INTO tenants (tenant_id, name, gemini_api_key) VALUES ('lost', 'Lost', $1)", foreign
    )
    with (
        caplog.at_level(logging.ERROR, logger="tenantstore"),
        pytest.raises(TenantDecryptionError) as info,
    ):
        await repo.get_tenant("lost")
    assert info.value.tenant_id == "lost"
    assert str(info.value) == "Failed to decrypt Gemini API key for tenant lost"
    assert [r.getMessage() for r in caplog.records] == [
        "Failed to decrypt Gemini API key for tenant lost"
    ]
    for text in (str(info.value), repr(info.value), caplog.text):
        assert API_KEY not in text and foreign not in text


async def test_previous_key_tokens_still_read(schema: asyncpg.Pool, key: str, old_key: str) -> None:
    old_token = Fernet(old_key.encode()).encrypt(API_KEY.encode()).decode()
    await schema.execute(
        "INSERT INTO tenants (tenant_id, name, gemini_api_key) VALUES ('x', 'X', $1)", old_token
    )
    repo = TenantRepository(schema, KeyRing(key, [old_key]))
    tenant = await repo.get_tenant("x")
    assert tenant is not None and tenant.gemini_api_key is not None
    assert tenant.gemini_api_key.get_secret_value() == API_KEY


HOSTILE_IDS = [
    "o'brien",
    'quote"d',
    "x'; DROP TABLE tenants; --",
    "semi;colon",
    "back\\slash",
    "ünïcødé-租户-🔑",
    "$1",
    "%s {0}",
    "a" * 255,
]


@pytest.mark.parametrize("tenant_id", HOSTILE_IDS)
async def test_hostile_ids_round_trip_exactly(
    repo: TenantRepository, schema: asyncpg.Pool, tenant_id: str
) -> None:
    await repo.create_tenant(tenant_id, "Hostile", gemini_api_key=API_KEY)
    tenant = await repo.get_tenant(tenant_id)
    assert tenant is not None and tenant.tenant_id == tenant_id
    assert list(await repo.get_tenants([tenant_id])) == [tenant_id]
    await repo.set_gemini_api_key(tenant_id, "new")
    assert await schema.fetchval("SELECT count(*) FROM tenants") == 1
    assert await repo.delete_tenant(tenant_id) is True


@pytest.mark.parametrize(
    "tenant_id", ["nul\x00byte", "", "lone\ud800surrogate", 42, None], ids=repr
)
async def test_unstorable_ids_raise_a_clean_error(
    repo: TenantRepository, tenant_id: object
) -> None:
    for call in (
        repo.get_tenant(tenant_id),  # type: ignore[arg-type]
        repo.create_tenant(tenant_id, "X"),  # type: ignore[arg-type]
        repo.set_gemini_api_key(tenant_id, "k"),  # type: ignore[arg-type]
        repo.delete_tenant(tenant_id),  # type: ignore[arg-type]
        repo.get_tenants([tenant_id]),  # type: ignore[list-item]
    ):
        with pytest.raises(InvalidTenantIdError):
            await call


async def test_very_long_ids_are_absent_on_read_and_refused_on_create(
    repo: TenantRepository,
) -> None:
    huge = "x" * 100_000
    assert await repo.get_tenant(huge) is None
    with pytest.raises(InvalidTenantIdError, match="at most 255"):
        await repo.create_tenant(huge, "Huge")


async def test_database_errors_are_translated_with_a_sanitised_driver_error(
    pool: asyncpg.Pool, keyring: KeyRing
) -> None:
    repo = TenantRepository(pool, keyring)  # no schema: the table does not exist
    with pytest.raises(DatabaseError) as info:
        await repo.get_tenant("acme")
    assert isinstance(info.value.driver_error, asyncpg.UndefinedTableError)


async def test_cache_serves_hot_tenants_without_crypto(repo: TenantRepository) -> None:
    await repo.create_tenant("hot", "Hot", gemini_api_key=API_KEY)
    await repo.get_tenant("hot")
    batches = repo.crypto.coalescer.stats.batches
    for _ in range(20):
        tenant = await repo.get_tenant("hot")
        assert tenant is not None and tenant.gemini_api_key is not None
        assert tenant.gemini_api_key.get_secret_value() == API_KEY
    assert repo.crypto.coalescer.stats.batches == batches


async def test_cache_never_serves_a_stale_secret(repo: TenantRepository) -> None:
    await repo.create_tenant("acme", "Acme", gemini_api_key="first")
    await repo.get_tenant("acme")
    await repo.set_gemini_api_key("acme", "second")
    tenant = await repo.get_tenant("acme")
    assert tenant is not None and tenant.gemini_api_key is not None
    assert tenant.gemini_api_key.get_secret_value() == "second"


async def test_cache_is_bounded_and_can_be_off(schema: asyncpg.Pool, keyring: KeyRing) -> None:
    small = TenantRepository(schema, keyring, cache_size=5)
    for i in range(20):
        await small.create_tenant(f"t{i:02d}", "T", gemini_api_key=f"k{i}")
    assert len(await small.get_tenants([f"t{i:02d}" for i in range(20)])) == 20
    assert "5/5" in repr(small)
    off = TenantRepository(schema, keyring, cache_size=0)
    await off.get_tenant("t01")
    batches = off.crypto.coalescer.stats.batches
    await off.get_tenant("t01")
    assert off.crypto.coalescer.stats.batches == batches + 1
    with pytest.raises(ValueError, match="cache_size"):
        TenantRepository(schema, keyring, cache_size=-1)


async def test_event_loop_thread_never_runs_fernet(
    schema: asyncpg.Pool, keyring: KeyRing, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: set[int] = set()

    def spy(module: object, name: str) -> None:
        original = getattr(module, name)

        def recording(*args: object, **kwargs: object) -> object:
            threads.add(threading.get_ident())
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, recording)

    # Every Fernet operation of the key ring goes through these two functions.
    spy(encryption, "encrypt_values")
    spy(encryption, "decrypt_tokens")
    repo = TenantRepository(schema, keyring, cache_size=0)
    await asyncio.gather(
        *(repo.create_tenant(f"t{i}", "T", gemini_api_key=f"k{i}") for i in range(20))
    )
    await asyncio.gather(*(repo.get_tenant(f"t{i}") for i in range(20)))
    await repo.get_tenants([f"t{i}" for i in range(20)])
    await repo.set_gemini_api_key("t1", "changed")
    assert threads, "the spy saw no Fernet call at all"
    assert threading.get_ident() not in threads


async def test_concurrent_gets_share_few_thread_hops(database_url: str, keyring: KeyRing) -> None:
    pool = await asyncpg.create_pool(database_url, min_size=10, max_size=10)
    assert pool is not None
    try:
        await upgrade(pool, keyring)
        tokens = keyring.encrypt_batch([f"key-{i}" for i in range(200)])
        await pool.execute(
            "INSERT INTO tenants (tenant_id, name, gemini_api_key) "
            "SELECT 't' || i, 'T', tok FROM unnest($1::text[]) WITH ORDINALITY AS u(tok, i)",
            tokens,
        )
        repo = TenantRepository(pool, keyring, cache_size=0)
        results = await asyncio.gather(*(repo.get_tenant(f"t{i}") for i in range(1, 201)))
        assert [r.gemini_api_key.get_secret_value() for r in results] == [  # type: ignore[union-attr]
            f"key-{i}" for i in range(200)
        ]
        stats = repo.crypto.coalescer.stats
        assert stats.requests == 200
        assert stats.batches <= 20, stats  # >= 10 decrypts per hop; a hop per call is 200
    finally:
        await pool.close()


async def test_repository_accepts_a_connection_for_callers_transactions(
    schema: asyncpg.Pool, keyring: KeyRing
) -> None:
    async with schema.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        repo = TenantRepository(conn, keyring)
        await repo.create_tenant("inside", "Inside", gemini_api_key=API_KEY)
        assert await repo.get_tenant("inside") is not None
        await tx.rollback()
    assert await TenantRepository(schema, keyring).get_tenant("inside") is None


async def test_repr_shows_no_secret(repo: TenantRepository, key: str) -> None:
    await repo.create_tenant("acme", "Acme", gemini_api_key=API_KEY)
    tenant = await repo.get_tenant("acme")
    for text in (repr(repo), repr(tenant), str(tenant), tenant.model_dump_json()):  # type: ignore[union-attr]
        assert API_KEY not in text and key not in text
    assert isinstance(tenant, Tenant)


async def test_create_pool_pgbouncer_mode_keeps_no_prepared_statements(
    database_url: str,
) -> None:
    for pgbouncer, expect_cached in ((False, True), (True, False)):
        pool = await create_pool(database_url, min_size=1, max_size=1, pgbouncer=pgbouncer)
        try:
            async with pool.acquire() as conn:
                await conn.fetchval("SELECT $1::int + 1", 1)
                cached = await conn.fetchval("SELECT count(*) FROM pg_prepared_statements")
            assert (cached > 0) is expect_cached
        finally:
            await pool.close()


async def test_create_pool_rejects_bad_sizes_and_unreachable_servers(tmp_path: object) -> None:
    with pytest.raises(ValueError, match="max_size"):
        await create_pool("postgresql://localhost/x", max_size=0)
    with pytest.raises(ValueError, match="min_size"):
        await create_pool("postgresql://localhost/x", min_size=5, max_size=2)
    with pytest.raises(DatabaseError) as info:
        await create_pool("postgresql://user:hunter2@/nodb?host=/nonexistent", min_size=1)
    assert "hunter2" not in str(info.value) and "***" in str(info.value)


async def test_calls_that_need_no_decryption_never_hold_up_the_others(
    schema: asyncpg.Pool, keyring: KeyRing
) -> None:
    """Unknown ids, cache hits and failures withdraw their announced decryption."""
    repo = TenantRepository(schema, keyring)
    await repo.create_tenant("known", "Known", gemini_api_key=API_KEY)
    await repo.get_tenant("known")  # cached from now on
    repo.crypto.coalescer._max_wait = 30.0  # a stuck batch would time the test out
    for _ in range(3):
        calls = [repo.get_tenant(f"ghost-{i}") for i in range(20)]
        calls += [repo.get_tenant("known") for _ in range(20)]
        results = await asyncio.wait_for(asyncio.gather(*calls), timeout=10)
        assert results[:20] == [None] * 20 and all(r is not None for r in results[20:])
    other = TenantRepository(schema, keyring, cache_size=0)
    other.crypto.coalescer._max_wait = 30.0
    results = await asyncio.wait_for(
        asyncio.gather(*(other.get_tenant(t) for t in ["known", "ghost", "known"])), timeout=10
    )
    assert [r is None for r in results] == [False, True, False]


async def test_create_pool_passes_asyncpg_options_through(database_url: str) -> None:
    """E.g. a lighter `reset`, which saves asyncpg's reset round trip per release."""
    resets: list[object] = []

    async def reset(conn: object) -> None:
        resets.append(conn)

    pool = await create_pool(database_url, min_size=1, max_size=1, reset=reset)
    try:
        await pool.fetchval("SELECT 1")
        assert len(resets) == 1
    finally:
        await pool.close()


async def test_secrets_are_always_stored_as_tokens_and_nul_is_refused(
    repo: TenantRepository, schema: asyncpg.Pool
) -> None:
    await repo.create_tenant("empty", "Empty", gemini_api_key="")
    assert is_encrypted(await stored(schema, "empty"))
    tenant = await repo.get_tenant("empty")
    assert tenant is not None and tenant.gemini_api_key is not None
    assert tenant.gemini_api_key.get_secret_value() == ""
    with pytest.raises(EncryptionError, match="NUL") as info:
        await repo.set_gemini_api_key("empty", "AIza\x00secret")
    assert "secret" not in str(info.value)
    assert is_encrypted(await stored(schema, "empty"))


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:hunter2@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("postgresql://u@h/db?password=hunter2", "postgresql://u@h/db?password=***"),
        ("postgresql://u:hun@ter2@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u:hun/ter2@h/db", "postgresql://u:***@h/db"),
        (
            "postgresql:///db?host=/run&sslpassword=hunter2",
            "postgresql:///db?host=/run&sslpassword=***",
        ),
        ("host=h password=hunter2", "***"),
    ],
)
def test_redact_url_hides_every_password(url: str, shown: str) -> None:
    from tenantstore.db import redact_url

    assert redact_url(url) == shown


# -- several secrets a tenant -----------------------------------------------------

FOUR = {
    "gemini_api_key": API_KEY,
    "oauth_access_token": "ya29.a0-access-token-0123456789",
    "oauth_refresh_token": "1//0g-refresh-token-0123456789",
    "webhook_signing_secret": "whsec_0123456789abcdefghij",
}


async def stored_row(pool: asyncpg.Pool, tenant_id: str) -> dict[str, str | None]:
    row = await pool.fetchrow(
        "SELECT gemini_api_key, oauth_access_token, oauth_refresh_token, webhook_signing_secret "
        "FROM tenants WHERE tenant_id = $1",
        tenant_id,
    )
    assert row is not None
    return dict(row)


def secrets_of(tenant: Tenant | None) -> dict[str, str | None]:
    assert tenant is not None
    return {
        column: None if (v := getattr(tenant, column)) is None else v.get_secret_value()
        for column in FOUR
    }


async def test_every_secret_is_stored_encrypted_and_read_back_in_one_hop(
    repo: TenantRepository, schema: asyncpg.Pool, keyring: KeyRing
) -> None:
    created = await repo.create_tenant("acme", "Acme", **FOUR)
    assert secrets_of(created) == FOUR
    raw = await stored_row(schema, "acme")
    assert all(is_encrypted(v) and keyring.decrypt(v) == FOUR[c] for c, v in raw.items())  # type: ignore[arg-type]
    fresh = TenantRepository(schema, keyring)  # cold cache
    batches = fresh.crypto.coalescer.stats.batches
    assert secrets_of(await fresh.get_tenant("acme")) == FOUR
    assert fresh.crypto.coalescer.stats.batches == batches + 1  # four secrets, one hop


async def test_get_tenants_and_iter_tenants_decrypt_a_page_of_secrets_in_one_hop(
    schema: asyncpg.Pool, keyring: KeyRing
) -> None:
    writer = TenantRepository(schema, keyring)
    for i in range(12):
        await writer.create_tenant(f"t{i:02d}", "T", **{c: f"{v}-{i}" for c, v in FOUR.items()})
    repo = TenantRepository(schema, keyring, cache_size=0)
    batches = repo.crypto.coalescer.stats.batches
    many = await repo.get_tenants([f"t{i:02d}" for i in range(12)])
    assert repo.crypto.coalescer.stats.batches == batches + 1
    assert secrets_of(many["t07"]) == {c: f"{v}-7" for c, v in FOUR.items()}
    pages = [t async for t in repo.iter_tenants(batch_size=5)]
    assert repo.crypto.coalescer.stats.batches == batches + 4  # 5 + 5 + 2
    assert secrets_of(pages[11])["webhook_signing_secret"] == f"{FOUR['webhook_signing_secret']}-11"


async def test_set_secrets_changes_only_the_named_ones_and_none_clears(
    repo: TenantRepository, schema: asyncpg.Pool
) -> None:
    await repo.create_tenant("acme", "Acme", **FOUR)
    before = await stored_row(schema, "acme")
    await repo.set_secrets("acme", oauth_access_token="ya29.new", webhook_signing_secret=None)
    after = await stored_row(schema, "acme")
    assert after["gemini_api_key"] == before["gemini_api_key"]
    assert after["oauth_refresh_token"] == before["oauth_refresh_token"]
    assert after["webhook_signing_secret"] is None
    assert secrets_of(await repo.get_tenant("acme")) == {
        **FOUR,
        "oauth_access_token": "ya29.new",
        "webhook_signing_secret": None,
    }
    await repo.set_gemini_api_key("acme", "AIza-replaced")  # the thin wrapper
    assert secrets_of(await repo.get_tenant("acme"))["gemini_api_key"] == "AIza-replaced"


async def test_unknown_secret_names_are_refused_before_any_io(keyring: KeyRing) -> None:
    """No database at all: the error comes first, naming the secret."""
    repo = TenantRepository(None, keyring)  # type: ignore[arg-type]
    with pytest.raises(UnknownSecretError, match="oauth_tokn") as info:
        await repo.set_secrets("acme", oauth_tokn="x")
    assert isinstance(info.value, ValueError)
    with pytest.raises(UnknownSecretError, match="created_at"):
        await repo.create_tenant("acme", "Acme", created_at="x")
    with pytest.raises(TypeError, match="at least one secret"):
        await repo.set_secrets("acme")


async def test_a_decryption_failure_names_the_tenant_and_the_column(
    repo: TenantRepository, schema: asyncpg.Pool
) -> None:
    foreign = Fernet(Fernet.generate_key()).encrypt(b"x").decode()
    await repo.create_tenant("acme", "Acme", **FOUR)
    await schema.execute("UPDATE tenants SET oauth_refresh_token = $1", foreign)
    fresh = TenantRepository(schema, repo.crypto.keyring)
    with pytest.raises(TenantDecryptionError) as info:
        await fresh.get_tenant("acme")
    assert str(info.value) == "Failed to decrypt oauth_refresh_token for tenant acme"
    assert (info.value.tenant_id, info.value.column) == ("acme", "oauth_refresh_token")
    await schema.execute(
        "UPDATE tenants SET oauth_refresh_token = NULL, gemini_api_key = $1", foreign
    )
    with pytest.raises(TenantDecryptionError) as info:
        await fresh.get_tenant("acme")
    assert str(info.value) == "Failed to decrypt Gemini API key for tenant acme"


async def test_a_token_with_surrounding_whitespace_is_read_as_that_token(
    repo: TenantRepository, schema: asyncpg.Pool, keyring: KeyRing
) -> None:
    """Hand-edited rows and `\\copy` artefacts: never served as the key itself."""
    await repo.create_tenant("acme", "Acme", gemini_api_key=API_KEY)
    token = await stored(schema, "acme")
    for padded in (f"{token}\n", f"{token}\r\n", f" {token}", f"\t{token} "):
        await schema.execute("UPDATE tenants SET gemini_api_key = $1", padded)
        tenant = await TenantRepository(schema, keyring).get_tenant("acme")
        assert secrets_of(tenant)["gemini_api_key"] == API_KEY


async def test_the_application_shares_the_repository_worker_and_cache(
    schema: asyncpg.Pool, keyring: KeyRing
) -> None:
    crypto = AsyncCrypto(keyring)
    repo = TenantRepository(schema, crypto)
    assert repo.crypto is crypto
    tokens = await crypto.encrypt_many(["client-secret", None, ""])
    assert tokens[1] is None and all(is_encrypted(t) for t in (tokens[0], tokens[2]))
    assert await crypto.decrypt_many([tokens[0], None, "", "legacy plaintext", tokens[2]]) == [
        "client-secret",
        None,
        "",
        "legacy plaintext",
        "",
    ]
    with pytest.raises(PlaintextSecretError, match="value 0 is stored as plaintext"):
        await crypto.decrypt_many(["legacy plaintext"], allow_plaintext=False)
    foreign = Fernet(Fernet.generate_key()).encrypt(b"x").decode()
    with pytest.raises(DecryptionError, match=r"wrong encryption key \(value 1\)"):
        await crypto.decrypt_many([tokens[0], foreign])
    with pytest.raises(TypeError):
        await crypto.encrypt_many([b"bytes"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="are for a KeyRing; an AsyncCrypto brings its own"):
        TenantRepository(schema, crypto, cache_size=5)


async def test_a_value_that_cannot_be_encrypted_fails_only_its_own_call(
    repo: TenantRepository,
) -> None:
    """Checked before it is queued, and the worker encrypts per value: a lone surrogate
    fails its own call with `EncryptionError`, never the requests batched with it."""
    await repo.create_tenant("acme", "Acme")
    await repo.create_tenant("beta", "Beta")
    bad = "AIza-lone-\ud800-surrogate"
    crypto = repo.crypto
    results = await asyncio.gather(
        repo.set_secrets("acme", gemini_api_key=bad),
        repo.set_secrets("beta", gemini_api_key="fine"),
        crypto.encrypt_many(["ok", bad]),
        crypto.encrypt_values([bad], ["gemini_api_key"]),  # unchecked: straight to the worker
        crypto.encrypt("alright"),
        return_exceptions=True,
    )
    for refused in (results[0], results[2], results[3]):
        assert isinstance(refused, EncryptionError), refused
        assert "surrogate" in str(refused) and "AIza" not in str(refused)
        assert refused.__context__ is None or refused.__suppress_context__
    assert results[1] is None
    assert await crypto.decrypt(results[4]) == "alright"  # type: ignore[arg-type]
    beta = await repo.get_tenant("beta")
    assert beta is not None and beta.gemini_api_key is not None
    assert beta.gemini_api_key.get_secret_value() == "fine"
