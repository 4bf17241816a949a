"""The schema runner: up, down, status, checksums, locking, adoption, exit codes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from tenantstore import (
    DestructiveMigrationError,
    EncryptionKeyMissingError,
    KeyRing,
    MigrationChecksumError,
    MigrationError,
)
from tenantstore.migrate import downgrade, load_migrations, migration_status, upgrade
from tenantstore.migrate.__main__ import main
from tenantstore.migrate.files import parse_migrations


async def tables(pool: asyncpg.Pool) -> set[str]:
    rows = await pool.fetch("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
    return {r[0] for r in rows}


ALL = [m.label for m in load_migrations()]
SHIPPED = [m.version for m in load_migrations()]
LATEST = SHIPPED[-1]
# A version no shipped migration takes, for extra ones.
EXTRA = "0099"


async def versions(pool: asyncpg.Pool) -> list[int]:
    return [r[0] for r in await pool.fetch("SELECT version FROM tenantstore_migrations ORDER BY 1")]


async def test_up_applies_everything_and_status_reports_it(
    pool: asyncpg.Pool, keyring: KeyRing
) -> None:
    report = await upgrade(pool, keyring)
    assert report.applied == ALL
    assert report.version == LATEST
    assert {"tenants", "tenantstore_migrations"} <= await tables(pool)
    status = await migration_status(pool)
    assert status.version == LATEST and status.pending == [] and status.changed == []
    again = await upgrade(pool, keyring)
    assert again.applied == [] and again.summary() == (
        f"Nothing to do: schema is at version {LATEST}"
    )


async def test_up_to_a_target_and_down_steps(pool: asyncpg.Pool, keyring: KeyRing) -> None:
    await upgrade(pool, keyring, target=1)
    assert await versions(pool) == [1]
    assert (await migration_status(pool)).pending == ALL[1:]
    await upgrade(pool, keyring)
    report = await downgrade(pool, keyring, steps=len(ALL))
    assert report.applied == ALL[::-1]
    assert await versions(pool) == []
    assert "tenants" not in await tables(pool)


async def test_down_refuses_to_drop_a_table_with_rows_unless_confirmed(
    pool: asyncpg.Pool, keyring: KeyRing
) -> None:
    await upgrade(pool, keyring, target=1)
    await pool.execute("INSERT INTO tenants (tenant_id, name) VALUES ('a', 'A')")
    with pytest.raises(DestructiveMigrationError, match="holds 1 rows"):
        await downgrade(pool, keyring)
    assert await versions(pool) == [1] and "tenants" in await tables(pool)
    await downgrade(pool, keyring, confirm=True)
    assert "tenants" not in await tables(pool)


async def test_changed_applied_file_is_refused_naming_the_file(
    pool: asyncpg.Pool, keyring: KeyRing
) -> None:
    await upgrade(pool, keyring, target=1)
    await pool.execute("UPDATE tenantstore_migrations SET checksum = 'tampered' WHERE version = 1")
    with pytest.raises(MigrationChecksumError, match=r"0001_create_tenants\.up\.sql"):
        await upgrade(pool, keyring)
    assert (await migration_status(pool)).changed == ["0001_create_tenants.up.sql"]
    assert await versions(pool) == [1]


async def test_unknown_applied_version_is_refused(pool: asyncpg.Pool, keyring: KeyRing) -> None:
    await upgrade(pool, keyring)
    await pool.execute(
        "INSERT INTO tenantstore_migrations (version, name, checksum) VALUES (99, 'future', 'x')"
    )
    with pytest.raises(MigrationError, match="0099_future"):
        await upgrade(pool, keyring)


async def test_missing_key_fails_closed_before_applying_anything(pool: asyncpg.Pool) -> None:
    with pytest.raises(EncryptionKeyMissingError):
        await upgrade(pool, None)
    assert "tenants" not in await tables(pool)
    await upgrade(pool, None, target=1)  # the schema alone needs no key
    assert await versions(pool) == [1]


def _extra(files: dict[str, str]) -> list:  # type: ignore[type-arg]
    shipped = {m.up.filename: m.up.sql for m in load_migrations()}
    shipped.update({m.down.filename: m.down.sql for m in load_migrations() if m.down})
    shipped.update(files)
    return parse_migrations(shipped)


async def test_failed_migration_leaves_nothing_half_applied(
    pool: asyncpg.Pool, keyring: KeyRing
) -> None:
    migrations = _extra(
        {
            f"{EXTRA}_half.up.sql": "CREATE TABLE half_done (x int);\nSELECT 1 / 0;\n",
            f"{EXTRA}_half.down.sql": "DROP TABLE half_done;\n",
        }
    )
    with pytest.raises(MigrationError, match=rf"{EXTRA}_half\.up\.sql failed") as info:
        await upgrade(pool, keyring, migrations=migrations)
    assert "DivisionByZeroError (SQLSTATE 22012)" in str(info.value)
    assert "half_done" not in await tables(pool)
    assert await versions(pool) == SHIPPED


async def test_no_transaction_migration_can_create_index_concurrently(
    pool: asyncpg.Pool, keyring: KeyRing
) -> None:
    migrations = _extra(
        {
            f"{EXTRA}_index.up.sql": "-- tenantstore: no-transaction\n"
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS tenants_name ON tenants (name);\n",
            f"{EXTRA}_index.down.sql": "-- tenantstore: no-transaction\n"
            "DROP INDEX CONCURRENTLY IF EXISTS tenants_name;\n",
        }
    )
    await upgrade(pool, keyring, migrations=migrations)
    assert await pool.fetchval("SELECT to_regclass('tenants_name') IS NOT NULL")
    await downgrade(pool, keyring, migrations=migrations)
    assert await pool.fetchval("SELECT to_regclass('tenants_name') IS NULL")


async def test_concurrent_upgrades_in_process_apply_once(
    database_url: str, keyring: KeyRing
) -> None:
    pools = [await asyncpg.create_pool(database_url, min_size=1, max_size=3) for _ in range(3)]
    try:
        reports = await asyncio.gather(*(upgrade(p, keyring) for p in pools))  # type: ignore[arg-type]
        applied = sorted(label for r in reports for label in r.applied)
        assert applied == ALL
        assert await versions(pools[0]) == SHIPPED  # type: ignore[arg-type]
    finally:
        for p in pools:
            await p.close()  # type: ignore[union-attr]


async def test_adopting_a_table_without_a_key_adds_one_or_refuses_duplicates(
    pool: asyncpg.Pool, keyring: KeyRing
) -> None:
    await pool.execute(
        "CREATE TABLE tenants (tenant_id text, name text NOT NULL, gemini_api_key text)"
    )
    await pool.executemany(
        "INSERT INTO tenants VALUES ($1, 'N', $2)", [("a", "k1"), ("b", "k2"), ("b", "k3")]
    )
    with pytest.raises(MigrationError, match=r"0001_create_tenants\.up\.sql failed"):
        await upgrade(pool, keyring)
    assert await versions(pool) == []
    assert await pool.fetchval("SELECT count(*) FROM tenants WHERE gemini_api_key LIKE 'k%'") == 3
    await pool.execute("DELETE FROM tenants WHERE gemini_api_key = 'k3'")
    report = await upgrade(pool, keyring)
    assert report.summary() == "Migration complete: 2 keys encrypted, 0 already encrypted"
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM pg_index WHERE indrelid = 'tenants'::regclass AND indisprimary"
        )
        == 1
    )


async def test_lock_held_on_a_dedicated_connection_is_released_after_the_run(
    pool: asyncpg.Pool, database_url: str, keyring: KeyRing
) -> None:
    lock = await asyncpg.connect(database_url)
    try:
        report = await upgrade(pool, keyring, connection=lock)
        assert report.version == LATEST
        held = await pool.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = $1",
            lock.get_server_pid(),
        )
        assert held == 0
    finally:
        await lock.close()


async def test_adopts_an_existing_plaintext_table_without_changing_rows(
    pool: asyncpg.Pool, keyring: KeyRing
) -> None:
    await pool.execute(
        "CREATE TABLE tenants (tenant_id text PRIMARY KEY, name text NOT NULL, gemini_api_key text)"
    )
    original = [("acme", "Acme", "AIzaSyA-acme"), ("beta", "Beta", None), ("gamma", "G", "")]
    await pool.executemany("INSERT INTO tenants VALUES ($1, $2, $3)", original)
    await upgrade(pool, keyring, target=1)
    rows = await pool.fetch("SELECT tenant_id, name, gemini_api_key FROM tenants ORDER BY 1")
    assert [tuple(r) for r in rows] == original
    assert await pool.fetchval("SELECT count(created_at) + count(updated_at) FROM tenants") == 6
    report = await upgrade(pool, keyring)
    assert report.summary() == "Migration complete: 1 keys encrypted, 0 already encrypted"
    token = await pool.fetchval("SELECT gemini_api_key FROM tenants WHERE tenant_id = 'acme'")
    assert keyring.decrypt(token) == "AIzaSyA-acme"
    rows = await pool.fetch("SELECT tenant_id, name, gemini_api_key FROM tenants ORDER BY 1")
    assert [tuple(r)[:2] for r in rows] == [o[:2] for o in original]
    assert [r[2] for r in rows[1:]] == [None, ""]


# -- the command line ----------------------------------------------------------


def run_cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tenantstore.migrate", *args],
        env={**os.environ, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_cli_up_status_down_exit_codes(
    database_url: str, key: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = {"ENCRYPTION_KEY": key}
    up = ["up", "--to", "4", "--database-url", database_url]  # 0004's down step is a data step
    result = await asyncio.to_thread(run_cli, up, env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == (
        "Migration complete: 0 keys encrypted, 0 already encrypted"
    )
    status = await asyncio.to_thread(
        run_cli, ["status", "--database-url", database_url], env, tmp_path
    )
    assert status.returncode == 0, status.stderr
    assert "Schema version: 4" in status.stdout
    assert "0 undecryptable" in status.stdout
    down = await asyncio.to_thread(  # 0004, whose data step decrypts
        run_cli, ["down", "--database-url", database_url], env, tmp_path
    )
    assert down.returncode == 0, down.stderr
    assert "PLAINTEXT" in down.stderr
    assert down.stdout.strip().splitlines()[-1] == (
        "Migration complete: 0 keys decrypted, 0 already plaintext"
    )
    for output in (result, status, down):
        assert key not in output.stdout + output.stderr


async def test_cli_missing_key_exits_2_and_changes_nothing(
    database_url: str, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    result = await asyncio.to_thread(run_cli, ["up", "--database-url", database_url], {}, tmp_path)
    assert result.returncode == 2
    assert "ENCRYPTION_KEY environment variable not set" in result.stderr
    assert await tables(pool) <= {"tenantstore_migrations", "tenantstore_secret_runs"}
    for command in ("encrypt", "rotate", "verify"):
        assert main([command, "--database-url", database_url]) == 2


async def test_cli_usage_errors_exit_2(
    database_url: str, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ENCRYPTION_KEY", key)
    with pytest.raises(SystemExit) as info:
        main(["sideways"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["encrypt", "--shard", "3/2"])
    assert info.value.code == 2
    assert main(["encrypt", "--batch-size", "0", "--database-url", database_url]) == 2
    monkeypatch.setenv("ENCRYPTION_KEY", "not-a-key")
    assert main(["up", "--database-url", database_url]) == 2


async def test_cli_down_refuses_rows_without_yes(
    database_url: str, pool: asyncpg.Pool, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ENCRYPTION_KEY", key)
    assert await asyncio.to_thread(main, ["up", "--to", "1", "--database-url", database_url]) == 0
    await pool.execute("INSERT INTO tenants (tenant_id, name) VALUES ('a', 'A')")
    assert await asyncio.to_thread(main, ["down", "--database-url", database_url]) == 2
    assert "tenants" in await tables(pool)
    assert await asyncio.to_thread(main, ["down", "--yes", "--database-url", database_url]) == 0
    assert "tenants" not in await tables(pool)


@pytest.mark.slow
async def test_two_concurrent_cli_runners_apply_each_migration_once(
    database_url: str, pool: asyncpg.Pool, key: str, tmp_path: Path
) -> None:
    env = {"ENCRYPTION_KEY": key}
    args = ["up", "--database-url", database_url]
    results = await asyncio.gather(
        asyncio.to_thread(run_cli, args, env, tmp_path),
        asyncio.to_thread(run_cli, args, env, tmp_path),
    )
    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
    applied = [line for r in results for line in r.stderr.splitlines() if "Applying" in line]
    assert sorted(applied) == [f"INFO Applying {label}" for label in ALL]
    assert await versions(pool) == SHIPPED


@pytest.mark.slow
def test_embedded_default_starts_without_database_url(tmp_path: Path, key: str) -> None:
    """No DATABASE_URL: a PostgreSQL of our own under ./.tenantstore, its location logged."""
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["ENCRYPTION_KEY"] = key
    for _ in range(2):  # the second run reuses the data directory
        result = subprocess.run(
            [sys.executable, "-m", "tenantstore.migrate", "up"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert result.returncode == 0, result.stderr
        assert f"embedded development PostgreSQL in {tmp_path}/.tenantstore/pgdata" in result.stderr
    assert (tmp_path / ".tenantstore" / "pgdata" / "PG_VERSION").exists()
    assert result.stdout.strip() == f"Nothing to do: schema is at version {LATEST}"


# -- adopting the seed system's layout and the secret columns ---------------------------


async def test_up_adopts_the_seed_layout_with_its_private_gemini_column(
    pool: asyncpg.Pool, key: str
) -> None:
    """tenants._gemini_api_key behind a model property, a mix of pyca tokens and plaintext."""
    from cryptography.fernet import Fernet

    from tenantstore import TenantRepository

    await pool.execute(
        """
        CREATE TABLE tenants (
            id SERIAL PRIMARY KEY,
            tenant_id VARCHAR(255) UNIQUE NOT NULL,
            name VARCHAR(255) NOT NULL,
            _gemini_api_key TEXT,
            created_at TIMESTAMP DEFAULT now(),
            updated_at TIMESTAMP DEFAULT now()
        )
        """
    )
    pyca = Fernet(key.encode())
    seed = {
        "tok-1": pyca.encrypt(b"AIza-token-one").decode(),
        "tok-2": pyca.encrypt(b"AIza-token-two").decode(),
        "plain-1": "AIza-plain-one",
        "none": None,
        "empty": "",
    }
    await pool.executemany(
        "INSERT INTO tenants (tenant_id, name, _gemini_api_key) VALUES ($1, $1, $2)",
        list(seed.items()),
    )
    ring = KeyRing(key)
    report = await upgrade(pool, ring)
    assert report.summary() == "Migration complete: 1 keys encrypted, 2 already encrypted"
    rows = dict(await pool.fetch("SELECT tenant_id, gemini_api_key FROM tenants"))
    assert rows["tok-1"] == seed["tok-1"] and rows["tok-2"] == seed["tok-2"]  # never twice
    assert ring.decrypt(rows["plain-1"]) == "AIza-plain-one"
    assert rows["none"] is None and rows["empty"] == ""
    # An old version still running reads its column (now a copy of the tokens)...
    copies = dict(await pool.fetch("SELECT tenant_id, _gemini_api_key FROM tenants"))
    assert copies == rows
    assert pyca.decrypt(copies["plain-1"].encode()) == b"AIza-plain-one"
    # ...and its writes to it fail loudly instead of being lost.
    with pytest.raises(asyncpg.PostgresError, match="_gemini_api_key"):
        await pool.execute("UPDATE tenants SET _gemini_api_key = 'x' WHERE tenant_id = 'none'")
    repo = TenantRepository(pool, ring)
    tenant = await repo.get_tenant("tok-2")
    assert tenant is not None and tenant.gemini_api_key is not None
    assert tenant.gemini_api_key.get_secret_value() == "AIza-token-two"
    assert tenant.created_at.tzinfo is not None
    await repo.set_gemini_api_key("none", "AIza-new")
    copy = await pool.fetchval("SELECT _gemini_api_key FROM tenants WHERE tenant_id = 'none'")
    assert pyca.decrypt(copy.encode()) == b"AIza-new"


async def test_down_refuses_to_drop_secret_columns_holding_values_unless_confirmed(
    pool: asyncpg.Pool, keyring: KeyRing
) -> None:
    await upgrade(pool, keyring, target=4)
    await pool.execute(
        "INSERT INTO tenants (tenant_id, name, oauth_refresh_token) VALUES ('a', 'A', 'r')"
    )
    await downgrade(pool, keyring)  # 0004 down: decrypt (nothing encrypted yet)
    with pytest.raises(DestructiveMigrationError, match=r"oauth_refresh_token, which holds 1"):
        await downgrade(pool, keyring)
    assert await versions(pool) == [1, 2, 3]
    await pool.execute("UPDATE tenants SET oauth_refresh_token = ''")
    await downgrade(pool, keyring)  # an empty string is no value: nothing is lost
    assert await versions(pool) == [1, 2]
    columns = await pool.fetch(
        "SELECT attname FROM pg_attribute WHERE attrelid = 'tenants'::regclass AND attnum > 0"
    )
    assert "oauth_refresh_token" not in {r[0] for r in columns}
