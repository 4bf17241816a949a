"""The key table `tenantstore_keys`: which key ids the database has seen, and their states.

Writers and the batch runner call `record_key_use` (through a per-process
`KeyUseRecorder`, at most once per key id per interval): the table then
knows every key id that has encrypted a secret, when it was first and last
used, and which one is primary. `keys list` and `keys check` read it;
`keys retire` marks a key no secret is under any more.

A key id is 12 hex characters (`tenantstore.encryption.key_id`); anything
else is refused before it reaches the database, so a key passed by mistake
is never stored.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from .._queries import load_queries
from ..errors import TenantStoreError, database_error, describe_driver_error

__all__ = [
    "DEFAULT_RECORD_INTERVAL",
    "KeyUseRecorder",
    "KnownKey",
    "check_key_id",
    "keys_table_exists",
    "list_known_keys",
    "record_key_use",
]

logger = logging.getLogger("tenantstore")

Q = load_queries("keys.sql")

DEFAULT_RECORD_INTERVAL = 300.0
"""Seconds between two records of the same key id by one `KeyUseRecorder`."""

_KEY_ID = re.compile(r"[0-9a-f]{12}")
# Each try that loses a race for the primary lets another writer win: a few
# suffice for a rolling deploy's handful of writers with different primaries.
_ATTEMPTS = 5
_DRIVER_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)


def check_key_id(key_id: object) -> str:
    """Return `key_id` if it is a key id (12 lowercase hex characters).

    Raises:
        ValueError: it is not; the message does not echo it (it could be a key).
    """
    if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
        raise ValueError("a key id is 12 lowercase hex characters (see `keys list`)")
    return key_id


@dataclass(frozen=True, slots=True)
class KnownKey:
    """A row of `tenantstore_keys`, without the wrapped key itself."""

    key_id: str
    state: str
    first_used_at: datetime | None
    last_used_at: datetime | None
    created_at: datetime
    wrapped: bool
    wrapped_by: str | None
    wrapped_at: datetime | None


async def keys_table_exists(conn: Any) -> bool:
    """Whether `tenantstore_keys` exists (migration 0005 is applied); `conn` or a pool."""
    return bool(await conn.fetchval(Q["keys_table_exists"].sql))


async def list_known_keys(conn: Any) -> list[KnownKey]:
    """Every key the database knows: primary, then decrypt-only, then retired.

    Raises:
        asyncpg.UndefinedTableError: migration 0005 is not applied.
    """
    return [KnownKey(*row) for row in await conn.fetch(Q["list_keys"].sql)]


async def record_key_use(conn: Any, key_id: str, *, primary: bool) -> None:
    """Record that key `key_id` encrypted (or decrypted) a secret just now. One statement.

    Sets the key's first and last use. With `primary`, the key becomes the
    primary and the previous primary decrypt-only, in the same statement;
    wrapped data keys (envelope mode) are the exception: only
    `keys new-data-key` changes which one is primary. A retired key that is
    used again goes back to decrypt-only, and a warning says so.

    Args:
        conn: a connection (in a transaction or not) or a pool.
        key_id: the key's id (`KeyRing.primary_key_id`, `KeyRing.key_ids[i]`).
        primary: whether the caller used it as its primary key (to encrypt).

    Raises:
        ValueError: `key_id` is not a key id.
        DatabaseError: the statement failed (`tenantstore_keys` missing:
            migration 0005 is not applied); the message holds no value.
    """
    check_key_id(key_id)
    # A pool has no is_in_transaction; a connection (or the pool's proxy of one) does.
    in_transaction = bool(getattr(conn, "is_in_transaction", lambda: False)())
    failure: BaseException | None = None
    for attempt in range(_ATTEMPTS):
        try:
            row = await conn.fetchrow(Q["record_key_use"].sql, key_id, primary)
        except asyncpg.UniqueViolationError as exc:
            # Another process made its own key primary at the same moment: the
            # next try sees that key committed and demotes it (outside a
            # transaction only, which the failed statement would have aborted).
            failure = exc
            if attempt + 1 < _ATTEMPTS and not in_transaction:
                continue
            break
        except _DRIVER_ERRORS as exc:
            failure = exc
            break
        if row is not None and row["was"] == "retired":
            logger.warning(
                "key %s was retired but is in use again: it is decrypt-only now "
                "(`keys list` shows it; retire it again once no secret is under it)",
                key_id,
            )
        return
    assert failure is not None
    raise database_error(failure, "record_key_use") from None


class KeyUseRecorder:
    """Records key use for one process, at most once per key id and role per interval.

    Writers call `await recorder.record(keyring.primary_key_id, primary=True)`
    after a write: the first call, and the first after each interval, runs
    `record_key_use`; the others return at once without I/O. A failure is
    logged as a warning (sanitised: no value from the database) and never
    raised into the caller's write.

    Args:
        pool: where the record goes when the caller passes no connection.
        interval: seconds between two records of the same key id and role.
        clock: a monotonic clock in seconds (tests inject a fake one).
    """

    def __init__(
        self,
        pool: Any,
        *,
        interval: float = DEFAULT_RECORD_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval < 0:
            raise ValueError("interval is expected to be zero or greater")
        self._pool = pool
        self._interval = interval
        self._clock = clock
        self._last: dict[tuple[str, bool], float] = {}

    def __repr__(self) -> str:
        return f"<KeyUseRecorder interval={self._interval} keys={len(self._last)}>"

    def due(self, key_id: str, *, primary: bool) -> bool:
        """Whether `record` would write now for this key id and role."""
        last = self._last.get((key_id, primary))
        return last is None or self._clock() - last >= self._interval

    async def record(self, key_id: str, *, primary: bool, conn: Any = None) -> bool:
        """Record the use of `key_id` if due; never raises (but for cancellation).

        Args:
            key_id: the key's id.
            primary: whether it was used as the primary key.
            conn: a connection to use instead of the pool; when it is in a
                transaction the record runs in a savepoint, so its failure
                leaves the caller's transaction usable.

        Returns:
            Whether a record was written.
        """
        if not _KEY_ID.fullmatch(key_id if isinstance(key_id, str) else ""):
            logger.warning("not recording a key use: a key id is 12 lowercase hex characters")
            return False
        if not self.due(key_id, primary=primary):
            return False
        # Marked before the await: concurrent callers skip instead of piling up.
        self._last[(key_id, primary)] = self._clock()
        try:
            if conn is None:
                await record_key_use(self._pool, key_id, primary=primary)
            elif conn.is_in_transaction():
                async with conn.transaction():
                    await record_key_use(conn, key_id, primary=primary)
            else:
                await record_key_use(conn, key_id, primary=primary)
        except Exception as exc:
            reason = str(exc) if isinstance(exc, TenantStoreError) else describe_driver_error(exc)
            logger.warning("could not record the use of a key in tenantstore_keys: %s", reason)
            return False
        return True
