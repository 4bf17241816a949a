"""`LiveCache`: tenants served from memory, kept fresh by PostgreSQL's LISTEN/NOTIFY.

Opted into per repository::

    cache = LiveCache(listen_dsn="postgresql://app@db-primary:5432/app")
    async with TenantRepository(pool, keyring, live_cache=cache) as repo:
        tenant = await repo.get_tenant("acme")  # from memory once loaded

Migration 0007 makes every statement that changes `tenants` (from any
process, plain SQL included) notify the channel `tenantstore_tenants` at
commit with the ids it touched, or `*` (forget everything) when they do not
fit. A dedicated listener connection (`_live_listener.Listener`) applies
those notifications. The cache answers from memory only while that listener
is subscribed and healthy; otherwise every call reads the database
(`bypassed`), and it is emptied whenever the listener goes down and again
before it serves after reconnecting. So a cached tenant is at most as old as
the delivery of the notification of its last change.

A read that was under way when an invalidation arrived never stores what it
read (a generation check): it may have read the row before the change. Two
reads of one tenant that disagree keep neither (a change is on its way).
Concurrent `get` misses of one tenant share one read, so a hot tenant that
was just invalidated costs one query, not one per caller. A write through
the same repository drops its tenant at once, so a process reads its own
writes without waiting for the notification.

Entries are the frozen `(Tenant, key ids)` pairs of `TenantDecoder.entries`:
a hit costs a dict lookup, and is audited (every read of a secret is) and
counted like any other read. A cache belongs to one repository and one
event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from ._live_listener import CHANNEL, Listener
from ._tenant_rows import KeyIds
from .db import check_database_url
from .errors import ConfigurationError
from .metrics import Metrics
from .models import Tenant

__all__ = ["CHANNEL", "LiveCache"]

logger = logging.getLogger("tenantstore.live_cache")

Entry = tuple[Tenant, KeyIds]
LoadOne = Callable[[str], Awaitable[Entry | None]]
LoadMany = Callable[[list[str]], Awaitable[list[Entry]]]
AuditReads = Callable[[Sequence[Entry]], Awaitable[None]]


class _Flight:
    """A read of one tenant under way, which other callers of `get` wait for."""

    __slots__ = ("answered", "done", "entry", "epoch", "stale")

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.done = asyncio.Event()
        self.answered = False  # the read returned (else it raised or was cancelled)
        self.stale = False  # an invalidation of its tenant came while it ran
        self.entry: Entry | None = None


class LiveCache:
    """An in-process LRU of tenants, invalidated by PostgreSQL notifications.

    Args:
        listen_dsn: the URL of the listener connection, which must reach
            PostgreSQL directly: LISTEN does not work through PgBouncer in
            transaction pooling, so required even when the pool's URL would
            do, and refused (logged, cache bypassed) when a pooler answers it.
        max_tenants: the most tenants kept; the least recently used go first.
        health_interval: seconds between checks of the listener (a test
            notification must come back and the triggers must be in place).
        probe_timeout: seconds a check, or a connection attempt, may take.
        reconnect_delay: the first and the longest wait between attempts to
            connect the listener (doubling, with jitter, from one to the other).
        **connect_kwargs: passed to `asyncpg.connect` (`ssl=...` and the like).

    Raises:
        ConfigurationError: `listen_dsn` is missing or malformed (the message
            shows it redacted), or a number is out of range.

    Start it (`await cache.start()`, or `async with` on it or on the
    repository that uses it) and close it (`aclose()`); until it is started,
    and whenever its listener is down, every call reads the database.
    """

    def __init__(
        self,
        *,
        listen_dsn: str | None,
        max_tenants: int = 10_000,
        health_interval: float = 10.0,
        probe_timeout: float = 5.0,
        reconnect_delay: tuple[float, float] = (0.1, 10.0),
        **connect_kwargs: Any,
    ) -> None:
        if not isinstance(listen_dsn, str) or not listen_dsn.strip():
            raise ConfigurationError(
                "LiveCache needs listen_dsn: a PostgreSQL URL that reaches the server directly "
                "(not through PgBouncer in transaction pooling, where LISTEN does not work)"
            )
        check_database_url(listen_dsn)
        if not isinstance(max_tenants, int) or max_tenants < 1:
            raise ConfigurationError("max_tenants is expected to be at least 1")
        first, longest = reconnect_delay
        if not 0 < first <= longest or health_interval <= 0 or probe_timeout <= 0:
            raise ConfigurationError(
                "health_interval, probe_timeout and reconnect_delay are expected to be "
                "positive, and reconnect_delay as (first, longest)"
            )
        self._max = max_tenants
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._serving = False
        # Generations: `_epoch` moves on every flush, `_seq` on every
        # invalidation; `_touched` holds, for ids being read right now
        # (`_inflight`), the `_seq` of their last invalidation.
        self._epoch = 0
        self._seq = 0
        self._inflight: dict[str, int] = {}
        self._touched: dict[str, int] = {}
        self._flights: dict[str, _Flight] = {}
        self._live = asyncio.Event()
        self._metrics = Metrics()
        self._audit: AuditReads | None = None
        self._listener = Listener(
            listen_dsn,
            on_notify=self.notified,
            on_up=self._up,
            on_down=self._down,
            count=self._count,
            health_interval=health_interval,
            probe_timeout=probe_timeout,
            reconnect_delay=(first, longest),
            connect_kwargs=connect_kwargs,
        )

    def __repr__(self) -> str:
        state = "live" if self._serving else "bypassed"
        return f"<LiveCache {state} {len(self._entries)}/{self._max}>"

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def max_tenants(self) -> int:
        """The most tenants kept in memory."""
        return self._max

    @property
    def live(self) -> bool:
        """Whether calls are answered from memory (the listener is subscribed and healthy)."""
        return self._serving

    @property
    def metrics(self) -> Metrics:
        """The metrics it counts to: its repository's (`hits`, `misses`, `live[...]`)."""
        return self._metrics

    # -- lifecycle -------------------------------------------------------------

    async def __aenter__(self) -> LiveCache:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Start the listener task (idempotent); the cache serves once it has subscribed.

        Raises:
            RuntimeError: the cache was closed.
        """
        self._listener.start()

    async def wait_live(self) -> None:
        """Wait until the cache serves from memory (bound it with `asyncio.timeout`)."""
        await self._live.wait()

    async def aclose(self) -> None:
        """Stop the listener task and close its connection; calls read the database from now."""
        await self._listener.aclose()
        self._down()

    def attach(self, metrics: Metrics, audit_reads: AuditReads) -> None:
        """Bind the cache to the repository that uses it (done by `TenantRepository`).

        Raises:
            ConfigurationError: it already serves another repository (entries
                depend on a repository's key ring and plaintext policy).
        """
        if self._audit is not None:
            raise ConfigurationError("this LiveCache already serves another TenantRepository")
        self._metrics = metrics
        self._audit = audit_reads

    # -- reads (for TenantRepository) --------------------------------------------

    async def get(self, tenant_id: str, load: LoadOne) -> Entry | None:
        """The entry for `tenant_id`: from memory, else from `load` (kept if still current)."""
        if not self._serving:
            self._metrics.live("bypassed")
            return await load(tenant_id)
        entries = self._entries
        entry = entries.get(tenant_id)
        if entry is not None:
            entries.move_to_end(tenant_id)
            self._metrics.cache("live", 1, 0)
            assert self._audit is not None  # attached by the repository
            await self._audit((entry,))
            return entry
        self._metrics.cache("live", 0, 1)
        while self._serving:
            flight = self._flights.get(tenant_id)
            if flight is None:
                return await self._lead(tenant_id, load)
            # One read per tenant at a time: the others wait for its answer (a hot
            # tenant just invalidated would otherwise send every caller to the database).
            await flight.done.wait()
            if flight.answered and not flight.stale and flight.epoch == self._epoch:
                entry = flight.entry
            else:  # it failed, or an invalidation overtook it: a newer read may have answered
                entry = entries.get(tenant_id) if self._serving else None
                if entry is None:
                    continue  # read again, or join the newer read
            if entry is not None:
                assert self._audit is not None  # attached by the repository
                await self._audit((entry,))
            return entry
        self._metrics.live("bypassed")
        return await load(tenant_id)

    async def _lead(self, tenant_id: str, load: LoadOne) -> Entry | None:
        flight = self._flights[tenant_id] = _Flight(self._epoch)
        epoch, seq = self._epoch, self._seq
        self._begin((tenant_id,))
        try:
            entry = await load(tenant_id)
            flight.entry, flight.answered = entry, True
            self._store(tenant_id, entry, epoch, seq)
            return entry
        finally:
            self._end((tenant_id,))
            del self._flights[tenant_id]
            flight.done.set()

    async def get_many(self, tenant_ids: Sequence[str], load: LoadMany) -> list[Entry]:
        """The entries of the known tenants among `tenant_ids` (distinct): as `get`, one load."""
        if not self._serving:
            self._metrics.live("bypassed")
            return await load(list(tenant_ids))
        entries = self._entries
        hits: list[Entry] = []
        missing: list[str] = []
        for tenant_id in tenant_ids:
            entry = entries.get(tenant_id)
            if entry is None:
                missing.append(tenant_id)
            else:
                entries.move_to_end(tenant_id)
                hits.append(entry)
        self._metrics.cache("live", len(hits), len(missing))
        if hits:
            assert self._audit is not None  # attached by the repository
            await self._audit(hits)
        if not missing:
            return hits
        epoch, seq = self._epoch, self._seq
        self._begin(missing)
        try:
            loaded = await load(missing)
            found = {entry[0].tenant_id: entry for entry in loaded}
            for tenant_id in missing:
                self._store(tenant_id, found.get(tenant_id), epoch, seq)
            return hits + loaded
        finally:
            self._end(missing)

    def _begin(self, tenant_ids: Iterable[str]) -> None:
        inflight = self._inflight
        for tenant_id in tenant_ids:
            inflight[tenant_id] = inflight.get(tenant_id, 0) + 1

    def _end(self, tenant_ids: Iterable[str]) -> None:
        inflight = self._inflight
        for tenant_id in tenant_ids:
            left = inflight[tenant_id] - 1
            if left:
                inflight[tenant_id] = left
            else:
                del inflight[tenant_id]
                self._touched.pop(tenant_id, None)

    def _store(self, tenant_id: str, entry: Entry | None, epoch: int, seq: int) -> None:
        """Keep what a read that started at (`epoch`, `seq`) found, if nothing changed since."""
        if epoch != self._epoch or self._touched.get(tenant_id, -1) > seq:
            return  # flushed or invalidated while reading: the row read may be the old one
        entries = self._entries
        current = entries.get(tenant_id)
        if current is None:
            if entry is not None:
                entries[tenant_id] = entry
                if len(entries) > self._max:
                    entries.popitem(last=False)
        elif current != entry:
            # A concurrent read stored another version: a change is on its way
            # (its notification not yet here). Keep neither, and let no read
            # that started before now store either.
            self._invalidate((tenant_id,))

    # -- invalidation ----------------------------------------------------------

    def invalidate(self, tenant_ids: Iterable[str]) -> None:
        """Forget these tenants now (the repository calls this after its own writes)."""
        self._metrics.live("invalidations", self._invalidate(tenant_ids))

    def flush(self) -> None:
        """Forget every tenant; reads under way when this is called store nothing."""
        self._epoch += 1
        self._entries.clear()
        self._touched.clear()
        self._metrics.live("flushes")

    def _invalidate(self, tenant_ids: Iterable[str]) -> int:
        self._seq += 1
        seq, entries, inflight, touched = self._seq, self._entries, self._inflight, self._touched
        dropped = 0
        flights = self._flights
        for tenant_id in tenant_ids:
            if entries.pop(tenant_id, None) is not None:
                dropped += 1
            if tenant_id in inflight:
                touched[tenant_id] = seq
                flight = flights.get(tenant_id)
                if flight is not None:
                    flight.stale = True
        return dropped

    def notified(self, payload: str) -> None:
        """Apply a notification of `CHANNEL`: a JSON array of tenant ids, else forget all."""
        if payload.startswith("["):
            try:
                ids = json.loads(payload)
            except ValueError:
                ids = None
            if isinstance(ids, list) and all(isinstance(i, str) for i in ids):
                self.invalidate(ids)
                return
        if payload != "*":
            logger.warning("live cache: unrecognised notification on %s; flushing", CHANNEL)
        self.flush()

    # -- listener state ----------------------------------------------------------

    def _count(self, name: str) -> None:
        self._metrics.live(name)

    def _up(self) -> None:
        """The listener is subscribed: flush, then serve from memory."""
        self.flush()
        self._serving = True
        self._live.set()

    def _down(self) -> None:
        """The listener is gone: read the database until it is back, and forget everything."""
        if self._serving:
            self._serving = False
            self._live.clear()
            self.flush()
