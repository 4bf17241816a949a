"""The secrets batch runner: encrypt, decrypt, rotate and verify a whole table.

Per batch: one keyset page is read (never OFFSET), the crypto for the page
runs in one worker-thread call, and the changed values are written back by
one `UPDATE ... FROM unnest(...)` statement guarded by compare-and-swap on
the value read. The pipeline overlaps the crypto of one page with the reading
of the next and the writing of the previous, on a single connection.

Safe to kill at any moment and rerun: every write is a single atomic
statement, a row is only ever changed from the exact value that was read, and
each operation recognises rows already done. A dropped connection is retried
with bounded backoff from the last written page.

Several runners split a table with `shard=(i, n)`: shard i of n takes the rows
whose `hashtextextended(tenant_id, 0)` is i modulo n, so no row is done twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import TypedDict

import anyio
import anyio.to_thread
import asyncpg
from typing_extensions import Unpack

from .._queries import load_queries
from ..db import AnyConnection
from ..encryption import KeyRing
from ..errors import ConfigurationError, MigrationError
from ._tracking import TRACK, ensure_tracking_tables
from .plan import Batch, Operation, SecretsReport, plan_batch

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "Operation",
    "ProgressCallback",
    "RunOptions",
    "SecretsReport",
    "decrypt_secrets",
    "encrypt_secrets",
    "rotate_secrets",
    "verify_secrets",
]

logger = logging.getLogger("tenantstore")

ProgressCallback = Callable[[int, int], None]
"""Called after every batch with (rows done, rows in total)."""

DEFAULT_BATCH_SIZE = 2000
DEFAULT_MAX_RETRIES = 5


class RunOptions(TypedDict, total=False):
    """Keyword options of every batch operation.

    batch_size: rows per keyset page and write (default 2000).
    shard: `(i, n)`: process only shard i of n, to split a table across runners.
    progress: called as `progress(done, total)` after every batch.
    max_retries: consecutive connection failures tolerated (default 5).
    retry_delay: first backoff in seconds, doubled per failure, capped at 5 s.
    """

    batch_size: int
    shard: tuple[int, int]
    progress: ProgressCallback | None
    max_retries: int
    retry_delay: float


_Q = {name: query.sql for name, query in load_queries("secrets.sql").items()}

# Errors after which a fresh connection may well succeed.
_RETRYABLE = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,  # admin shutdown, pg_terminate_backend
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


def _plan_in_slices(operation: Operation, keyring: KeyRing, rows: list[tuple[str, str]]) -> Batch:
    """`plan_batch` over a page, a slice at a time, in the worker thread.

    Fernet holds the GIL; between slices the worker lets go of it
    (`time.sleep(0)`), so an event loop waiting for it runs within a slice's
    crypto (~1 ms) instead of up to a whole page's. Still one thread hop per page.
    """
    batch = Batch()
    for start in range(0, len(rows), _SLICE):
        if start:
            time.sleep(0)
        batch.extend(plan_batch(operation, keyring, rows[start : start + _SLICE]))
    return batch


class _Runner:
    """One run over the table (or one shard of it)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        keyring: KeyRing,
        operation: Operation,
        *,
        batch_size: int,
        shard: tuple[int, int],
        progress: ProgressCallback | None,
        max_retries: int,
        retry_delay: float,
    ) -> None:
        if batch_size <= 0:
            raise ConfigurationError("batch_size is expected to be greater than zero")
        index, count = shard
        if count <= 0 or not 0 <= index < count:
            raise ConfigurationError("shard is expected as (i, n) with 0 <= i < n")
        self.pool = pool
        self.keyring = keyring
        self.operation: Operation = operation
        self.batch_size = batch_size
        self.shard_args = (count, index)
        self.progress = progress
        self.max_retries = max_retries
        self.retry_delay = retry_delay
        self.report = SecretsReport(operation)
        self.last_key: str | None = None  # keyset position after the last finished page
        self.done = 0
        self.total = 0
        self.run_id: int | None = None

    async def run(self) -> SecretsReport:
        started = time.perf_counter()
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
                # The budget is for consecutive failures: progress since the last one resets it.
                failures = 1 if self.done > done_before else failures + 1
                self.report.retries += 1
                if failures > self.max_retries:
                    raise MigrationError(
                        f"{self.operation} stopped after {self.max_retries} retries: lost the "
                        f"database connection ({type(exc).__name__}). Nothing is half-written; "
                        "run the command again to finish."
                    ) from exc
                delay = min(self.retry_delay * 2 ** (failures - 1), 5.0)
                logger.warning(
                    "%s: database connection failed (%s); retrying in %.1fs (%d/%d)",
                    self.operation, type(exc).__name__, delay, failures, self.max_retries,
                )  # fmt: skip
                await anyio.sleep(delay)
            except asyncpg.PostgresError as exc:  # not a connection problem: retrying won't help
                raise MigrationError(
                    f"{self.operation} stopped: {type(exc).__name__}: {exc}. "
                    "Nothing is half-written; fix the cause and run the command again."
                ) from exc
        self.report.elapsed_seconds = time.perf_counter() - started
        return self.report

    async def _start(self, conn: AnyConnection) -> None:
        if self.run_id is None:
            await ensure_tracking_tables(conn)
            self.total = await conn.fetchval(_Q["count_rows"], *self.shard_args)
            self.run_id = await conn.fetchval(TRACK["start_run"], self.operation)
        else:
            await conn.execute(TRACK["touch_run"], self.run_id, self.done)

    async def _finish(self, conn: AnyConnection) -> None:
        status = "failed" if self.report.failed_tenant_ids else "completed"
        counts = json.dumps(
            {k: v for k, v in self.report.as_dict().items() if k != "failed_tenant_ids"}
        )
        await conn.execute(TRACK["finish_run"], self.run_id, status, self.done, counts)

    async def _read(self, conn: AnyConnection, after: str | None) -> list[tuple[str, str]]:
        if after is None:
            rows = await conn.fetch(_Q["first_page"], self.batch_size, *self.shard_args)
        else:
            rows = await conn.fetch(_Q["next_page"], self.batch_size, *self.shard_args, after)
        return [(row[0], row[1]) for row in rows]

    def _plan(self, rows: list[tuple[str, str]]) -> asyncio.Future[Batch]:
        return asyncio.ensure_future(
            anyio.to_thread.run_sync(_plan_in_slices, self.operation, self.keyring, rows)
        )

    async def _pipeline(self, conn: AnyConnection) -> None:
        """Read page k+1 and write page k-1 while the crypto of page k runs in a thread."""
        rows = await self._read(conn, self.last_key)
        planned = self._plan(rows) if rows else None
        try:
            while planned is not None:
                next_rows = (
                    await self._read(conn, rows[-1][0]) if len(rows) == self.batch_size else []
                )
                batch = await planned
                planned = self._plan(next_rows) if next_rows else None
                await self._write(conn, batch)
                self._account(batch, len(rows), rows[-1][0])
                await conn.execute(TRACK["touch_run"], self.run_id, self.done)
                rows = next_rows
        finally:
            if planned is not None and not planned.done():
                await asyncio.wait([planned])  # the thread cannot be interrupted; let it end

    async def _write(self, conn: AnyConnection, batch: Batch) -> None:
        """Write a batch; rows the application changed meanwhile are read and planned anew.

        The compare-and-swap leaves such rows alone. Each is looked at again
        with its new value (an application may have written plaintext during a
        rolling deploy) up to `_REPLANS` times; what still moves after that is
        counted as changed concurrently.
        """
        ids, old, new = batch.ids, batch.old, batch.new
        for attempt in range(_REPLANS + 1):
            if not ids:
                return
            status = await conn.execute(_Q["write_batch"], ids, old, new, ids[0], ids[-1])
            written = int(status.rsplit(" ", 1)[1])
            self.report.changed += written
            if written == len(ids) or attempt == _REPLANS:
                break
            ours = dict(zip(ids, new, strict=True))
            rows = await conn.fetch(_Q["current_values"], ids)
            moved = [(r[0], r[1]) for r in rows if r[1] and r[1] != ours[r[0]]]
            again = await anyio.to_thread.run_sync(
                _plan_in_slices, self.operation, self.keyring, moved
            )
            self._count(again)
            ids, old, new = again.ids, again.old, again.new
            written = 0
        self.report.changed_concurrently += len(ids) - written

    def _count(self, batch: Batch) -> None:
        report = self.report
        report.skipped += batch.skipped
        report.current += batch.current
        report.previous += batch.previous
        report.plaintext += batch.plaintext
        for tenant_id in batch.failed:
            logger.error("Failed to decrypt Gemini API key for tenant %s", tenant_id)
        for tenant_id in batch.unstorable:
            logger.error(
                "Gemini API key of tenant %s holds a NUL character, which PostgreSQL text "
                "cannot store: left encrypted",
                tenant_id,
            )
        report.failed_tenant_ids += batch.failed + batch.unstorable

    def _account(self, batch: Batch, rows: int, last_key: str) -> None:
        self._count(batch)
        self.last_key = last_key
        self.done += rows
        if self.progress is not None:
            self.progress(self.done, max(self.total, self.done))


