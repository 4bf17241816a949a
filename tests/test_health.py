"""Health checks for readiness probes: `check_health` and `python -m tenantstore.health`.

Against a real PostgreSQL (and a real PgBouncer): healthy, database down,
wrong key, schema behind, no key; the report's JSON layout and the exit codes.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import asyncpg
from cryptography.fernet import Fernet

from tenantstore import AsyncCrypto, KeyRing, TenantRepository
from tenantstore.health import HEALTH_SCHEMA_VERSION, HealthReport, check_health
from tenantstore.migrate import load_migrations, upgrade

SECRETS = {
    "gemini_api_key": "AIza-gemini",
    "oauth_access_token": "ya29.access",
    "oauth_refresh_token": "1//refresh",
    "webhook_signing_secret": "whsec_hook",
}


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def with_tenants(pool: asyncpg.Pool, keyring: KeyRing) -> None:
    await upgrade(pool, keyring)
    async with TenantRepository(pool, keyring) as repo:
        await repo.create_tenant("acme", "Acme", **SECRETS)
        await repo.create_tenant("beta", "Beta", gemini_api_key="AIza-beta")


def statuses(report: HealthReport) -> dict[str, str]:
    return {name: check.status for name, check in report.checks.items()}


# -- check_health from Python ---------------------------------------------------------


async def test_healthy_database_schema_keys_and_worker_report_ok(
    pool: asyncpg.Pool, keyring: KeyRing, key: str
) -> None:
    """All four checks pass; the JSON layout is versioned and holds no secret."""
    await with_tenants(pool, keyring)
    async with TenantRepository(pool, keyring) as repo:
        await repo.get_tenant("acme")  # something in the cache
        report = await check_health(pool, keyring, repository=repo)
    assert report.ok
    assert statuses(report) == {
        "database": "ok",
        "schema": "ok",
        "keys": "ok",
        "crypto": "ok",
    }
    assert report.checks["schema"].reason == f"version {load_migrations()[-1].version}, up to date"
    assert "5 sampled tokens decrypt; every key the database uses is held" in (
        report.checks["keys"].reason
    )
    assert keyring.primary_key_id in report.checks["keys"].reason
    data = report.as_dict()
    assert data["schema"] == HEALTH_SCHEMA_VERSION == 1 and data["ok"] is True
    assert set(data["checks"]) == {"database", "schema", "keys", "crypto"}
    for check in data["checks"].values():
        assert set(check) == {"status", "ok", "reason", "seconds"}
        assert check["seconds"] >= 0
    text = json.dumps(data)
    assert key not in text and not any(value in text for value in SECRETS.values())


async def test_database_down_fails_the_database_check_and_skips_what_needs_it(
    keyring: KeyRing,
) -> None:
    """A server that does not answer is a failed check with the driver's errno text."""
    down = await asyncpg.create_pool(
        f"postgresql://postgres@127.0.0.1:{closed_port()}/nowhere", min_size=0, max_size=1
    )
    try:
        async with AsyncCrypto(keyring, cache_size=0) as crypto:
            report = await check_health(down, crypto)
    finally:
        await down.close()
    assert not report.ok
    assert statuses(report) == {
        "database": "failed",
        "schema": "skipped",
        "keys": "skipped",
        "crypto": "ok",
    }
    assert report.checks["database"].reason.startswith("cannot reach PostgreSQL: ")
    assert "Connect" in report.checks["database"].reason


async def test_tokens_the_key_ring_cannot_decrypt_fail_the_keys_check(
    pool: asyncpg.Pool, keyring: KeyRing, old_key: str, key: str
) -> None:
    """A wrong ENCRYPTION_KEY is caught by the canary; keeping the old key as previous fixes it."""
    await with_tenants(pool, keyring)
    wrong = KeyRing(old_key)
    report = await check_health(pool, wrong)
    assert not report.ok and report.checks["keys"].status == "failed"
    reason = report.checks["keys"].reason
    assert "the database uses keys this process lacks: " + keyring.primary_key_id in reason
    assert "sampled gemini_api_key values do not decrypt" in reason
    assert key not in reason and old_key not in reason
    assert (await check_health(pool, KeyRing(old_key, [key]))).ok


