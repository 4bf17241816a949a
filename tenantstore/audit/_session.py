"""The database side of a `PostgresSink`: its session row and its COPY batches.

The statements are in `sql/audit.sql`; the tables come from migration 0006.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from .._queries import load_queries
from ..db import check_database_url
from ..errors import printable
from . import AuditEvent

__all__ = ["AUDIT_COLUMNS", "AUDIT_TABLE", "SQL", "Session"]

SQL = {name: query.sql for name, query in load_queries("audit.sql").items()}
AUDIT_TABLE = "tenantstore_audit"
AUDIT_COLUMNS = (
    "at", "actor", "operation", "table_name", "column_name", "row_key", "key_id", "outcome",
    "count", "process", "seq",
)  # fmt: skip

Counts = tuple[int, int, int]
"""A session's (issued, written, dropped)."""


class Session:
    """One sink's identity (`host:pid:random`) and connections: the given pool, or its own.

    Raises:
        ConfigurationError: a malformed URL.
        TypeError: neither a pool nor a URL.
    """

    __slots__ = ("_dsn", "_pool", "process")

    def __init__(self, pool_or_dsn: asyncpg.Pool | str) -> None:
        self._pool: asyncpg.Pool | None = None
        self._dsn: str | None = None
        if isinstance(pool_or_dsn, str):
            self._dsn = check_database_url(pool_or_dsn)
        elif isinstance(pool_or_dsn, asyncpg.Pool):
            self._pool = pool_or_dsn
        else:
            raise TypeError("pool_or_dsn is expected to be an asyncpg.Pool or a URL")
        self.process = f"{printable(socket.gethostname())}:{os.getpid()}:{secrets.token_hex(4)}"

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Any]:
        """A connection for one batch: from the pool, made at first use for a URL."""
        if self._pool is None:
            assert self._dsn is not None
            self._pool = await asyncpg.create_pool(self._dsn, min_size=0, max_size=1)
        async with self._pool.acquire() as conn:
            yield conn

    async def record(
        self, conn: Any, counts: Counts, *, flushed: bool = False, closed: bool = False
    ) -> None:
        """Create or update the session's row with `counts`; mark a flush or the close."""
        await conn.execute(SQL["record_session"], self.process, *counts, flushed, closed)

    async def written(self, conn: Any) -> int:
        """How many events the session's row says are written (committed with them)."""
        return int(await conn.fetchval(SQL["session_written"], self.process) or 0)

    async def copy(
        self,
        conn: Any,
        events: Iterable[AuditEvent],
        first: int,
        counts: Counts,
        *,
        escape: bool = False,
    ) -> None:
        """COPY `events` (numbered from `first`) and record `counts`, in one transaction.

        With `escape`, every name is escaped as by `printable` (for values the
        server refuses: a NUL, a lone surrogate).
        """
        process = self.process
        records: list[tuple[Any, ...]] = [
            (e.at, e.actor, e.operation, e.table, e.column, e.key, e.key_id, e.outcome, e.count,
             process, seq)
            for seq, e in enumerate(events, first)
        ]  # fmt: skip
        if escape:
            records = [
                tuple(printable(v) if isinstance(v, str) else v for v in record)
                for record in records
            ]
        async with conn.transaction():
            await conn.copy_records_to_table(AUDIT_TABLE, records=records, columns=AUDIT_COLUMNS)
            await self.record(conn, counts, flushed=True)

    async def aclose(self) -> None:
        """Close the pool made from a URL (a given pool stays its owner's)."""
        if self._dsn is not None and self._pool is not None:
            await self._pool.close()