async def _run(
    operation: Operation,
    pool: asyncpg.Pool,
    keyring: KeyRing,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    shard: tuple[int, int] = (0, 1),
    progress: ProgressCallback | None = None,
    max_retries: int = DEFAULT_MAX_RETRIES,
    retry_delay: float = 0.2,
) -> SecretsReport:
    runner = _Runner(
        pool,
        keyring,
        operation,
        batch_size=batch_size,
        shard=shard,
        progress=progress,
        max_retries=max_retries,
        retry_delay=retry_delay,
    )
    report = await runner.run()
    logger.info("%s (%.1fs)", report.summary(), report.elapsed_seconds)
    if report.changed_concurrently:
        logger.warning(
            "%d rows changed concurrently and were left as the application wrote them; "
            "run the command again to cover them",
            report.changed_concurrently,
        )
    return report


async def encrypt_secrets(
    pool: asyncpg.Pool, keyring: KeyRing, **options: Unpack[RunOptions]
) -> SecretsReport:
    """Encrypt every plaintext secret; tokens are recognised structurally and skipped.

    Options: see `RunOptions`.

    Raises:
        MigrationError: the connection kept failing after the retries.
    """
    return await _run("encrypt", pool, keyring, **options)


async def decrypt_secrets(
    pool: asyncpg.Pool, keyring: KeyRing, **options: Unpack[RunOptions]
) -> SecretsReport:
    """Decrypt every token back to plaintext (a rollback); options as `encrypt_secrets`.

    A token no key decrypts is left as it is and listed in `failed_tenant_ids`.
    """
    return await _run("decrypt", pool, keyring, **options)


async def rotate_secrets(
    pool: asyncpg.Pool, keyring: KeyRing, **options: Unpack[RunOptions]
) -> SecretsReport:
    """Re-encrypt under the primary key every token made with a previous key.

    Plaintext values are counted in `plaintext` and left for `encrypt_secrets`.
    """
    return await _run("rotate", pool, keyring, **options)


async def verify_secrets(
    pool: asyncpg.Pool, keyring: KeyRing, **options: Unpack[RunOptions]
) -> SecretsReport:
    """Decrypt every token and count current-key, previous-key, plaintext and undecryptable rows.

    Writes nothing to the tenants table.
    """
    return await _run("verify", pool, keyring, **options)
