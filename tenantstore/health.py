"""Health for readiness probes: `check_health` and `python -m tenantstore.health`.

    report = await check_health(pool, repo.crypto, repository=repo)
    report.ok         # False when any check failed
    report.as_dict()  # {"schema": 1, "ok": ..., "checks": {"database": {...}, ...}}

Four checks, each `ok`, `failed` or `skipped`, with a reason that holds no
secret (names, versions, key ids and counts only) and how long it took:

  database  a round trip through the pool (`SELECT 1`) within the deadline
  schema    no pending, changed or unknown migration (as `migrate status` sees them)
  keys      a key ring is configured, and a few stored tokens of each secret
            column of `tenants` decrypt under it: a canary for a wrong key
  crypto    an encrypt/decrypt round trip through the AsyncCrypto worker thread
            within the deadline (skipped without an AsyncCrypto or repository)

The command line, `python -m tenantstore.health [--json] [--database-url URL]
[--timeout SECONDS]`, exits 0 healthy, 1 unhealthy, 2 on a configuration
error (no database URL or a malformed one, bad arguments). It reads
`DATABASE_URL`, `ENCRYPTION_KEY` and `OLD_ENCRYPTION_KEY` as the other
commands do (a missing or malformed key fails the keys check), but never
starts the embedded development server: a probe checks the database the
application uses. It keeps no prepared statements, so it works through
PgBouncer in transaction mode as it is.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import secrets
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import anyio
import anyio.to_thread
import asyncpg

from ._catalog import present_columns
from ._queries import identifier, load_queries, render
from .crypto import _DECRYPT, _ENCRYPT, AsyncCrypto
from .db import redact_url, resolve_database_url
from .encryption import KeyRing, stored_token
from .errors import ConfigurationError, TenantStoreError, describe_driver_error
from .keys.check import KeyCheckError, check_keys
from .keys.envelope import keyring_from_env
from .keys.store import keys_table_exists
from .live_cache import LiveCache
from .migrate.files import Migration
from .migrate.schema import migration_status
from .models import TENANTS
from .repository import TenantRepository

__all__ = ["HEALTH_SCHEMA_VERSION", "Check", "HealthReport", "check_health", "main"]

HEALTH_SCHEMA_VERSION = 1
"""Version of the `as_dict()` / `--json` layout; raised on any incompatible change."""

SAMPLES_PER_COLUMN = 5
"""Stored values of each secret column the keys check tries to decrypt."""

Status = Literal["ok", "failed", "skipped"]

_Q = load_queries("health.sql")
_SAMPLE = {
    column: render(_Q["sample_secrets"], table=identifier(TENANTS.name), column=identifier(column))
    for column in TENANTS.secrets
}


@dataclass(frozen=True, slots=True)
class Check:
    """One check's outcome: its status, a reason that holds no secret, and its duration."""

    status: Status
    reason: str
    seconds: float | None = None

    @property
    def ok(self) -> bool:
        """False only when the check failed (a skipped one does not fail the report)."""
        return self.status != "failed"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: status, ok, reason, seconds (None when it did not run)."""
        seconds = None if self.seconds is None else round(self.seconds, 6)
        return {"status": self.status, "ok": self.ok, "reason": self.reason, "seconds": seconds}


@dataclass(frozen=True, slots=True)
class HealthReport:
    """The checks by name: `database`, `schema`, `keys`, `crypto`, in that order."""

    checks: dict[str, Check]

    @property
    def ok(self) -> bool:
        """Whether no check failed."""
        return all(check.ok for check in self.checks.values())

    def as_dict(self) -> dict[str, Any]:
        """The `--json` layout: `{"schema": 1, "ok": bool, "checks": {name: {...}}}`."""
        return {
            "schema": HEALTH_SCHEMA_VERSION,
            "ok": self.ok,
            "checks": {name: check.as_dict() for name, check in self.checks.items()},
        }

    def lines(self) -> list[str]:
        """What the command prints without `--json`: a verdict, then one line per check."""
        lines = [f"tenantstore health: {'healthy' if self.ok else 'UNHEALTHY'}"]
        for name, check in self.checks.items():
            took = "" if check.seconds is None else f"{check.seconds * 1e3:.1f} ms"
            lines.append(f"  {name:9} {check.status:8} {took:>10}  {check.reason}")
        return lines


async def _timed(limit: float, what: str, probe: Callable[[], Awaitable[Check]]) -> Check:
    """Run `probe` within `limit` seconds; a timeout or an error becomes a failed check."""
    start = time.perf_counter()
    try:
        with anyio.fail_after(limit):
            check = await probe()
    except TimeoutError:
        reason = f"{what}: no answer within {limit:g} s"
    except TenantStoreError as exc:  # tenantstore's messages hold no secret
        reason = f"{what}: {exc}"
    except Exception as exc:  # a probe reports, never raises; the driver's text is dropped
        reason = f"{what}: {describe_driver_error(exc)}"
    else:
        return dataclasses.replace(check, seconds=time.perf_counter() - start)
    return Check("failed", reason, time.perf_counter() - start)


async def _database(pool: asyncpg.Pool) -> Check:
    async with pool.acquire() as conn:
        await conn.fetchval(_Q["ping"].sql)
    return Check("ok", "reachable")


async def _schema(pool: asyncpg.Pool, migrations: Sequence[Migration] | None) -> Check:
    status = await migration_status(pool, migrations=migrations)
    problems = []
    if status.pending:
        problems.append(
            f"{len(status.pending)} pending ({', '.join(status.pending)}): run "
            "`python -m tenantstore.migrate up`"
        )
    if status.changed:
        problems.append(f"changed since applied: {', '.join(status.changed)}")
    if status.unknown:
        versions = ", ".join(f"{version:04d}" for version in status.unknown)
        problems.append(f"unknown versions {versions} (this tenantstore is older)")
    if problems:
        return Check("failed", f"schema at version {status.version}; {'; '.join(problems)}")
    return Check("ok", f"version {status.version}, up to date")


def _key_ring_text(keyring: KeyRing) -> str:
    previous = f" and {keyring.previous_count} previous" if keyring.previous_count else ""
    return f"primary key {keyring.primary_key_id}{previous}"


async def _keys(pool: asyncpg.Pool, keyring: KeyRing) -> Check:
    if await keys_table_exists(pool):
        # The full start-up check: key ids the database uses, and canary decrypts.
        try:
            report = await check_keys(pool, keyring, sample=SAMPLES_PER_COLUMN)
        except KeyCheckError as exc:
            return Check("failed", f"{_key_ring_text(keyring)}: {'; '.join(exc.report.problems)}")
        sampled_count = sum(canary.sampled for canary in report.canaries)
        return Check(
            "ok", f"{_key_ring_text(keyring)}; {sampled_count} sampled tokens decrypt; "
            "every key the database uses is held",
        )  # fmt: skip
    # Before migration 0005 (no tenantstore_keys): a canary decrypt of a sample.
    sampled: list[tuple[str, str]] = []  # (column, token)
    async with pool.acquire() as conn:
        for column in await present_columns(conn, TENANTS):
            for row in await conn.fetch(_SAMPLE[column].text, SAMPLES_PER_COLUMN):
                token = stored_token(row[0])
                if token is not None:  # legacy plaintext says nothing about the key
                    sampled.append((column, token))
    ring = _key_ring_text(keyring)
    if not sampled:
        return Check("ok", f"{ring}; no stored token to check it against")
    # Off the loop, and not through the AsyncCrypto worker: the crypto check covers
    # that. Only the failure counts come back from the thread, no plaintext.
    bad = await anyio.to_thread.run_sync(_failures, keyring, sampled)
    if bad:
        detail = ", ".join(f"{column} ({n} {reason})" for (column, reason), n in bad.items())
        return Check(
            "failed",
            f"{ring}: {bad.total()} of {len(sampled)} sampled tokens decrypt under no "
            f"configured key: {detail}; is ENCRYPTION_KEY (or OLD_ENCRYPTION_KEY) the key "
            "they were made with?",
        )
    columns = len({column for column, _ in sampled})
    return Check("ok", f"{ring}; {len(sampled)} sampled tokens in {columns} columns decrypt")


def _failures(keyring: KeyRing, sampled: list[tuple[str, str]]) -> Counter[tuple[str, str]]:
    """Per (column, reason), how many sampled tokens decrypt under no key (in a thread)."""
    results = keyring.decrypt_batch_with_key_index([token for _, token in sampled])
    return Counter(
        (column, keyring.failure_reason(token))
        for (column, token), result in zip(sampled, results, strict=True)
        if result is None
    )


async def _crypto(crypto: AsyncCrypto) -> Check:
    # Straight through the worker: no cache entry, metric or audit event for a probe.
    canary = secrets.token_hex(8)
    [encrypted] = await crypto.coalescer.run([(_ENCRYPT, canary)])
    token = encrypted[0] if isinstance(encrypted, tuple) else ""
    [decrypted] = await crypto.coalescer.run([(_DECRYPT, token)])
    if not isinstance(decrypted, tuple) or decrypted[0] != canary:
        return Check("failed", "the worker's round trip did not give back what it was given")
    cache = crypto.cache
    return Check("ok", f"worker round trip; cache holds {len(cache)} of {cache.size}")


def _live(cache: LiveCache) -> Check:
    if cache.live:
        return Check("ok", f"listening; {len(cache)} of {cache.max_tenants} tenants held")
    return Check("failed", "the listener is down: every call reads the database")


async def check_health(
    pool: asyncpg.Pool,
    crypto: KeyRing | AsyncCrypto | None,
    *,
    repository: TenantRepository | None = None,
    check_timeout: float = 5.0,
    migrations: Sequence[Migration] | None = None,
) -> HealthReport:
    """Check what a readiness probe needs: database, schema, keys, crypto worker.

    Never raises for what it finds: every failure, timeout included, is a
    failed check with a reason that holds no secret.

    Args:
        pool: the application's pool (through PgBouncer is fine).
        crypto: the key ring, or the AsyncCrypto whose worker to check too;
            None means no key is configured (the keys check fails).
        repository: the repository whose AsyncCrypto to check when `crypto` is a KeyRing.
        check_timeout: the deadline of each check, in seconds.
        migrations: the migrations the schema should have (default: those shipped).

    Returns:
        The report: `ok`, the checks by name, `as_dict()` for JSON.

    Raises:
        ValueError: `check_timeout` is not greater than zero.
    """
    timeout = check_timeout
    if timeout <= 0:
        raise ValueError("check_timeout is expected to be greater than zero")
    worker = crypto if isinstance(crypto, AsyncCrypto) else None
    if worker is None and repository is not None:
        worker = repository.crypto
    keyring = crypto.keyring if isinstance(crypto, AsyncCrypto) else crypto
    database = await _timed(timeout, "cannot reach PostgreSQL", lambda: _database(pool))
    checks = {"database": database}
    if database.ok:
        checks["schema"] = await _timed(
            timeout, "cannot read the schema", lambda: _schema(pool, migrations)
        )
    else:
        checks["schema"] = Check("skipped", "database unreachable")
    if keyring is None:
        checks["keys"] = Check("failed", "no key ring: ENCRYPTION_KEY is not configured")
    elif database.ok:
        checks["keys"] = await _timed(
            timeout, "cannot check the keys", lambda: _keys(pool, keyring)
        )
    else:
        checks["keys"] = Check("skipped", f"{_key_ring_text(keyring)}; database unreachable")
    if worker is None:
        checks["crypto"] = Check("skipped", "no AsyncCrypto to check (no key ring, or none given)")
    else:
        checks["crypto"] = await _timed(timeout, "crypto worker", lambda: _crypto(worker))
    live = None if repository is None else repository.live_cache
    if live is not None:
        checks["live_cache"] = _live(live)
    return HealthReport(checks)


# -- the command line ---------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tenantstore.health",
        description="Check database, schema, keys and crypto worker; exit 0 healthy, "
        "1 unhealthy, 2 configuration error.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--database-url", metavar="URL", help="PostgreSQL URL (overrides DATABASE_URL)"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--timeout", type=float, default=5.0, metavar="SECONDS", help="deadline of each check"
    )
    return parser


async def _run(url: str, check_timeout: float) -> HealthReport:
    # min_size=0: an unreachable server is the database check's finding, not an
    # error here. No statement cache: nothing outlives the probe on a PgBouncer server.
    pool = await asyncpg.create_pool(
        url,
        min_size=0,
        max_size=2,
        statement_cache_size=0,
        command_timeout=check_timeout,
        server_settings={"application_name": "tenantstore-health"},
    )
    try:
        key_problem = None
        try:
            # Either mode: ENCRYPTION_KEY(S) or files, or the HSM unwrapping tenantstore_keys.
            with anyio.fail_after(check_timeout):
                keyring: KeyRing | None = await keyring_from_env(pool)
        except TenantStoreError as exc:  # its message names the setting, never a key
            keyring, key_problem = None, str(exc)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            keyring, key_problem = None, f"loading the keys: {describe_driver_error(exc)}"
        crypto = None if keyring is None else AsyncCrypto(keyring, cache_size=0)
        report = await check_health(pool, crypto, check_timeout=check_timeout)
    finally:
        pool.terminate()  # nothing is in flight; a hung server must not hang the probe
    if key_problem is not None:
        report = HealthReport({**report.checks, "keys": Check("failed", key_problem)})
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Run the health check command and return its exit code."""
    args = _parser().parse_args(argv)
    try:
        if not args.timeout > 0:
            raise ConfigurationError("--timeout must be greater than zero")
        url = resolve_database_url(args.database_url)
        if url is None:
            raise ConfigurationError(
                "no database: set DATABASE_URL or pass --database-url (the health check "
                "never starts the embedded development server)"
            )
    except ConfigurationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report = asyncio.run(_run(url, args.timeout))
    if args.json:
        print(json.dumps(report.as_dict()))
    else:
        print("\n".join([*report.lines(), f"  (database {redact_url(url)})"]))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
