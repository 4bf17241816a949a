"""`PostgresSink`: audit events into PostgreSQL, written in batches by a background task.

`emit` appends the events to a bounded in-memory buffer and returns; a task
of the sink's own (started on the first `emit`, on that event loop) writes
them with COPY into `tenantstore_audit` (migration 0006), a batch per
transaction, on a connection taken from the pool for each batch. When the
buffer is full, `on_full="block"` makes `emit` wait for room (back-pressure
on the request that produced the events) and `on_full="drop"` drops the
events, counts them (`tenantstore.audit.dropped`) and logs how many, at most
once per `interval`. A failed write (the database down, the connection cut)
is logged and retried with backoff; the events stay buffered meanwhile.

Nothing is lost silently. Each sink is a session, `host:pid:random`, with a
row in `tenantstore_audit_sessions` holding how many events it was given
(`issued`), wrote and dropped, updated in the transaction of each batch (and
`issued` again just before it), and `closed_at` set by `aclose()`. After a
`kill -9`, `issued - written - dropped` is what was still buffered as of the
last flush, and `closed_at` stays empty; `python -m tenantstore.audit
sessions` lists such sessions. Every event row carries its session and a
sequence number (`seq`, 1, 2, ... in the order `emit` accepted them).

Instruments: see `tenantstore.audit._figures`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from itertools import islice
from typing import Any, Literal

import asyncpg
from opentelemetry.metrics import MeterProvider

from ..errors import ConfigurationError, TenantStoreError, describe_driver_error
from . import AuditEvent
from ._figures import DropLog, figures_for
from ._session import SQL, Session

__all__ = ["AuditWriterError", "PostgresSink", "audit_table_exists"]

logger = logging.getLogger("tenantstore")

# Errors worth retrying: the server or the connection failed (a missing table
# too: logged at each attempt until someone runs `migrate up`). asyncpg raises
# InternalClientError ("another operation is in progress") when the server
# ends a connection in the middle of a statement.
_RETRIED = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions._base.InternalClientError,
    OSError,
    TimeoutError,
)
# A batch the server refuses for its values (a NUL or a lone surrogate in an
# actor): written again with names escaped, else dropped and counted. The
# first is PostgreSQL's class 22, the second asyncpg's own encoding failure.
_REFUSED = (asyncpg.DataError, asyncpg.exceptions._base.DataError, UnicodeError)
_FIRST_DELAY, _MAX_DELAY = 0.05, 5.0
_CLOSE_SESSION_TIMEOUT = 2.0


async def audit_table_exists(conn: Any) -> bool:
    """Whether `tenantstore_audit` exists (migration 0006 is applied); `conn` or a pool."""
    return bool(await conn.fetchval(SQL["audit_table_exists"]))


class AuditWriterError(TenantStoreError):
    """The sink's writer stopped on an unexpected error (with on_full="block", emit raises it)."""


