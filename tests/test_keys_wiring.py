"""Writers and runs keep tenantstore_keys current; the repository checks keys; the
migrate CLI reads its keys from the HSM in envelope mode (real PostgreSQL, real SoftHSM2)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest
from _softhsm import KEK_A, SoftHsm

from tenantstore import KeyRing, TenantRepository
from tenantstore.keys import KeyCheckError, list_known_keys, new_data_key
from tenantstore.migrate import encrypt_secrets, upgrade, verify_secrets


@pytest.fixture
async def migrated(pool: asyncpg.Pool, keyring: KeyRing) -> asyncpg.Pool:
    await upgrade(pool, keyring)
    return pool


async def states(pool: asyncpg.Pool) -> dict[str, str]:
    return {known.key_id: known.state for known in await list_known_keys(pool)}


async def test_a_repository_write_records_its_primary_key_once_per_interval(
    migrated: asyncpg.Pool, keyring: KeyRing
) -> None:
    repo = TenantRepository(migrated, keyring)
    assert await states(migrated) == {}
    await repo.create_tenant("a", "A")  # no secret: no key used
    assert await states(migrated) == {}
    await repo.create_tenant("b", "B", gemini_api_key="AIza-b")
    assert await states(migrated) == {keyring.primary_key_id: "primary"}
    first = (await list_known_keys(migrated))[0].last_used_at
    await repo.set_secrets("b", webhook_signing_secret="whsec")
    assert (await list_known_keys(migrated))[0].last_used_at == first  # within the interval


async def test_a_write_inside_the_callers_transaction_survives_a_missing_keys_table(
    pool: asyncpg.Pool, keyring: KeyRing
) -> None:
    """Recording runs in a savepoint: its failure never aborts the application's transaction."""
    await upgrade(pool, keyring, target=4)  # no tenantstore_keys yet
    async with pool.acquire() as conn, conn.transaction():
        repo = TenantRepository(conn, keyring)
        await repo.create_tenant("a", "A", gemini_api_key="AIza-a")
        await repo.set_secrets("a", oauth_access_token="ya29")
    assert await pool.fetchval("SELECT count(*) FROM tenants") == 1


async def test_runs_record_the_keys_they_find_and_make(
    migrated: asyncpg.Pool, key: str, old_key: str
) -> None:
    old = KeyRing(old_key)
    await migrated.execute(
        "INSERT INTO tenants (tenant_id, name, gemini_api_key, oauth_access_token) "
        "VALUES ('a', 'A', $1, 'plain')",
        old.encrypt("k"),
    )
    ring = KeyRing(key, [old_key])
    await verify_secrets(migrated, ring)
    assert await states(migrated) == {old.primary_key_id: "decrypt-only"}
    await encrypt_secrets(migrated, ring)
    assert await states(migrated) == {
        old.primary_key_id: "decrypt-only",
        ring.primary_key_id: "primary",
    }


async def test_repository_check_keys_names_a_missing_key_and_sets_the_gauge(
    migrated: asyncpg.Pool, key: str, old_key: str
) -> None:
    writer = TenantRepository(migrated, KeyRing(old_key))
    await writer.create_tenant("a", "A", gemini_api_key="AIza-a")
    repo = TenantRepository(migrated, KeyRing(key))
    with pytest.raises(KeyCheckError) as info:
        await repo.check_keys()
    assert KeyRing(old_key).primary_key_id in str(info.value)
    assert key not in str(info.value) and old_key not in str(info.value)
    assert repo.crypto.metrics.last_check is False
    both = TenantRepository(migrated, KeyRing(key, [old_key]))
    report = await both.check_keys()
    assert report.ok and both.crypto.metrics.last_check is True


async def test_migrate_rotate_reads_its_keys_from_the_hsm_in_envelope_mode(
    migrated: asyncpg.Pool, database_url: str, softhsm: SoftHsm, key: str, tmp_path: Path
) -> None:
    """keys import, keys new-data-key, then `migrate rotate` with no key in the environment."""
    ring = KeyRing(key)
    await migrated.execute(
        "INSERT INTO tenants (tenant_id, name, gemini_api_key) VALUES ('t', 'T', $1)",
        ring.encrypt("AIza-before-the-hsm"),
    )
    env = {**os.environ, **softhsm.environ(KEK_A)}
    env.pop("ENCRYPTION_KEY", None)

    def cli(
        module: str, *args: str, extra: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", module, *args, "--database-url", database_url],
            env={**env, **(extra or {})}, cwd=tmp_path, capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    imported = await asyncio.to_thread(
        cli, "tenantstore.keys", "import", extra={"ENCRYPTION_KEY": key}
    )
    assert imported.returncode == 0, imported.stderr
    provider = softhsm.provider(KEK_A)
    try:
        data_key = await new_data_key(migrated, provider)
    finally:
        provider.close()
    rotated = await asyncio.to_thread(cli, "tenantstore.migrate", "rotate")
    assert rotated.returncode == 0, rotated.stderr
    assert (
        rotated.stdout.strip().splitlines()[-1]
        == "Rotation complete: 1 keys rotated, 0 already current"
    )
    verified = await asyncio.to_thread(cli, "tenantstore.migrate", "verify", "--json")
    assert verified.returncode == 0, verified.stderr
    assert f'"keys": {{"{data_key}": 1}}' in verified.stdout
    for result in (imported, rotated, verified):
        assert key not in result.stdout + result.stderr
        assert softhsm.pin not in result.stdout + result.stderr
