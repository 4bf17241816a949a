"""The secrets batch runner: encrypt, decrypt, rotate and verify any encrypted table.

Per page: one keyset page is read (never OFFSET) with every secret column of
the run, the crypto for all of its secrets runs in one worker-thread call,
and the new values are written back by one `UPDATE ... FROM unnest(...)`
statement with a compare-and-swap per column. The pipeline overlaps the
crypto of one page with the reading of the next and the writing of the
previous, on a single connection.

Safe to kill at any moment and rerun: every write is a single atomic
statement, a value is only ever changed from the exact value that was read,
and each operation recognises values already done. A dropped connection is
retried with backoff, from the last written page, for `retry_for` seconds.

Several runners split a table with `shard=(i, n)`: shard i of n takes the rows
whose `hashtextextended(key::text, 0)` is i modulo n, so no row is done twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TypedDict

import asyncpg
from opentelemetry.metrics import MeterProvider
from typing_extensions import Unpack

from ..audit import AuditEvent, AuditLog
from ..encryption import KeyRing
from ..metrics import Metrics
from ..tables import EncryptedTable
from ._runner import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_RETRY_FOR,
    LOGGED_FAILURES,
    WRONG_KEY_EVIDENCE,
    ProgressCallback,
    Runner,
)
from .plan import Operation, SecretsReport
from .progress import LogProgress, TqdmProgress

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_RETRY_FOR",
    "WRONG_KEY_EVIDENCE",
    "Operation",
    "ProgressCallback",
    "RunOptions",
    "SecretsReport",
    "decrypt_secrets",
    "encrypt_secrets",
    "rotate_secrets",
    "run_operation",
    "verify_secrets",
]

logger = logging.getLogger("tenantstore")


class RunOptions(TypedDict, total=False):
    """Keyword options of every batch operation.

    table: the `EncryptedTable` to run over (default: `TENANTS`).
    columns: only these of its secret columns (default: all of them).
    batch_size: rows per keyset page and write (default 2000).
    shard: `(i, n)`: process only shard i of n, to split a table across runners.
    progress: called as `progress(done, total)` after every page.
    retry_for: seconds a lost connection is retried, from its first failure
        since the last progress (default 60: a normal crash recovery).
    retry_delay: first backoff in seconds, doubled per failure, capped at 5 s.
    audit: where the run's audit events go (default: the `tenantstore.audit` logger).
    meter_provider: where the run's metrics go (default: OpenTelemetry's global provider).
    """

    table: EncryptedTable
    columns: Sequence[str] | None
    batch_size: int
    shard: tuple[int, int]
    progress: ProgressCallback | None
    retry_for: float
    retry_delay: float
    audit: AuditLog | None
    meter_provider: MeterProvider | None


async def run_operation(
    operation: Operation,
    pool: asyncpg.Pool,
    keyring: KeyRing,
    *,
    record: bool = True,
    **options: Unpack[RunOptions],
) -> SecretsReport:
    """Run one operation, log its summary, record its metrics and audit events.

    `record=False` leaves the tracking table alone (`status` is read-only).
    """
    audit = options.get("audit") or AuditLog()
    metrics = Metrics(options.get("meter_provider"))
    engine = {k: v for k, v in options.items() if k not in ("audit", "meter_provider")}
    runner = Runner(pool, keyring, operation, record=record, **engine)  # type: ignore[arg-type]
    started = time.perf_counter()
    outcome = "failed"
    try:
        report = await runner.run()
        outcome = "failed" if report.failures else "completed"
    finally:
        table = runner.table.qualified_name
        metrics.run_finished(operation, table, time.perf_counter() - started, outcome)
        for column, counts in runner.report.columns.items():
            for name, value in counts.as_dict().items():
                if name != "keys":
                    metrics.runner_secrets(operation, table, column, name, value)
        if audit.enabled:
            key_id = keyring.primary_key_id if operation in ("encrypt", "rotate") else None
            await audit.emit(
                [
                    AuditEvent(operation, table, column, None, key_id, outcome, counts.changed)
                    for column, counts in runner.report.columns.items()
                ]
            )
    progress = options.get("progress")
    if isinstance(progress, TqdmProgress | LogProgress):
        progress.close()  # the bar ends before the summary line, not under it
    if report.failed > LOGGED_FAILURES:
        logger.error(
            "... and %d more secrets failed (every one is listed by key and column in --json)",
            report.failed - LOGGED_FAILURES,
        )
    logger.info("%s (%.1fs)", report.summary(), report.elapsed_seconds)
    if report.changed_concurrently:
        logger.warning(
            "%d secrets changed concurrently and were left as the application wrote them; "
            "run the command again to cover them",
            report.changed_concurrently,
        )
    return report


async def encrypt_secrets(
    pool: asyncpg.Pool, keyring: KeyRing, **options: Unpack[RunOptions]
) -> SecretsReport:
    """Encrypt every plaintext secret; tokens are recognised structurally and skipped.

    Options: see `RunOptions` (`table=`, `columns=` for any declared table).

    Raises:
        TableDefinitionError: the table does not fit its declaration; nothing ran.
        MigrationError: the database failed, or stayed away for `retry_for` seconds.
    """
    return await run_operation("encrypt", pool, keyring, **options)


async def decrypt_secrets(
    pool: asyncpg.Pool, keyring: KeyRing, **options: Unpack[RunOptions]
) -> SecretsReport:
    """Decrypt every token back to plaintext (a rollback); options as `encrypt_secrets`.

    A token no key decrypts, or whose plaintext PostgreSQL cannot store or
    would be read as a token, is left as it is and listed in `failures`.
    """
    return await run_operation("decrypt", pool, keyring, **options)


async def rotate_secrets(
    pool: asyncpg.Pool, keyring: KeyRing, **options: Unpack[RunOptions]
) -> SecretsReport:
    """Re-encrypt under the primary key every token made with a previous key.

    Plaintext values are counted in `plaintext` and left for `encrypt_secrets`.
    """
    return await run_operation("rotate", pool, keyring, **options)


async def verify_secrets(
    pool: asyncpg.Pool, keyring: KeyRing, **options: Unpack[RunOptions]
) -> SecretsReport:
    """Decrypt every token and count, per column and key id, current-key,
    previous-key, plaintext and undecryptable secrets. Writes nothing to the table."""
    return await run_operation("verify", pool, keyring, **options)
