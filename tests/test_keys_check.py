"""`check_keys`: a missing key or a key mix-up is found before serving, never a secret shown."""

from __future__ import annotations

import asyncpg
import pytest
from cryptography.fernet import Fernet

from tenantstore import KeyRing, TableDefinitionError
from tenantstore.encryption import key_id
from tenantstore.keys import KeyCheckError, check_keys, record_key_use
from tenantstore.migrate import upgrade


@pytest.fixture
async def migrated(pool: asyncpg.Pool, keyring: KeyRing) -> asyncpg.Pool:
    await upgrade(pool, keyring)
    return pool


async def add_tenant(pool: asyncpg.Pool, tenant_id: str, **secrets: str) -> None:
    columns = ", ".join(["tenant_id", "name", *secrets])
    marks = ", ".join(f"${i}" for i in range(1, len(secrets) + 3))
    await pool.execute(
        f"INSERT INTO tenants ({columns}) VALUES ({marks})", tenant_id, "N", *secrets.values()
    )


async def test_a_fresh_database_and_a_new_primary_pass_and_say_the_primary_is_new(
    migrated: asyncpg.Pool, keyring: KeyRing
) -> None:
    report = await check_keys(migrated, keyring)
    assert report.ok and report.missing == [] and report.known == []
    assert report.primary_seen is False
    assert report.lines()[0] == f"primary key {keyring.primary_key_id} (not used yet)"
    assert report.lines()[-1] == "keys ok"


async def test_canaries_decrypt_a_sample_of_each_column_and_count_per_key(
    migrated: asyncpg.Pool, key: str, old_key: str
) -> None:
    ring = KeyRing(key, [old_key])
    old = KeyRing(old_key)
    for i in range(5):
        await add_tenant(
            migrated,
            f"t{i}",
            gemini_api_key=ring.encrypt(f"g{i}"),
            oauth_access_token=old.encrypt(f"o{i}"),
        )
    await add_tenant(migrated, "plain", webhook_signing_secret="whsec_plaintext")
    await record_key_use(migrated, key_id(key), primary=True)
    report = await check_keys(migrated, ring, sample=3)
    by_column = {c.column: c for c in report.canaries}
    assert by_column["gemini_api_key"].sampled == 3
    assert by_column["gemini_api_key"].keys == {key_id(key): 3}
    assert by_column["oauth_access_token"].keys == {key_id(old_key): 3}
    assert by_column["webhook_signing_secret"].plaintext == 1
    assert by_column["oauth_refresh_token"].sampled == 0
    assert report.primary_seen is True
    assert "whsec_plaintext" not in "\n".join(report.lines())


async def test_a_key_the_database_uses_and_the_process_lacks_fails_naming_its_id(
    migrated: asyncpg.Pool, key: str, old_key: str
) -> None:
    await record_key_use(migrated, key_id(old_key), primary=True)
    await record_key_use(migrated, key_id(key), primary=True)
    with pytest.raises(KeyCheckError) as info:
        await check_keys(migrated, KeyRing(key))
    assert info.value.report.missing == [key_id(old_key)]
    assert key_id(old_key) in str(info.value)
    assert old_key not in str(info.value) and key not in str(info.value)
    assert "keys NOT ok" in info.value.report.lines()
    await migrated.execute(
        "UPDATE tenantstore_keys SET state = 'retired' WHERE key_id = $1", key_id(old_key)
    )
    assert (await check_keys(migrated, KeyRing(key))).ok  # a retired key is not needed


async def test_a_token_no_key_decrypts_fails_the_canary_naming_the_column(
    migrated: asyncpg.Pool, key: str
) -> None:
    stranger = KeyRing(Fernet.generate_key().decode())
    await add_tenant(migrated, "t", oauth_refresh_token=stranger.encrypt("refresh"))
    with pytest.raises(KeyCheckError, match="1 of 1 sampled oauth_refresh_token values"):
        await check_keys(migrated, KeyRing(key))
    assert (await check_keys(migrated, KeyRing(key), sample=0)).ok  # no canary asked


async def test_a_database_without_the_keys_table_fails_the_check(
    pool: asyncpg.Pool, keyring: KeyRing
) -> None:
    await upgrade(pool, keyring, target=4)
    with pytest.raises(KeyCheckError, match="tenantstore_keys does not exist") as info:
        await check_keys(pool, keyring)
    assert info.value.report.known is None


async def test_a_database_without_tenants_is_a_table_definition_error(
    pool: asyncpg.Pool, keyring: KeyRing
) -> None:
    with pytest.raises(TableDefinitionError, match="tenants"):
        await check_keys(pool, keyring)


async def test_the_primary_the_database_records_is_reported_when_it_differs(
    migrated: asyncpg.Pool, key: str, old_key: str
) -> None:
    await record_key_use(migrated, key_id(old_key), primary=True)
    report = await check_keys(migrated, KeyRing(key, [old_key]))
    assert report.database_primary == key_id(old_key)
    assert f"  the database records {key_id(old_key)} as primary" in report.lines()


async def test_a_negative_sample_is_refused(migrated: asyncpg.Pool, keyring: KeyRing) -> None:
    with pytest.raises(ValueError, match="sample"):
        await check_keys(migrated, keyring, sample=-1)