class PostgresSink:
    """An `AuditSink` writing to `tenantstore_audit` in batches (COPY) from a background task.

    Use it on one event loop; close it (`await sink.aclose()`, `async with`,
    or through `AuditLog.aclose()` and the repository's `aclose()`) so it
    writes what it holds and marks its session closed, and do so before
    closing the pool it writes through.

    Args:
        pool_or_dsn: an asyncpg pool (a connection is taken per batch), or a
            URL for a one-connection pool of the sink's own.
        buffer: the most events held in memory.
        batch: the most events per COPY (and transaction).
        interval: how long an event may wait for a batch to fill before it
            is written; also the shortest time between two "dropped" log lines.
        on_full: "block" (emit waits for room) or "drop" (emit drops and counts).
        close_timeout: how long `aclose()` waits for the buffer to be written.
        meter_provider: where the instruments go (default: the global provider).

    Raises:
        ConfigurationError: a size or interval out of range, an unknown
            `on_full`, or a malformed URL.
    """

    def __init__(
        self,
        pool_or_dsn: asyncpg.Pool | str,
        *,
        buffer: int = 10_000,
        batch: int = 1_000,
        interval: float = 0.2,
        on_full: Literal["block", "drop"] = "block",
        close_timeout: float = 10.0,
        meter_provider: MeterProvider | None = None,
    ) -> None:
        if buffer < 1 or batch < 1:
            raise ConfigurationError("buffer and batch are expected to be at least 1")
        if not interval > 0 or not close_timeout >= 0:
            raise ConfigurationError("interval is expected > 0 and close_timeout >= 0")
        if on_full not in ("block", "drop"):
            raise ConfigurationError('on_full is expected to be "block" or "drop"')
        self._session = Session(pool_or_dsn)
        self._buffer: deque[AuditEvent] = deque()
        self._capacity = buffer
        self._batch = min(batch, buffer)
        self._interval = interval
        self._block = on_full == "block"
        self._close_timeout = close_timeout
        self._issued = self._written = self._dropped = 0  # the session's counts
        self._done = 0  # events that left the buffer: written, or refused and dropped
        self._writer: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()  # for the writer: events to write, or closing
        self._room = asyncio.Event()  # for blocked emitters: events left the buffer
        self._progress = asyncio.Event()  # for flush(): events left the buffer
        self._urgent = 0  # flush() waits: write without waiting for a full batch
        self._uncertain = False  # a batch's COMMIT may have happened unacknowledged
        self._closing = self._closed = self._session_closed = False
        self._failure: BaseException | None = None
        self._figures = figures_for(meter_provider)
        self._figures.sinks.add(self)
        self._drops = DropLog(f"the PostgreSQL sink {self.process}", interval)

    def __repr__(self) -> str:
        return f"<PostgresSink {self.process} buffered={len(self._buffer)}>"

    async def __aenter__(self) -> PostgresSink:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def process(self) -> str:
        """This sink's session, `host:pid:random`: the `process` of its rows."""
        return self._session.process

    @property
    def enabled(self) -> bool:
        """Always True: even after close, events are counted (as dropped), never ignored."""
        return True

    @property
    def buffered(self) -> int:
        """Events accepted and not yet written."""
        return len(self._buffer)

    @property
    def counts(self) -> dict[str, int]:
        """The session's counts so far: issued, written, dropped, and buffered."""
        return {
            "issued": self._issued,
            "written": self._written,
            "dropped": self._dropped,
            "buffered": len(self._buffer),
        }

    # -- taking events ---------------------------------------------------------

    async def emit(self, events: Sequence[AuditEvent]) -> None:
        """Buffer `events` for the writer; wait for room, or drop, when the buffer is full.

        Raises:
            AuditWriterError: the writer stopped on an unexpected error and
                `on_full` is "block" (with "drop", the events are counted instead).
        """
        count = len(events)
        buffer = self._buffer
        if count <= self._capacity - len(buffer) and not self._closing and self._failure is None:
            if self._writer is None:
                self._writer = asyncio.get_running_loop().create_task(
                    self._run(), name=f"tenantstore audit writer {self.process}"
                )
                self._writer.add_done_callback(self._writer_done)
            buffer.extend(events)
            self._issued += count
            if len(buffer) == count or len(buffer) >= self._batch:
                self._wake.set()
            return
        await self._emit_slowly(events)

    async def _emit_slowly(self, events: Sequence[AuditEvent]) -> None:
        done = 0
        while done < len(events):
            left = len(events) - done
            if self._closing:
                self._drop(left, "closed")
                return
            if self._failure is not None:
                if self._block:  # the caller hears of it: these events were never taken
                    raise AuditWriterError(
                        f"the audit writer stopped: {describe_driver_error(self._failure)}"
                    )
                self._issued += left
                self._drop(left, "writer_failed")
                return
            room = self._capacity - len(self._buffer)
            if room > 0:
                take = min(room, left)
                await self.emit(events[done : done + take])  # fits: taken at once
                done += take
            elif self._block:
                self._wake.set()
                self._room.clear()
                await self._room.wait()
            else:
                self._issued += left
                self._drop(left, "full")
                return

    def _drop(self, count: int, reason: str) -> None:
        """Count dropped events (metric, session) and log them, one line per interval at most."""
        if reason != "closed":
            self._dropped += count  # the session's count (a closed session's is final)
        self._figures.dropped[reason] += count
        self._drops.add(count, reason)

    async def flush(self) -> None:
        """Wait until every event accepted so far is written (for tests and checkpoints).

        Raises:
            AuditWriterError: the writer stopped, or the sink closed, first.
        """
        target = self._done + len(self._buffer)
        self._urgent += 1
        try:
            while self._done < target:
                writer = self._writer
                if writer is None or writer.done():
                    raise AuditWriterError("the audit writer is not running: events not written")
                self._wake.set()
                self._progress.clear()
                progress = asyncio.ensure_future(self._progress.wait())
                try:
                    await asyncio.wait([progress, writer], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    progress.cancel()
        finally:
            self._urgent -= 1

    # -- the writer ------------------------------------------------------------

    async def _run(self) -> None:
        await self._retrying("start its session", self._record)
        while True:
            await self._gather()
            if not self._buffer:
                if self._closing:
                    break
                continue
            await self._retrying("write", self._write_batch)
        await self._retrying("close its session", lambda: self._record(closed=True))
        self._session_closed = True

    async def _gather(self) -> None:
        """Wait for a full batch, `interval` after events arrive, close, or flush()."""
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        while (
            len(self._buffer) < self._batch
            and not self._closing
            and not (self._urgent and self._buffer)
        ):
            if self._buffer and deadline is None:
                deadline = loop.time() + self._interval
            self._wake.clear()
            if deadline is None:
                await self._wake.wait()
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._wake.wait()

    async def _retrying(self, what: str, step: Callable[[], Awaitable[None]]) -> None:
        """Run `step` until it succeeds, logging each failure and backing off."""
        delay, failures = _FIRST_DELAY, 0
        while True:
            try:
                await step()
            except _REFUSED:
                raise  # PostgreSQL's class 22 is a PostgresError, but no retry cures it
            except _RETRIED as exc:
                failures += 1
                self._figures.failures += 1
                logger.warning(
                    "audit: the PostgreSQL sink %s could not %s (attempt %d, %d events "
                    "buffered): %s; retrying in %.2f s",
                    self.process,
                    what,
                    failures,
                    len(self._buffer),
                    describe_driver_error(exc),
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, _MAX_DELAY)
            else:
                if failures:
                    logger.warning(
                        "audit: the PostgreSQL sink %s wrote again after %d failed attempts",
                        self.process,
                        failures,
                    )
                return

    async def _record(self, *, closed: bool = False) -> None:
        async with self._session.connection() as conn:
            counts = (self._issued, self._written, self._dropped)
            await self._session.record(conn, counts, closed=closed)

    async def _write_batch(self) -> None:
        """Write the oldest events (up to a batch) and the session's counts in one transaction."""
        session = self._session
        async with session.connection() as conn:
            if self._uncertain:  # did the last batch commit after all? Its session row says.
                written = await session.written(conn)
                if written > self._written:
                    self._consumed(written - self._written)
                self._uncertain = False
            count = min(len(self._buffer), self._batch)
            if not count:
                return
            # First, on its own: a kill during a slow COPY leaves these events counted.
            await session.record(conn, (self._issued, self._written, self._dropped))
            counts = (self._issued, self._written + count, self._dropped)
            events = islice(self._buffer, count)
            self._uncertain = True
            try:
                await session.copy(conn, events, self._written + 1, counts)
            except _REFUSED as exc:
                logger.warning(
                    "audit: PostgreSQL refused a batch of %d events (%s); writing it with "
                    "names escaped",
                    count,
                    describe_driver_error(exc),
                )
                try:
                    events = islice(self._buffer, count)
                    await session.copy(conn, events, self._written + 1, counts, escape=True)
                except _REFUSED:
                    self._uncertain = False
                    self._consumed(count, written=False)
                    self._drop(count, "rejected")
                    return
            self._uncertain = False
            self._consumed(count)

    def _consumed(self, count: int, *, written: bool = True) -> None:
        """The oldest `count` events are written (or dropped): take them off the buffer."""
        for _ in range(count):
            self._buffer.popleft()
        self._done += count
        if written:
            self._written += count
            self._figures.written += count
        self._room.set()
        self._progress.set()

    def _writer_done(self, task: asyncio.Task[None]) -> None:
        self._room.set()
        self._progress.set()
        if task.cancelled() or (failure := task.exception()) is None:
            return
        self._failure = failure
        lost = len(self._buffer)
        logger.error(
            "audit: the PostgreSQL sink %s stopped on an unexpected error (%s); %d buffered "
            "events are lost",
            self.process,
            describe_driver_error(failure),
            lost,
        )
        self._buffer.clear()
        self._drop(lost, "writer_failed")

    # -- closing -----------------------------------------------------------------

    # Not the caller's asyncio.timeout: at the timeout, the writer is stopped
    # and what it could not write is counted, which a cancellation would skip.
    async def aclose(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Stop taking events, write what is buffered, and mark the session closed.

        Args:
            timeout: seconds to wait for that (default: `close_timeout`). Events
                still buffered then are lost: logged, counted as dropped
                ("unflushed"), and left as `issued - written - dropped` in a
                session marked closed (when the database can be reached).
        """
        if self._closed:
            return
        self._closing = True
        self._wake.set()
        self._room.set()
        writer = self._writer
        wait = self._close_timeout if timeout is None else timeout
        try:
            if writer is not None:
                if not writer.done():
                    await asyncio.wait([writer], timeout=wait)
                if not writer.done():
                    writer.cancel()
                    await asyncio.wait([writer])
                if not self._session_closed:  # timed out, or the writer had stopped
                    await self._lost_at_close(wait)
        finally:
            self._closed = True
            self._drops.close()
            await self._session.aclose()

    async def _lost_at_close(self, waited: float) -> None:
        lost = len(self._buffer)
        if lost:
            logger.error(
                "audit: the PostgreSQL sink %s could not write %d events within %.1f s of "
                "closing: they are lost (counted in tenantstore_audit_sessions if reachable)",
                self.process,
                lost,
                waited,
            )
            self._figures.dropped["unflushed"] += lost
            self._buffer.clear()
        try:
            async with asyncio.timeout(_CLOSE_SESSION_TIMEOUT):
                await self._record(closed=True)
        except (*_RETRIED, *_REFUSED) as exc:
            logger.error(
                "audit: the PostgreSQL sink %s could not mark its session closed: %s",
                self.process,
                describe_driver_error(exc),
            )
