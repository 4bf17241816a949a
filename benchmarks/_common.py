"""Helpers shared by the benchmark scripts: the server, a scratch database, loop lag.

Not a benchmark itself; `python benchmarks/<name>.py` puts this directory on
`sys.path`, so scripts import it as `_common`.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from tenantstore.db import embedded_database_url, resolve_database_url

__all__ = ["scratch_database", "server_url", "with_database", "worst_lag"]


def server_url(database_url: str | None) -> str:
    """The explicit URL, else `DATABASE_URL`, else the embedded development server."""
    return resolve_database_url(database_url) or embedded_database_url()


def with_database(url: str, database: str, scheme: str | None = None) -> str:
    """`url` pointing at another database (and optionally another scheme), all else kept."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(scheme=scheme or parts.scheme, path=f"/{database}"))


@asynccontextmanager
async def scratch_database(url: str, prefix: str = "tenantstore_bench") -> AsyncIterator[str]:
    """Create `<prefix>_<pid>` on the server at `url`, yield its URL, drop it afterwards."""
    name = f"{prefix}_{os.getpid()}"
    admin = await asyncpg.connect(url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield with_database(url, name)
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def worst_lag(stop: asyncio.Event, interval: float = 0.001) -> float:
    """Sleep `interval` in a loop until `stop`; return the largest overshoot in seconds."""
    worst = 0.0
    while not stop.is_set():
        start = time.perf_counter()
        await asyncio.sleep(interval)
        worst = max(worst, time.perf_counter() - start - interval)
    return worst
