"""Audit events for every access to a secret, and the sinks they go to.

An `AuditEvent` says who (the actor of the current request), when, what
(read, write, clear, encrypt, decrypt, rotate, verify), where (table,
column, the row's key, the key id) and how it ended; never the secret.

The actor comes from a context variable the application sets per request::

    with audit_actor("user:42"):
        tenant = await repo.get_tenant("acme")

Sinks: `LoggingSink` (the default: one structured record per event on the
`tenantstore.audit` logger at INFO, which shows nothing until the
application gives that logger a handler, and costs a level check until
then) and `PostgresSink` (`tenantstore.audit.pg`, opted into: batched COPY
into `tenantstore_audit` by a background task, with a bounded buffer that
blocks or drops-and-counts when full, and a session row per sink so that no
loss is silent). Objects that emit events take an `AuditLog` (or build the
default one) and close it in `aclose()`.

Operators read the table with `python -m tenantstore.audit tail|query|sessions`
(and prune it with `prune --before`); see `tenantstore.audit.__main__`.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Literal, Protocol

from ..errors import printable

__all__ = [
    "AuditEvent",
    "AuditLog",
    "AuditSink",
    "LoggingSink",
    "Operation",
    "audit_actor",
    "current_actor",
]

Operation = Literal["read", "write", "clear", "encrypt", "decrypt", "rotate", "verify"]

_ACTOR: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "tenantstore_audit_actor", default=None
)


@contextmanager
def audit_actor(actor: str) -> Iterator[None]:
    """Attribute the audit events of this block (this task and what it awaits) to `actor`."""
    if not isinstance(actor, str) or not actor:
        raise ValueError("actor is expected to be a non-empty str, such as 'user:42'")
    token = _ACTOR.set(actor)
    try:
        yield
    finally:
        _ACTOR.reset(token)


def current_actor() -> str | None:
    """The actor set by the innermost `audit_actor` block, or None."""
    return _ACTOR.get()


def _now() -> datetime:
    return datetime.now(UTC)


class AuditEvent:
    """One access to secrets. Never holds a secret or a token.

    `key` is the row's key (a tenant id); `key_id` the encryption key's id
    (None for plaintext or when none was involved); `count` how many secrets
    the event stands for (1, except for a runner's summary per column);
    `actor` the current `audit_actor` and `at` now, unless given (callers
    building a batch pass them once). Treat it as immutable.

    A plain class with slots rather than a frozen dataclass: events are built
    on the hot path of every audited read, and this is ~3x cheaper to make.
    """

    __slots__ = ("actor", "at", "column", "count", "key", "key_id", "operation", "outcome", "table")

    def __init__(
        self,
        operation: Operation,
        table: str,
        column: str | None,
        key: str | None,
        key_id: str | None,
        outcome: str,
        count: int = 1,
        actor: str | None = None,
        at: datetime | None = None,
    ) -> None:
        self.operation = operation
        self.table = table
        self.column = column
        self.key = key
        self.key_id = key_id
        self.outcome = outcome
        self.count = count
        self.actor = actor if actor is not None else _ACTOR.get()
        self.at = at if at is not None else datetime.now(UTC)

    def _fields(self) -> tuple[object, ...]:
        return (self.operation, self.table, self.column, self.key, self.key_id,
                self.outcome, self.count, self.actor, self.at)  # fmt: skip

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AuditEvent):
            return NotImplemented
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        return (
            f"AuditEvent({self.operation!r}, {self.table!r}, {self.column!r}, {self.key!r}, "
            f"{self.key_id!r}, {self.outcome!r}, count={self.count}, actor={self.actor!r}, "
            f"at={self.at!r})"
        )

    def as_dict(self) -> dict[str, object]:
        """The event as JSON-ready data."""
        return {
            "at": self.at.isoformat(),
            "actor": self.actor,
            "operation": self.operation,
            "table": self.table,
            "column": self.column,
            "key": self.key,
            "key_id": self.key_id,
            "outcome": self.outcome,
            "count": self.count,
        }


class AuditSink(Protocol):
    """Where audit events go. `enabled` must be cheap: it is asked on every access."""

    @property
    def enabled(self) -> bool: ...

    async def emit(self, events: Sequence[AuditEvent]) -> None: ...

    async def aclose(self) -> None: ...


class LoggingSink:
    """Audit events as log records on `tenantstore.audit` (or `logger`), at INFO.

    Each record's message is one line (`audit read tenants.gemini_api_key
    key=acme key_id=... outcome=ok actor=user:42`, names escaped so a key
    cannot forge a line) and the event's fields are on the record as
    `record.audit` (a dict), for structured handlers.
    """

    __slots__ = ("_logger",)

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._logger = logger or logging.getLogger("tenantstore.audit")

    def __repr__(self) -> str:
        return f"<LoggingSink {self._logger.name}>"

    @property
    def enabled(self) -> bool:
        return self._logger.isEnabledFor(logging.INFO)

    async def emit(self, events: Sequence[AuditEvent]) -> None:
        log = self._logger
        for e in events:
            log.info(
                "audit %s %s%s key=%s key_id=%s outcome=%s count=%d actor=%s",
                e.operation,
                printable(e.table),
                "" if e.column is None else "." + printable(e.column),
                "-" if e.key is None else printable(e.key),
                e.key_id or "-",
                e.outcome,
                e.count,
                "-" if e.actor is None else printable(e.actor),
                extra={"audit": e.as_dict()},
            )

    async def aclose(self) -> None:
        return None


class AuditLog:
    """The sinks of one repository, `AsyncCrypto` or runner.

    Args:
        *sinks: where events go; none given means the default `LoggingSink`.
    """

    __slots__ = ("_sinks",)

    def __init__(self, *sinks: AuditSink) -> None:
        self._sinks: tuple[AuditSink, ...] = sinks or (LoggingSink(),)

    def __repr__(self) -> str:
        return f"<AuditLog {', '.join(map(repr, self._sinks))}>"

    @property
    def sinks(self) -> tuple[AuditSink, ...]:
        """The sinks, in order."""
        return self._sinks

    @property
    def enabled(self) -> bool:
        """Whether any sink wants events now (so callers can skip building them)."""
        for sink in self._sinks:  # noqa: SIM110 - a loop, not any(): asked on every audited read
            if sink.enabled:
                return True
        return False

    async def emit(self, events: Sequence[AuditEvent]) -> None:
        """Hand events to every sink that wants them (a sink may apply back-pressure)."""
        if events:
            for sink in self._sinks:
                if sink.enabled:
                    await sink.emit(events)

    async def aclose(self) -> None:
        """Close every sink: a buffering sink writes what it holds first."""
        for sink in self._sinks:
            await sink.aclose()
