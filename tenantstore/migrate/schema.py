"""The schema runner: apply and revert numbered migrations, report status.

`upgrade` and `downgrade` hold a PostgreSQL session-level advisory lock for
the whole run, on one dedicated connection (the CLI opens its own; from
Python, pass `connection=` or one is taken from the pool and kept until the
lock is released explicitly). (A lock taken through `pool.fetchval` would be lost at
once: the pool's release resets the session with `pg_advisory_unlock_all()`.
A transaction-level lock would keep a transaction open and block `CREATE
INDEX CONCURRENTLY`.) A second runner started meanwhile waits, then finds
nothing left to do. The pool therefore needs at least two connections when a
data step runs: one holds the lock, the batch runner uses another.

Behind PgBouncer in transaction mode the lock cannot stay with a client:
pass `connection=await asyncpg.connect(direct_url)`. A lock connection
through a pooler is refused (`pooling.SessionRequiredError`), never run unlocked.

Each SQL migration runs in its own transaction together with its tracking
row, so a failure leaves nothing half-applied.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import anyio
import asyncpg
from typing_extensions import Unpack

from .._catalog import present_columns
from ..db import AnyConnection
from ..encryption import KeyRing
from ..errors import (
    DestructiveMigrationError,
    EncryptionKeyMissingError,
    MigrationChecksumError,
    MigrationError,
    describe_driver_error,
    printable,
)
from ..models import TENANTS
from ..pooling import require_session
from ._tracking import TRACK, ensure_tracking_tables
from .files import Migration, Step, load_migrations
from .secrets import RunOptions, SecretsReport, decrypt_secrets, encrypt_secrets

_DATA_STEPS = {"encrypt_secrets": encrypt_secrets, "decrypt_secrets": decrypt_secrets}

__all__ = [
    "LOCK_ID",
    "AppliedMigration",
    "MigrationReport",
    "StatusReport",
    "downgrade",
    "migration_status",
    "upgrade",
]

logger = logging.getLogger("tenantstore")

LOCK_ID = 0x74656E616E7473  # "tenants" in ASCII: the advisory lock key of the schema runner


@dataclass(frozen=True, slots=True)
class AppliedMigration:
    """A row of the tracking table."""

    version: int
    name: str
    checksum: str
    applied_at: datetime


@dataclass
class MigrationReport:
    """What `upgrade` or `downgrade` did: labels of the steps run, and data-step reports."""

    direction: str
    applied: list[str] = field(default_factory=list)
    data: list[SecretsReport] = field(default_factory=list)
    version: int = 0

    def combined_data(self) -> SecretsReport | None:
        """The data steps of this run as one report (`up` runs 0002 and 0004).

        Per column: secrets changed by any step; "already done" as the last
        step covering the column found them, less what earlier steps of this
        run did (the last step finds their work done, which is not "already"
        to the operator).
        """
        if not self.data:
            return None
        combined = SecretsReport(self.data[0].operation, self.data[0].table)
        for data in self.data:
            combined.rows = max(combined.rows, data.rows)
            combined.retries += data.retries
            combined.elapsed_seconds += data.elapsed_seconds
            combined.failures += data.failures
            for name, counts in data.columns.items():
                into = combined.column(name)
                earlier = into.changed
                into.changed += counts.changed
                into.changed_concurrently += counts.changed_concurrently
                into.failed += counts.failed
                into.skipped = max(0, counts.skipped - earlier)
                into.plaintext = counts.plaintext
                into.keys = counts.keys.copy()
        return combined

    def summary(self) -> str:
        """The line the CLI ends with: the data steps' summary, else what happened."""
        combined = self.combined_data()
        if combined is not None:
            return combined.summary()
        if not self.applied:
            return f"Nothing to do: schema is at version {self.version}"
        verb = "Applied" if self.direction == "up" else "Reverted"
        return f"{verb} {', '.join(self.applied)}; schema is at version {self.version}"


@dataclass
class StatusReport:
    """Applied and pending migrations, the latest batch run of each operation, and counts.

    `counts` is a verify report over `table`, filled in by the CLI when a key
    ring is available; otherwise `not_counted` says why it is not.
    """

    applied: list[AppliedMigration]
    pending: list[str]
    changed: list[str]
    unknown: list[int]
    runs: list[dict[str, object]]
    counts: SecretsReport | None = None
    table: str = "tenants"
    not_counted: str | None = None

    @property
    def version(self) -> int:
        """The highest applied version (0 for none)."""
        return max((m.version for m in self.applied), default=0)


async def _applied(conn: AnyConnection) -> list[AppliedMigration]:
    await ensure_tracking_tables(conn)
    rows = await conn.fetch(TRACK["applied_migrations"])
    return [AppliedMigration(r[0], r[1], r[2], r[3]) for r in rows]


