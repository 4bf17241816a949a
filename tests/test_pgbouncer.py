"""tenantstore through a real PgBouncer in transaction pooling mode (see pgbouncer_fixture).

The repository and the batch runner work through it with `pgbouncer=True`;
the schema runner, whose advisory lock needs a session of its own, takes it
on a direct connection (`DATABASE_DIRECT_URL`, `connection=`) and refuses to
run with only PgBouncer to talk to.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest
from cryptography.fernet import Fernet
from pgbouncer_fixture import POOL_SIZE, PgBouncer

from tenantstore import KeyRing, TenantRepository, create_pool
from tenantstore.db import resolve_direct_url
from tenantstore.encryption import stored_token
from tenantstore.migrate import downgrade, load_migrations, migration_status, upgrade
from tenantstore.migrate.secrets import run_operation
from tenantstore.pooling import SessionRequiredError, pgbouncer_setting, through_pooler

SECRETS = {
    "gemini_api_key": "AIza-gemini",
    "oauth_access_token": "ya29.access",
    "oauth_refresh_token": "1//refresh",
    "webhook_signing_secret": "whsec_hook",
}


def revealed(tenant: object) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in SECRETS:
        value = getattr(tenant, name)
        out[name] = None if value is None else value.get_secret_value()
    return out


async def migrated(database_url: str, keyring: KeyRing) -> None:
    """Bring the test database to the latest schema over a direct connection."""
    direct = await asyncpg.connect(database_url)
    try:
        pool = await create_pool(database_url, min_size=1, max_size=2)
        try:
            await upgrade(pool, keyring, connection=direct)
        finally:
            await pool.close()
    finally:
        await direct.close()


# -- the fixture is what it claims to be ----------------------------------------------


async def test_pgbouncer_connections_are_recognised_as_pooled_and_direct_ones_not(
    bouncer_pool: asyncpg.Pool, pool: asyncpg.Pool
) -> None:
    """The check the schema runner relies on tells PgBouncer from PostgreSQL itself."""
    async with bouncer_pool.acquire() as conn:
        assert await through_pooler(conn)
    async with pool.acquire() as conn:
        assert not await through_pooler(conn)


# -- the repository ---------------------------------------------------------------


async def test_repository_creates_reads_and_writes_through_pgbouncer(
    database_url: str, bouncer_pool: asyncpg.Pool, pool: asyncpg.Pool, keyring: KeyRing
) -> None:
    """create/get/set_secrets/get_tenants/iter_tenants/delete all work in transaction mode."""
    await migrated(database_url, keyring)
    async with TenantRepository(bouncer_pool, keyring) as repo:
        created = await repo.create_tenant("acme", "Acme", **SECRETS)
        assert revealed(created) == SECRETS
        for i in range(7):
            await repo.create_tenant(f"t{i}", f"T{i}", gemini_api_key=f"key-{i}")
        got = await repo.get_tenant("acme")
        assert got is not None and revealed(got) == SECRETS
        await repo.set_secrets("acme", oauth_access_token="ya29.new", webhook_signing_secret=None)
        got = await repo.get_tenant("acme")
        assert got is not None
        assert revealed(got) == {
            **SECRETS,
            "oauth_access_token": "ya29.new",
            "webhook_signing_secret": None,
        }
        many = await repo.get_tenants(["t1", "t5", "missing", "acme"])
        assert sorted(many) == ["acme", "t1", "t5"]
        assert many["t5"].gemini_api_key is not None
        assert many["t5"].gemini_api_key.get_secret_value() == "key-5"
        ids = [tenant.tenant_id async for tenant in repo.iter_tenants(batch_size=3)]
        assert ids == ["acme", *(f"t{i}" for i in range(7))]
        assert await repo.delete_tenant("t0")
        assert await repo.get_tenant("t0") is None
    # What went through PgBouncer is stored encrypted, as read directly.
    row = await pool.fetchrow("SELECT gemini_api_key, oauth_access_token FROM tenants "
                              "WHERE tenant_id = 'acme'")  # fmt: skip
    assert row is not None
    assert all(stored_token(value) is not None for value in row)
    assert keyring.decrypt(row[1]) == "ya29.new"


async def test_many_concurrent_get_tenant_calls_share_the_few_server_connections(
    database_url: str, bouncer_url: str, keyring: KeyRing
) -> None:
    """200 cold reads from 30 client connections through PgBouncer's 2 server connections
    all return the right secrets: no statement or session state leaks between clients."""
    await migrated(database_url, keyring)
    expected = {f"t{i:02d}": {**SECRETS, "gemini_api_key": f"key-{i}"} for i in range(40)}
    clients = await create_pool(
        bouncer_url,
        min_size=30,
        max_size=30,
        pgbouncer=True,
    )
    direct = await asyncpg.connect(database_url)
    try:
        async with TenantRepository(clients, keyring) as writer:
            for tenant_id, secrets in expected.items():
                await writer.create_tenant(tenant_id, tenant_id.upper(), **secrets)
        # cache_size=0: every call decrypts, so every call reads its own row.
        async with TenantRepository(clients, keyring, cache_size=0) as repo:
            ids = [f"t{i % 40:02d}" for i in range(200)]
            tenants = await asyncio.gather(*(repo.get_tenant(t) for t in ids))
            for tenant_id, tenant in zip(ids, tenants, strict=True):
                assert tenant is not None and tenant.tenant_id == tenant_id
                assert revealed(tenant) == expected[tenant_id]
            # Every other backend on this database is one of PgBouncer's servers.
            servers = await direct.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 "
                "AND pid <> pg_backend_pid()",
                urlsplit(database_url).path.lstrip("/"),
            )
            assert 1 <= servers <= POOL_SIZE  # 30 client connections, at most 2 servers
    finally:
        await direct.close()
        await clients.close()


# -- the schema and batch runners from Python ------------------------------------------


async def test_upgrade_and_downgrade_through_pgbouncer_alone_refuse_and_change_nothing(
    bouncer_url: str, bouncer_pool: asyncpg.Pool, pool: asyncpg.Pool, keyring: KeyRing
) -> None:
    """Without a direct connection the schema runner refuses rather than run unlocked."""
    with pytest.raises(SessionRequiredError, match="DATABASE_DIRECT_URL"):
        await upgrade(bouncer_pool, keyring)
    assert await pool.fetchval("SELECT to_regclass('tenantstore_migrations')") is None
    with pytest.raises(SessionRequiredError, match=r"connection=await asyncpg\.connect"):
        await downgrade(bouncer_pool, keyring)
    # A connection of one's own through PgBouncer is no better: it is refused too.
    through = await asyncpg.connect(bouncer_url, statement_cache_size=0)
    try:
        with pytest.raises(SessionRequiredError):
            await upgrade(bouncer_pool, keyring, connection=through)
    finally:
        await through.close()
    assert await pool.fetchval("SELECT to_regclass('tenants')") is None


async def test_runner_through_pgbouncer_with_a_direct_lock_connection(
    database_url: str, bouncer_pool: asyncpg.Pool, pool: asyncpg.Pool, key: str, old_key: str
) -> None:
    """up (lock on a direct connection, data steps through PgBouncer), encrypt, rotate,
    verify through PgBouncer, then down."""
    old = KeyRing(old_key)
    direct = await asyncpg.connect(database_url)
    try:
        report = await upgrade(bouncer_pool, old, connection=direct, target=3)
        assert report.version == 3
        await pool.execute(
            "INSERT INTO tenants (tenant_id, name, gemini_api_key, oauth_refresh_token) "
            "SELECT 't' || i, 'T', 'plain-' || i, 'refresh-' || i FROM generate_series(1, 25) i"
        )
        report = await upgrade(bouncer_pool, old, connection=direct)
        assert report.version == load_migrations()[-1].version
        encrypted = await run_operation("encrypt", bouncer_pool, old, batch_size=7)
        assert encrypted.changed == 0 and encrypted.skipped == 50  # 0004 did it
        both = KeyRing(key, [old_key])
        rotated = await run_operation("rotate", bouncer_pool, both, batch_size=7)
        assert rotated.changed == 50 and rotated.failed == 0
        verified = await run_operation("verify", bouncer_pool, both, batch_size=7)
        assert (verified.current, verified.previous, verified.failed) == (50, 0, 0)
        assert (await migration_status(bouncer_pool)).pending == []
        every = len(load_migrations())
        down = await downgrade(bouncer_pool, both, steps=every, confirm=True, connection=direct)
        assert down.version == 0
    finally:
        await direct.close()
    assert await pool.fetchval("SELECT to_regclass('tenants')") is None


# -- the command line ----------------------------------------------------------------


def run_cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tenantstore.migrate", *args],
        env={**os.environ, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(run_cli, args, env, cwd)


async def test_cli_up_and_down_through_pgbouncer_without_a_direct_url_exit_2(
    bouncer_url: str, pool: asyncpg.Pool, key: str, tmp_path: Path
) -> None:
    """Declared (TENANTSTORE_PGBOUNCER=1) or not, up/down refuse with exit 2, naming the fix."""
    for declared in ({"TENANTSTORE_PGBOUNCER": "1"}, {}):
        env = {"DATABASE_URL": bouncer_url, "ENCRYPTION_KEY": key, **declared}
        for command in (["up"], ["down"]):
            result = await cli(command, env, tmp_path)
            assert result.returncode == 2, (declared, command, result.stderr)
            assert "DATABASE_DIRECT_URL" in result.stderr
            # Declared, it is refused before connecting; else the lock connection's check finds it.
            expected = "goes through PgBouncer" if declared else "goes through a pooler"
            assert expected in result.stderr
            assert "Traceback" not in result.stderr
    # A "direct" URL that goes through PgBouncer too is found out the same way.
    env = {"DATABASE_URL": bouncer_url, "DATABASE_DIRECT_URL": bouncer_url, "ENCRYPTION_KEY": key}
    result = await cli(["up"], env, tmp_path)
    assert result.returncode == 2 and "goes through a pooler" in result.stderr
    assert await pool.fetchval("SELECT to_regclass('tenantstore_migrations')") is None


async def test_cli_runs_up_encrypt_rotate_verify_down_through_pgbouncer(
    database_url: str, bouncer_url: str, pool: asyncpg.Pool, key: str, old_key: str, tmp_path: Path
) -> None:
    """The whole runner through PgBouncer, the lock on DATABASE_DIRECT_URL / --direct-url."""
    env = {
        "DATABASE_URL": bouncer_url,
        "DATABASE_DIRECT_URL": database_url,
        "TENANTSTORE_PGBOUNCER": "1",
        "ENCRYPTION_KEY": old_key,
    }
    up = await cli(["up", "--to", "1"], env, tmp_path)
    assert up.returncode == 0, up.stderr
    await pool.execute(
        "INSERT INTO tenants (tenant_id, name, gemini_api_key) "
        "SELECT 't' || i, 'T', 'plain-' || i FROM generate_series(1, 30) i"
    )
    # --direct-url and --pgbouncer on the command line do the same as the settings.
    flags = {"DATABASE_URL": bouncer_url, "ENCRYPTION_KEY": old_key}
    up = await cli(["up", "--pgbouncer", "--direct-url", database_url], flags, tmp_path)
    assert up.returncode == 0, up.stderr
    encrypt = await cli(["encrypt", "--batch-size", "7"], env, tmp_path)
    assert encrypt.returncode == 0, encrypt.stderr
    rotate_env = {**env, "ENCRYPTION_KEY": key, "OLD_ENCRYPTION_KEY": old_key}
    rotate = await cli(["rotate", "--batch-size", "7"], rotate_env, tmp_path)
    assert rotate.returncode == 0, rotate.stderr
    assert rotate.stdout.strip().splitlines()[-1].startswith("Rotation complete: 30 keys rotated")
    verify = await cli(["verify", "--json", "--require-current"], rotate_env, tmp_path)
    assert verify.returncode == 0, verify.stderr
    counts = json.loads(verify.stdout)
    assert (counts["current"], counts["previous"], counts["failed"]) == (30, 0, 0)
    token = await pool.fetchval("SELECT gemini_api_key FROM tenants WHERE tenant_id = 't7'")
    assert Fernet(key.encode()).decrypt(token.encode()) == b"plain-7"
    down = await cli(["down", str(len(load_migrations())), "--yes"], rotate_env, tmp_path)
    assert down.returncode == 0, down.stderr
    assert await pool.fetchval("SELECT to_regclass('tenants')") is None
    for result in (up, encrypt, rotate, verify, down):
        assert key not in result.stdout + result.stderr
        assert old_key not in result.stdout + result.stderr


async def test_cli_batch_commands_find_out_an_undeclared_pgbouncer(
    database_url: str, bouncer_url: str, key: str, tmp_path: Path
) -> None:
    """Without TENANTSTORE_PGBOUNCER the CLI still keeps no prepared statements through it,
    which would otherwise collide with the previous run's on PgBouncer's server connections."""
    up = await cli(["up"], {"DATABASE_URL": database_url, "ENCRYPTION_KEY": key}, tmp_path)
    assert up.returncode == 0, up.stderr
    env = {"DATABASE_URL": bouncer_url, "ENCRYPTION_KEY": key}
    for _ in range(3):
        for command in (["verify"], ["encrypt"], ["status"]):
            result = await cli(command, env, tmp_path)
            assert result.returncode == 0, result.stderr


async def test_cli_hides_the_direct_url_password_when_it_cannot_connect(
    bouncer_url: str, pgbouncer: PgBouncer, tmp_path: Path
) -> None:
    """A direct URL that fails is shown redacted; a malformed one is a configuration error."""
    env = {"DATABASE_URL": bouncer_url, "TENANTSTORE_PGBOUNCER": "1"}
    wrong = "postgresql://postgres:Hush8Secret@127.0.0.1:1/nowhere"
    result = await cli(["up", "--direct-url", wrong], env, tmp_path)
    assert result.returncode == 1, result.stderr
    assert "postgresql://postgres:***@127.0.0.1:1/nowhere" in result.stderr
    assert "Hush8Secret" not in result.stdout + result.stderr
    malformed = {**env, "DATABASE_DIRECT_URL": "postgresql://postgres:Hush/8@x/db"}
    result = await cli(["down"], malformed, tmp_path)
    assert result.returncode == 2, result.stderr
    assert "percent-encode" in result.stderr and "Hush" not in result.stderr


# -- the settings ----------------------------------------------------------------------


def test_pgbouncer_and_direct_url_settings_read_like_database_url(tmp_path: Path) -> None:
    """Explicit wins, then the environment, then .env; a bad flag value is an error."""
    env_file = tmp_path / ".env"
    env_file.write_text(
        "DATABASE_DIRECT_URL=postgresql://db.example.com/app\nTENANTSTORE_PGBOUNCER=yes\n"
    )
    assert resolve_direct_url(environ={}, env_file=env_file) == "postgresql://db.example.com/app"
    assert resolve_direct_url("postgresql://x/y", environ={}, env_file=env_file) == (
        "postgresql://x/y"
    )
    assert resolve_direct_url(environ={}, env_file=None) is None
    assert pgbouncer_setting(environ={}, env_file=env_file) is True
    assert pgbouncer_setting(environ={"TENANTSTORE_PGBOUNCER": "0"}, env_file=env_file) is False
    assert pgbouncer_setting(False, environ={}, env_file=env_file) is False
    assert pgbouncer_setting(environ={}, env_file=None) is False
    with pytest.raises(ValueError, match="TENANTSTORE_PGBOUNCER must be 1 or 0"):
        pgbouncer_setting(environ={"TENANTSTORE_PGBOUNCER": "maybe"}, env_file=None)
