"""The live cache's listener: one dedicated connection, LISTEN, health checks, reconnects.

A background task connects to `listen_dsn`, checks that it reaches
PostgreSQL itself (no pooler in between) and that the `tenants` triggers of
migration 0007 are in place, LISTENs, and proves the subscription with a
test notification on a channel of its own before telling the cache to
serve. Then it waits: the connection's termination callback reports a
closed connection at once, and every `health_interval` the checks run again
(a silent network failure shows up as a test notification that never comes
back). Whenever the connection is gone or a check fails, the cache is told
first (it stops serving from memory) and the task reconnects with jittered
exponential backoff. Every failure is logged, through
`describe_driver_error`, never with a value or the URL's password.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
from collections.abc import Callable
from typing import Any

import asyncpg

from ._queries import load_queries
from .db import redact_url
from .errors import describe_driver_error
from .models import TENANTS
from .tables import quote_identifier

__all__ = ["CHANNEL", "TRIGGERS", "Listener"]

logger = logging.getLogger("tenantstore.live_cache")

_Q = {name: query.sql for name, query in load_queries("live_cache.sql").items()}
CHANNEL = "tenantstore_tenants"
"""The channel migration 0007's triggers notify (a JSON array of tenant ids, or `*`)."""
TRIGGERS = [f"tenantstore_notify_{op}" for op in ("insert", "update", "delete", "truncate")]
"""Migration 0007's triggers on `tenants`; the cache serves only while all are enabled."""
_TABLE = ".".join(quote_identifier(part) for part in (TENANTS.schema, TENANTS.name) if part)


class _Refused(Exception):
    """The listener cannot do its job with this configuration (pooler, no triggers)."""


class _Unhealthy(Exception):
    """The listener's connection is up but notifications do not come back."""


class Listener:
    """The task that keeps a LISTEN connection up and reports its state to the cache."""

    def __init__(
        self,
        dsn: str,
        *,
        on_notify: Callable[[str], None],
        on_up: Callable[[], None],
        on_down: Callable[[], None],
        count: Callable[[str], None],
        health_interval: float,
        probe_timeout: float,
        reconnect_delay: tuple[float, float],
        connect_kwargs: dict[str, Any],
    ) -> None:
        self._dsn = dsn
        self._on_notify = on_notify
        self._on_up = on_up
        self._on_down = on_down
        self._count = count
        self._interval = health_interval
        self._timeout = probe_timeout
        self._delays = reconnect_delay
        settings = {"application_name": "tenantstore live cache"}
        settings.update(connect_kwargs.pop("server_settings", None) or {})
        self._connect_kwargs = {"timeout": probe_timeout, **connect_kwargs}
        self._connect_kwargs["server_settings"] = settings
        # A channel of its own for test notifications: other processes never see them.
        self._probe_channel = f"tenantstore_probe_{secrets.token_hex(8)}"
        self._probe: tuple[str, asyncio.Future[None]] | None = None
        self._conn: asyncpg.Connection | None = None
        self._lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._subscribed_before = False

    def start(self) -> None:
        """Start the task on the running loop, once."""
        if self._closed:
            raise RuntimeError("this LiveCache was closed; make a new one")
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="tenantstore live cache listener"
            )

    async def aclose(self) -> None:
        """Stop the task; its connection is closed on the way out."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    # -- the task -------------------------------------------------------------------

    async def _run(self) -> None:
        first, longest = self._delays
        delay = first
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(self._dsn, **self._connect_kwargs)
                await asyncio.wait_for(self._subscribe(conn), 3 * self._timeout)
                if self._subscribed_before:
                    self._count("reconnects")
                self._subscribed_before = True
                self._on_up()
                logger.info("live cache: listening on %s", redact_url(self._dsn))
                delay = first
                await self._watch(conn)
            except _Refused as exc:
                logger.error("live cache: %s; calls read the database", exc)
                delay = longest  # configuration: retrying sooner would not help
            except _Unhealthy as exc:
                logger.warning("live cache: %s; calls read the database until it is back", exc)
            except Exception as exc:  # every failure is logged, sanitised, then retried
                logger.warning(
                    "live cache: listener failed: %s; calls read the database until it is back",
                    describe_driver_error(exc),
                )
            finally:
                self._conn = None
                self._on_down()
                if conn is not None:
                    conn.terminate()
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(2 * delay, longest)

    async def _subscribe(self, conn: asyncpg.Connection) -> None:
        self._conn = conn
        self._lost = asyncio.Event()
        conn.add_termination_listener(self._terminated)
        # A pooler answers the startup with a process id of its own making.
        if await conn.fetchval(_Q["backend_pid"], timeout=self._timeout) != conn.get_server_pid():
            raise _Refused(
                f"listen_dsn {redact_url(self._dsn)} reaches PostgreSQL through a connection "
                "pooler (the backend's process id differs from the one announced): LISTEN "
                "needs a direct connection to the server"
            )
        await conn.add_listener(self._probe_channel, self._probed)
        await conn.add_listener(CHANNEL, self._notified)
        await self._check(conn)

    async def _watch(self, conn: asyncpg.Connection) -> None:
        """Return when the connection is lost; raise when a periodic check fails."""
        while True:
            try:
                await asyncio.wait_for(self._lost.wait(), self._interval)
            except TimeoutError:
                await self._check(conn)
                continue
            logger.warning("live cache: listener connection lost")
            return

    async def _check(self, conn: asyncpg.Connection) -> None:
        """The triggers are in place and a test notification comes back in time."""
        enabled = await conn.fetchval(
            _Q["triggers_enabled"], _TABLE, TRIGGERS, timeout=self._timeout
        )
        if enabled != len(TRIGGERS):
            raise _Refused(
                f"table {TENANTS.qualified_name} lacks the change-notification triggers of "
                "migration 0007 (apply it: python -m tenantstore.migrate up)"
            )
        token = secrets.token_hex(8)
        waiter = asyncio.get_running_loop().create_future()
        self._probe = (token, waiter)
        try:
            await conn.fetchval(_Q["probe"], self._probe_channel, token, timeout=self._timeout)
            await asyncio.wait_for(waiter, self._timeout)
        except TimeoutError:
            raise _Unhealthy(
                f"a test notification did not come back within {self._timeout}s"
            ) from None
        finally:
            self._probe = None

    # -- callbacks from asyncpg (on the loop) ------------------------------------------

    def _terminated(self, conn: object) -> None:
        if conn is self._conn:
            self._on_down()  # at once: calls read the database from now on
            self._lost.set()

    def _notified(self, conn: object, pid: int, channel: str, payload: object) -> None:
        # Also from a connection being replaced: dropping entries is always safe.
        self._on_notify(payload if isinstance(payload, str) else "")

    def _probed(self, conn: object, pid: int, channel: str, payload: object) -> None:
        probe = self._probe
        if probe is not None and payload == probe[0] and not probe[1].done():
            probe[1].set_result(None)