def _check_checksums(migrations: Sequence[Migration], applied: Sequence[AppliedMigration]) -> None:
    by_version = {m.version: m for m in migrations}
    for row in applied:
        known = by_version.get(row.version)
        if known is None:
            raise MigrationError(
                f"the database has migration {row.version:04d}_{printable(row.name)}, which this "
                "tenantstore does not know: upgrade tenantstore first"
            )
        if known.checksum != row.checksum:
            raise MigrationChecksumError(known.up.filename)


async def _run_sql(conn: AnyConnection, step: Step, record: str, *args: object) -> None:
    """Run a step's SQL and its tracking statement: atomically unless `no-transaction`."""
    if step.transactional:
        async with conn.transaction():
            await conn.execute(step.sql)
            await conn.execute(record, *args)
    else:
        await conn.execute(step.sql)
        await conn.execute(record, *args)


@asynccontextmanager
async def _lock_connection(
    pool: asyncpg.Pool, connection: asyncpg.Connection | None
) -> AsyncIterator[AnyConnection]:
    """The connection that holds the advisory lock: the caller's own, or one held from the pool.

    One taken from the pool is kept for the whole run and unlocked explicitly
    before it goes back, so the pool's reset never runs while we hold the lock.
    """
    if connection is not None:
        yield connection
        return
    async with pool.acquire() as conn:
        yield conn


async def _locked(conn: AnyConnection, *, poll: float = 0.5) -> None:
    """Take the runner's advisory lock, waiting as long as another runner holds it.

    Polled with `pg_try_advisory_lock` rather than one blocking
    `pg_advisory_lock`, which the connection's `command_timeout` would cut
    short while another runner works through a long data step. Refused on
    a connection through PgBouncer, where the lock would not stay with us.
    """
    await require_session(conn, "the schema runner's lock")
    waited = 0.0
    while not await conn.fetchval(TRACK["try_lock"], LOCK_ID):
        if waited == 0.0:
            logger.info("Another migration runner holds the lock; waiting for it")
        await anyio.sleep(poll)
        waited += poll


async def upgrade(
    pool: asyncpg.Pool,
    keyring: KeyRing | None = None,
    *,
    target: int | None = None,
    migrations: Sequence[Migration] | None = None,
    connection: asyncpg.Connection | None = None,
    **options: Unpack[RunOptions],
) -> MigrationReport:
    """Apply pending migrations up to `target` (default: all), data steps included.

    Args:
        pool: the database (at least two connections when a data step runs).
        keyring: needed when a pending migration is a data step; when None,
            it is read from the environment (`KeyRing.from_env()`) as the CLI does.
        target: the version to stop at.
        migrations: the migrations to apply (default: those shipped in `sql/migrations`).
        connection: a dedicated connection (not from `pool`) to hold the lock and
            run the schema steps on; by default one is taken from `pool` for the run.
        **options: passed to the batch runner of a data step (see `RunOptions`).

    Raises:
        EncryptionKeyMissingError: a data step is pending, no key ring was
            given and none is configured; checked before anything is applied.
        MigrationChecksumError: an applied file has changed.
        MigrationError: a step failed; earlier steps stay applied, it does not.
    """
    migrations = load_migrations() if migrations is None else migrations
    report = MigrationReport("up")
    async with _lock_connection(pool, connection) as conn:
        await _locked(conn)
        try:
            applied = await _applied(conn)
            _check_checksums(migrations, applied)
            done = {row.version for row in applied}
            pending = [
                m
                for m in migrations
                if m.version not in done and (target is None or m.version <= target)
            ]
            if keyring is None and any(m.up.data_step for m in pending):
                keyring = KeyRing.from_env()
            for m in pending:
                logger.info("Applying %s", m.label)
                record = (TRACK["record_migration"], m.version, m.name, m.checksum)
                await _run_step(conn, pool, keyring, m.label, m.up, record, report, options)
            report.version = max(done | {m.version for m in pending}, default=0)
        finally:
            await conn.fetchval(TRACK["unlock"], LOCK_ID)
    return report


async def _run_step(
    conn: AnyConnection,
    pool: asyncpg.Pool,
    keyring: KeyRing | None,
    label: str,
    step: Step,
    tracking: tuple[Any, ...],
    report: MigrationReport,
    options: RunOptions,
) -> None:
    """Run one step, SQL or data, then its `tracking` statement; record it in `report`."""
    if step.data_step:
        assert keyring is not None  # checked before the first step ran
        # A data step covers the declared secret columns that exist at its
        # point in the history (0002 ran before 0003 added the OAuth columns).
        columns = await present_columns(conn, TENANTS)
        if not columns:
            report.applied.append(label)
            await conn.execute(*tracking)
            return
        if step.data_step == "decrypt_secrets":
            logger.warning("Decrypting every secret: they will be stored in PLAINTEXT")
        step_options: RunOptions = {**options, "table": TENANTS, "columns": columns}
        data = await _DATA_STEPS[step.data_step](pool, keyring, **step_options)
        report.data.append(data)
        if data.failed_tenant_ids:
            raise MigrationError(f"{label}: {data.summary()}")
        if data.changed_concurrently:
            raise MigrationError(
                f"{label}: {data.changed_concurrently} rows kept changing under the run and were "
                "left as the application wrote them; run it again (not recorded as done)"
            )
        await conn.execute(*tracking)
    else:
        try:
            await _run_sql(conn, step, *tracking)
        except asyncpg.PostgresError as exc:
            raise MigrationError(f"{step.filename} failed: {describe_driver_error(exc)}") from None
    report.applied.append(label)


