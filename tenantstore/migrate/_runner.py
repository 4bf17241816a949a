"""One run of the batch runner over a table: pages, crypto, compare-and-swap writes, retries.

`secrets.py` holds the public functions and options; this is their engine.
Per page: one keyset read of every secret column of the run, the crypto of
all its secrets in one worker-thread call (overlapping the next page's read
and the previous page's write), and one `UPDATE ... FROM unnest(...)` with a
compare-and-swap per column. Each secret's outcome is counted once, when the
page is written.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import anyio.to_thread
import asyncpg

from .._catalog import resolve_table
from .._offload import Sealed
from ..db import AnyConnection
from ..encryption import KeyRing
from ..errors import (
    ConfigurationError,
    MigrationError,
    TenantStoreError,
    describe_driver_error,
    printable,
)
from ..keys.store import keys_table_exists, record_key_use
from ..models import TENANTS
from ..tables import EncryptedTable
from ._statements import RunnerStatements
from ._tracking import TRACK, ensure_tracking_tables
from .plan import Cell, Failure, Operation, SecretsReport, plan_cells

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_RETRY_FOR",
    "LOGGED_FAILURES",
    "WRONG_KEY_EVIDENCE",
    "ProgressCallback",
    "Runner",
]

logger = logging.getLogger("tenantstore")

ProgressCallback = Callable[[int, int], None]
"""Called after every page with (rows done, rows in total)."""

DEFAULT_BATCH_SIZE = 2000
DEFAULT_RETRY_FOR = 60.0
LOGGED_FAILURES = 10
"""Failures logged one by one; the rest are counted (all are in the report)."""
WRONG_KEY_EVIDENCE = 5
"""Undecryptable tokens, and no decryptable one, in the first page that mean "wrong keys"."""

# Errors after which a fresh connection may well succeed.
_RETRYABLE = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,  # admin shutdown, pg_terminate_backend
    asyncpg.exceptions.CannotConnectNowError,  # the server is starting up or recovering
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.InterfaceError,
    # A backend killed while the connection sat idle can surface as a protocol
    # state error on the next statement rather than as a connection error.
    asyncpg.exceptions.InternalClientError,
    ConnectionError,
    OSError,
    TimeoutError,
)

_SLICE = 250
_REPLANS = 3


def _plan_in_slices(
    operation: Operation, keyring: KeyRing, cells: Sequence[tuple[int, int, str]]
) -> Sealed[list[Cell]]:
    """`plan_cells` over a page, a slice at a time, in the worker thread.

    Fernet holds the GIL; between slices the worker lets go of it
    (`time.sleep(0)`), so an event loop waiting for it runs within a slice's
    crypto (~1 ms) instead of up to a whole page's. Still one thread hop per page.
    """
    planned: list[Cell] = []
    for start in range(0, len(cells), _SLICE):
        if start:
            time.sleep(0)
        planned += plan_cells(operation, keyring, cells[start : start + _SLICE])
    return Sealed(planned)


def _cells(rows: Sequence[asyncpg.Record], width: int) -> list[tuple[int, int, str]]:
    """The non-empty secrets of a page as (row, column, stored value)."""
    return [
        (r, c, value) for r, row in enumerate(rows) for c in range(width) if (value := row[c + 1])
    ]


class Runner:
    """One run over a table (or one shard of it)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        keyring: KeyRing,
        operation: Operation,
        *,
        table: EncryptedTable = TENANTS,
        columns: Sequence[str] | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        shard: tuple[int, int] = (0, 1),
        progress: ProgressCallback | None = None,
        retry_for: float = DEFAULT_RETRY_FOR,
        retry_delay: float = 0.2,
        record: bool = True,
    ) -> None:
        if not isinstance(keyring, KeyRing):
            raise TypeError("keyring must be a tenantstore.KeyRing")
        if batch_size <= 0:
            raise ConfigurationError("batch_size is expected to be greater than zero")
        index, count = shard
        if count <= 0 or not 0 <= index < count:
            raise ConfigurationError("shard is expected as (i, n) with 0 <= i < n")
        if retry_for < 0:
            raise ConfigurationError("retry_for is expected to be zero or greater")
        self.pool = pool
        self.keyring = keyring
        self.operation: Operation = operation
        self.table = table if columns is None else table.only(columns)
        self.batch_size = batch_size
        self.shard_args = (count, index)
        self.progress = progress
        self.retry_for = retry_for
        self.retry_delay = retry_delay
        self.record = record
        self.report = SecretsReport(operation, self.table.qualified_name)
        for column in self.table.secrets:
            self.report.column(column)
        self.sql: RunnerStatements | None = None
        self.last_key: Any = None  # keyset position after the last finished page
        self.started_keyset = False
        self.done = 0
        self.total = 0
        self.run_id: int | None = None
        self.first_page = True

    async def run(self) -> SecretsReport:
        started = time.perf_counter()
        outage_started: float | None = None
        failures = 0
        while True:
            done_before = self.done
            try:
                async with self.pool.acquire() as conn:
                    await self._start(conn)
                    await self._pipeline(conn)
                    await self._finish(conn)
                break
            except _RETRYABLE as exc:
                now = time.monotonic()
                if outage_started is None or self.done > done_before:
                    outage_started, failures = now, 0  # progress since: a new outage
                failures += 1
                self.report.retries += 1
                if now - outage_started >= self.retry_for:
                    raise MigrationError(
                        f"{self.operation} stopped after {now - outage_started:.0f}s without "
                        f"the database ({describe_driver_error(exc)}). Nothing is half-written; "
                        "run the command again to finish."
                    ) from None
                delay = min(self.retry_delay * 2 ** (failures - 1), 5.0)
                logger.warning(
                    "%s: lost the database connection (%s); retrying in %.1fs "
                    "(retry %d, %.0fs of %.0fs allowed)",
                    self.operation, describe_driver_error(exc), delay, failures,
                    now - outage_started, self.retry_for,
                )  # fmt: skip
                await anyio.sleep(delay)
            except MigrationError:  # stopped on purpose (the keys look wrong)
                await self._record_failed()
                raise
            except asyncpg.PostgresError as exc:  # not a connection problem: retrying won't help
                await self._record_failed()
                raise MigrationError(
                    f"{self.operation} of {self.table.qualified_name} stopped: "
                    f"{describe_driver_error(exc)}. Nothing is half-written; fix the cause "
                    "and run the command again."
                ) from None
        self.report.elapsed_seconds = time.perf_counter() - started
        return self.report

    async def _start(self, conn: AnyConnection) -> None:
        if self.sql is None:
            # Checked against the catalog before anything runs or is recorded.
            self.sql = RunnerStatements.build(await resolve_table(conn, self.table))
            self.total = await conn.fetchval(self.sql.count_rows, *self.shard_args)
            if self.progress is not None:
                self.progress(0, self.total)
            if self.record:
                await ensure_tracking_tables(conn)
                self.run_id = await conn.fetchval(
                    TRACK["start_run"], self.operation, self.table.qualified_name
                )
        elif self.run_id is not None:
            await conn.execute(TRACK["touch_run"], self.run_id, self.done)

    async def _record_failed(self) -> None:
        """Mark a run that stopped for good as failed, so `status` does not call it
        interrupted and advise a rerun that would stop the same way."""
        if self.run_id is not None:
            try:
                await self.pool.execute(TRACK["finish_run"], self.run_id, "failed", self.done, None)
            except (*_RETRYABLE, asyncpg.PostgresError):
                pass  # the run stays 'running'; status shows it as interrupted

    async def _finish(self, conn: AnyConnection) -> None:
        if self.run_id is None:
            return
        status = "failed" if self.report.failures else "completed"
        counts = self.report.as_dict()
        del counts["failures"], counts["failed_tenant_ids"]
        await conn.execute(TRACK["finish_run"], self.run_id, status, self.done, json.dumps(counts))
        await self._record_keys(conn)

    async def _record_keys(self, conn: AnyConnection) -> None:
        """Tell tenantstore_keys which keys this run found and made: once per key per run."""
        used = {key_id: False for key_id in self.report.keys}  # found: decrypt-only or as is
        if self.operation in ("encrypt", "rotate") and self.report.changed:
            used[self.keyring.primary_key_id] = True  # made: the primary
        if not used or not await keys_table_exists(conn):
            return
        for key_id, as_primary in sorted(used.items()):
            try:
                await record_key_use(conn, key_id, primary=as_primary)
            except TenantStoreError as exc:  # never the run's failure: it is done
                logger.warning("could not record key %s in tenantstore_keys: %s", key_id, exc)

    async def _read(self, conn: AnyConnection, after: Any, first: bool) -> list[asyncpg.Record]:
        assert self.sql is not None
        if first:
            return await conn.fetch(self.sql.first_page, self.batch_size, *self.shard_args)
        return await conn.fetch(self.sql.next_page, self.batch_size, *self.shard_args, after)

    def _plan(self, rows: list[asyncpg.Record]) -> asyncio.Future[Sealed[list[Cell]]]:
        # Sealed: a future's repr shows its result, and `decrypt` plans plaintexts.
        cells = _cells(rows, len(self.table.secrets))
        return asyncio.ensure_future(
            anyio.to_thread.run_sync(_plan_in_slices, self.operation, self.keyring, cells)
        )

    async def _pipeline(self, conn: AnyConnection) -> None:
        """Read page k+1 and write page k-1 while the crypto of page k runs in a thread."""
        rows = await self._read(conn, self.last_key, not self.started_keyset)
        planned = self._plan(rows) if rows else None
        try:
            while planned is not None:
                next_rows: list[asyncpg.Record] = []
                if len(rows) == self.batch_size:
                    next_rows = await self._read(conn, rows[-1][0], False)
                cells = (await planned).value
                planned = self._plan(next_rows) if next_rows else None
                self._check_first_page(cells)
                outcomes = await self._write(conn, rows, cells)
                # Counted only once the page is written: a page retried after a
                # lost connection is not counted twice.
                self._count(rows, outcomes)
                self.last_key, self.started_keyset = rows[-1][0], True
                self.done += len(rows)
                self.report.rows += len(rows)
                if self.run_id is not None:
                    await conn.execute(TRACK["touch_run"], self.run_id, self.done)
                if self.progress is not None:
                    self.progress(self.done, max(self.total, self.done))
                rows = next_rows
        finally:
            if planned is not None and not planned.done():
                await asyncio.wait([planned])  # the thread cannot be interrupted; let it end

    def _check_first_page(self, cells: list[Cell]) -> None:
        """When no token of the first page decrypts, say once that the keys look wrong.

        `verify` goes on counting; `decrypt` and `rotate` would fail on every
        token, so they stop here, having changed nothing.
        """
        if not self.first_page or self.operation == "encrypt":
            return
        self.first_page = False
        undecryptable = sum(cell.count for cell in cells if cell.reason == "undecryptable")
        decrypted = sum(cell.count for cell in cells if cell.key_id is not None)
        if undecryptable < WRONG_KEY_EVIDENCE or decrypted:
            return  # a few corrupt tokens are failures to list, not a wrong key
        message = (
            f"none of the {undecryptable} tokens in the first page of "
            f"{self.table.qualified_name} decrypts with the configured keys "
            f"({', '.join(self.keyring.key_ids)}): Invalid encrypted data or wrong encryption key"
        )
        if self.operation == "verify":
            logger.error("The keys look wrong: %s", message)
            return
        raise MigrationError(f"{self.operation} stopped, nothing changed: {message}")

    async def _write(
        self, conn: AnyConnection, rows: list[asyncpg.Record], cells: list[Cell]
    ) -> list[Cell]:
        """Write a page; cells the application changed meanwhile are read and planned anew.

        The compare-and-swap leaves such a value alone. Each is looked at
        again with its new value (an application may have written plaintext
        during a rolling deploy) up to `_REPLANS` times; what still moves after
        that is counted as changed concurrently. Returns every secret's final
        outcome: a cell replanned is returned once, as it ended.
        """
        assert self.sql is not None
        stored = _Stored(rows)  # values as read, or as read again after a conflict
        final: list[Cell] = []
        pending: dict[tuple[int, int], Cell] = {}
        for cell in cells:
            if cell.new is None:
                final.append(cell)
            else:
                pending[cell.row, cell.column] = cell
        for attempt in range(_REPLANS + 1):
            if not pending:
                return final
            written = await self._swap(conn, rows, stored, pending)
            final += (pending.pop(place) for place in written)
            if not pending or attempt == _REPLANS:
                break
            keys = list(dict.fromkeys(rows[r][0] for r, _ in pending))
            now = {row[0]: row for row in await conn.fetch(self.sql.current_values, keys)}
            again: list[tuple[int, int, str]] = []
            for r, c in pending:
                current = now.get(rows[r][0])
                value = None if current is None else current[c + 1]
                if value:  # a value deleted or cleared meanwhile is the application's to keep
                    stored[r, c] = value
                    again.append((r, c, value))
            pending = {}
            replanned = await anyio.to_thread.run_sync(
                _plan_in_slices, self.operation, self.keyring, again
            )
            for cell in replanned.value:
                if cell.new is None:
                    final.append(cell)
                else:
                    pending[cell.row, cell.column] = cell
        for cell in pending.values():
            cell.outcome, cell.key_id = "changed_concurrently", None
            final.append(cell)
        return final

    async def _swap(
        self,
        conn: AnyConnection,
        rows: list[asyncpg.Record],
        stored: dict[tuple[int, int], str],
        pending: dict[tuple[int, int], Cell],
    ) -> list[tuple[int, int]]:
        """One compare-and-swap write of the pending cells; returns those written."""
        assert self.sql is not None
        width = len(self.table.secrets)
        order = sorted({r for r, _ in pending})
        arrays: list[list[str | None]] = [[] for _ in range(2 * width)]
        for r in order:
            for c in range(width):
                cell = pending.get((r, c))
                arrays[2 * c].append(None if cell is None else stored[r, c])
                arrays[2 * c + 1].append(None if cell is None else cell.new)
        keys = [rows[r][0] for r in order]
        index = {key: r for key, r in zip(keys, order, strict=True)}
        result = await conn.fetch(self.sql.write_page, keys, keys[0], keys[-1], *arrays)
        return [
            (index[row[0]], c)
            for row in result
            for c in range(width)
            if row[c + 1] and (index[row[0]], c) in pending
        ]

    def _count(self, rows: list[asyncpg.Record], cells: list[Cell]) -> None:
        """Add a written page's final outcomes to the report, in bulk; log the first failures."""
        report, secrets = self.report, self.table.secrets
        tally: Counter[tuple[int, str, str | None]] = Counter()
        for cell in cells:
            tally[cell.column, cell.outcome, cell.key_id] += cell.count
        for (column, outcome, key_id), count in tally.items():
            counts = report.column(secrets[column])
            setattr(counts, outcome, getattr(counts, outcome) + count)
            if key_id is not None:
                counts.keys[key_id] += count
        for cell in cells:
            if cell.outcome == "failed":
                assert cell.reason is not None
                key = rows[cell.row][0]
                report.failures.append(Failure(str(key), secrets[cell.column], cell.reason))
                if report.failed <= LOGGED_FAILURES:
                    self._log_failure(secrets[cell.column], key, cell)

    def _log_failure(self, column: str, key: Any, cell: Cell) -> None:
        who = _who(self.table, key)
        if cell.reason == "undecryptable":
            logger.error("Failed to decrypt %s for %s", self.table.label(column), who)
        elif cell.reason == "nul":
            logger.error(
                "%s of %s holds a NUL character, which PostgreSQL text cannot store: "
                "left encrypted", self.table.label(column), who,
            )  # fmt: skip
        else:
            logger.error(
                "%s of %s decrypts to a Fernet token, which every later step would take "
                "for one: left encrypted", self.table.label(column), who,
            )  # fmt: skip


class _Stored(dict[tuple[int, int], str]):
    """The stored value of each (row, column) of a page: as read, unless read again."""

    def __init__(self, rows: list[asyncpg.Record]) -> None:
        super().__init__()
        self._rows = rows

    def __missing__(self, place: tuple[int, int]) -> str:
        value: str = self._rows[place[0]][place[1] + 1]
        return value


def _who(table: EncryptedTable, key: Any) -> str:
    """`tenant acme` for the tenants table, `key 42 of app.integrations` elsewhere."""
    if table.name == TENANTS.name and table.key == TENANTS.key:
        return f"tenant {printable(str(key))}"
    return f"{printable(table.key)} {printable(str(key))} of {table.qualified_name}"