async def test_schema_behind_fails_the_schema_check_naming_the_pending_migrations(
    pool: asyncpg.Pool, keyring: KeyRing
) -> None:
    await upgrade(pool, keyring, target=2)
    report = await check_health(pool, keyring)
    assert not report.ok and report.checks["schema"].status == "failed"
    pending = ", ".join(m.label for m in load_migrations() if m.version > 2)
    assert report.checks["schema"].reason == (
        f"schema at version 2; {len(load_migrations()) - 2} pending ({pending}): "
        "run `python -m tenantstore.migrate up`"
    )
    assert report.checks["keys"].status == "ok"  # the columns that exist are sampled


async def test_no_key_ring_fails_the_keys_check(pool: asyncpg.Pool, keyring: KeyRing) -> None:
    await upgrade(pool, keyring)
    report = await check_health(pool, None)
    assert not report.ok
    assert statuses(report)["keys"] == "failed" and statuses(report)["crypto"] == "skipped"


async def test_health_through_pgbouncer(
    database_url: str, bouncer_pool: asyncpg.Pool, keyring: KeyRing
) -> None:
    """The probe works on an application pool that goes through PgBouncer."""
    direct = await asyncpg.connect(database_url)
    try:
        await upgrade(bouncer_pool, keyring, connection=direct)
    finally:
        await direct.close()
    async with TenantRepository(bouncer_pool, keyring) as repo:
        await repo.create_tenant("acme", "Acme", **SECRETS)
        report = await check_health(bouncer_pool, repo.crypto)
    assert report.ok, report.as_dict()


# -- the command line -------------------------------------------------------------


def run_health(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tenantstore.health", *args],
        env={**os.environ, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(run_health, args, env, cwd)


async def test_cli_exit_codes_healthy_unhealthy_and_configuration_error(
    database_url: str, pool: asyncpg.Pool, keyring: KeyRing, key: str, tmp_path: Path
) -> None:
    """0 healthy, 1 unhealthy (schema behind, wrong key, no key, database down), 2 config."""
    await upgrade(pool, keyring, target=2)
    env = {"DATABASE_URL": database_url, "ENCRYPTION_KEY": key}
    behind = await cli(["--json"], env, tmp_path)
    assert behind.returncode == 1, behind.stderr
    assert json.loads(behind.stdout)["checks"]["schema"]["status"] == "failed"
    await with_tenants(pool, keyring)
    healthy = await cli(["--json"], env, tmp_path)
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    data = json.loads(healthy.stdout)
    assert data["schema"] == 1 and data["ok"] is True
    text = await cli([], env, tmp_path)
    assert text.returncode == 0 and text.stdout.startswith("tenantstore health: healthy\n")
    no_key = await cli(["--json"], {"DATABASE_URL": database_url}, tmp_path)
    assert no_key.returncode == 1
    assert "ENCRYPTION_KEY" in json.loads(no_key.stdout)["checks"]["keys"]["reason"]
    other = Fernet.generate_key().decode()
    wrong_key = await cli(["--json"], {**env, "ENCRYPTION_KEY": other}, tmp_path)
    assert wrong_key.returncode == 1
    assert json.loads(wrong_key.stdout)["checks"]["keys"]["status"] == "failed"
    down_url = f"postgresql://postgres:Quiet5Secret@127.0.0.1:{closed_port()}/x"
    down = await cli(["--database-url", down_url, "--timeout", "3"], env, tmp_path)
    assert down.returncode == 1
    assert "database  failed" in down.stdout and "postgres:***@127.0.0.1" in down.stdout
    for result in (behind, healthy, text, no_key, wrong_key, down):
        output = result.stdout + result.stderr
        assert key not in output and other not in output and "Quiet5Secret" not in output
    for args, extra in (
        ([], {"DATABASE_URL": ""}),  # no database: never the embedded server
        (["--database-url", "postgresql://u:pa/ss@h/db"], {}),  # malformed, redacted
        (["--timeout", "0"], {}),
    ):
        result = await cli(args, {**env, **extra}, tmp_path)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert result.stderr.startswith("error: ") and "pa/ss" not in result.stderr


async def test_cli_through_pgbouncer_runs_again_and_again(
    database_url: str, bouncer_url: str, pool: asyncpg.Pool, keyring: KeyRing, key: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    """A probe process after another on the same PgBouncer servers: no statement collides."""
    await with_tenants(pool, keyring)
    env = {"DATABASE_URL": bouncer_url, "ENCRYPTION_KEY": key}
    for _ in range(3):
        result = await cli(["--json"], env, tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