async def downgrade(
    pool: asyncpg.Pool,
    keyring: KeyRing | None = None,
    *,
    steps: int = 1,
    confirm: bool = False,
    migrations: Sequence[Migration] | None = None,
    connection: asyncpg.Connection | None = None,
    **options: Unpack[RunOptions],
) -> MigrationReport:
    """Revert the latest `steps` applied migrations, newest first.

    Args:
        confirm: allow a step that drops a table holding rows.
        migrations: the known migrations (default: those shipped in `sql/migrations`).
        connection: as for `upgrade`.

    Raises:
        DestructiveMigrationError: a step would drop a table with rows and
            `confirm` is False; checked before anything is reverted.
        EncryptionKeyMissingError: a decrypting data step needs a key ring.
        MigrationError: a step has no down file, or failed.
    """
    if steps < 1:
        raise MigrationError("steps is expected to be at least 1")
    known = load_migrations() if migrations is None else migrations
    by_version = {m.version: m for m in known}
    report = MigrationReport("down")
    async with _lock_connection(pool, connection) as conn:
        await _locked(conn)
        try:
            applied = await _applied(conn)
            _check_checksums(list(by_version.values()), applied)
            chosen = [by_version[row.version] for row in reversed(applied)][:steps]
            if keyring is None and any(m.down is not None and m.down.data_step for m in chosen):
                keyring = KeyRing.from_env()
            await _check_down(conn, chosen, keyring, confirm=confirm)
            for m in chosen:
                assert m.down is not None  # checked by _check_down
                logger.info("Reverting %s", m.label)
                forget = (TRACK["forget_migration"], m.version)
                await _run_step(conn, pool, keyring, m.label, m.down, forget, report, options)
            remaining = {row.version for row in applied} - {m.version for m in chosen}
            report.version = max(remaining, default=0)
        finally:
            await conn.fetchval(TRACK["unlock"], LOCK_ID)
    return report


async def _check_down(
    conn: AnyConnection,
    chosen: Sequence[Migration],
    keyring: KeyRing | None,
    *,
    confirm: bool,
) -> None:
    for migration in chosen:
        down = migration.down
        if down is None:
            raise MigrationError(f"{migration.label} has no down file: it cannot be reverted")
        if down.data_step and keyring is None:
            raise EncryptionKeyMissingError()
        for table in down.drops:
            await conn.execute(TRACK["create_row_counter"])
            rows = await conn.fetchval(TRACK["table_row_count"], table)
            if rows and not confirm:
                raise DestructiveMigrationError(down.filename, table, rows)
        for table, column in down.drops_columns:
            await conn.execute(TRACK["create_value_counter"])
            values = await conn.fetchval(TRACK["column_value_count"], table, column)
            if values and not confirm:
                raise DestructiveMigrationError(down.filename, table, values, column=column)


async def migration_status(
    pool: asyncpg.Pool, *, migrations: Sequence[Migration] | None = None
) -> StatusReport:
    """Applied, pending, changed and unknown migrations, and the latest batch runs.

    Read-only: it creates nothing (no tracking table on a fresh database) and
    records nothing.
    """
    migrations = load_migrations() if migrations is None else migrations
    async with pool.acquire() as conn:
        exist = await conn.fetchrow(TRACK["tracking_tables_exist"])
        has_migrations, has_runs = (False, False) if exist is None else exist
        applied: list[AppliedMigration] = []
        if has_migrations:
            rows = await conn.fetch(TRACK["applied_migrations"])
            applied = [AppliedMigration(r[0], r[1], r[2], r[3]) for r in rows]
        runs: list[dict[str, object]] = []
        if has_runs:
            try:
                runs = [dict(row) for row in await conn.fetch(TRACK["last_runs"])]
            except asyncpg.UndefinedColumnError:  # tracking table of an older version
                runs = []
    by_version = {m.version: m for m in migrations}
    done = {row.version for row in applied}
    return StatusReport(
        applied=applied,
        pending=[m.label for m in migrations if m.version not in done],
        changed=[
            by_version[row.version].up.filename
            for row in applied
            if row.version in by_version and by_version[row.version].checksum != row.checksum
        ],
        unknown=[row.version for row in applied if row.version not in by_version],
        runs=runs,
    )
