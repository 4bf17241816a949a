"""Connecting to PostgreSQL: `create_pool`, `DATABASE_URL` and the embedded default.

Where the database is, in order: an explicit `dsn` argument, then
`DATABASE_URL` (environment, then `.env`), then the embedded default: a
PostgreSQL data directory under `./.tenantstore/` run by the `pgserver`
package, which ships PostgreSQL binaries in its wheel and copes with running
as root. The embedded server is for development and tests; point
`DATABASE_URL` at a real server for anything else.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeAlias

import anyio.to_thread
import asyncpg
from asyncpg.pool import PoolConnectionProxy

from .config import load_settings
from .errors import ConfigurationError, DatabaseError

__all__ = [
    "DEFAULT_EMBEDDED_DIR",
    "AnyConnection",
    "create_pool",
    "embedded_database_url",
    "redact_url",
    "resolve_database_url",
]

logger = logging.getLogger("tenantstore")

AnyConnection: TypeAlias = "asyncpg.Connection[Any] | PoolConnectionProxy[Any]"
"""A connection of one's own or one acquired from a pool."""

DATABASE_URL = "DATABASE_URL"
DEFAULT_EMBEDDED_DIR = ".tenantstore"

_SECRET_PARAMS = frozenset({"password", "passfile", "sslpassword", "sslkey"})


def redact_url(url: str) -> str:
    """Return `url` for display: any password, in the login or the query, becomes `***`.

    Parsed by hand and leniently (the last `@` before the query ends the login),
    so even a malformed URL with `/` or `@` in its password shows none of it.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "***"  # not a URL: it could be anything, a password included
    head, mark, query = rest.partition("?")
    at = head.rfind("@")
    if at >= 0:
        login, location = head[:at], head[at + 1 :]
        if ":" in login:
            head = f"{login.split(':', 1)[0]}:***@{location}"
    if mark:
        params = []
        for param in query.split("&"):
            name = param.partition("=")[0]
            params.append(f"{name}=***" if name.lower() in _SECRET_PARAMS else param)
        query = "&".join(params)
    return f"{scheme}://{head}{mark}{query}"


def resolve_database_url(
    database_url: str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    env_file: str | os.PathLike[str] | None = ".env",
) -> str | None:
    """Return the explicit URL, else `DATABASE_URL`, else None (meaning: embedded default)."""
    if database_url:
        return database_url
    settings = load_settings(environ, [] if env_file is None else [env_file])
    return settings.get(DATABASE_URL) or None


def embedded_database_url(directory: str | os.PathLike[str] = DEFAULT_EMBEDDED_DIR) -> str:
    """Start (or reuse) the embedded PostgreSQL under `directory` and return its URL.

    Blocking: it may run `initdb` and `pg_ctl start` (about 1.5 s). The data
    directory survives across runs; the server stops when the last process
    using it exits.
    """
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (CI, root shells); harmless here.
        warnings.simplefilter("ignore")
        from pgserver import postgres_server  # only the embedded default needs it

        root = Path(directory).resolve()
        root.mkdir(parents=True, exist_ok=True)
        server = postgres_server.get_server(root / "pgdata", cleanup_mode="stop")
    logger.warning(
        "Using the embedded development PostgreSQL in %s (set DATABASE_URL to use your own server)",
        root / "pgdata",
    )
    url: str = server.get_uri()
    return url


async def create_pool(
    dsn: str | None = None,
    *,
    min_size: int = 1,
    max_size: int = 10,
    pgbouncer: bool = False,
    statement_cache_size: int = 100,
    command_timeout: float | None = 60.0,
    environ: Mapping[str, str] | None = None,
    **connect_kwargs: Any,
) -> asyncpg.Pool:
    """Create an asyncpg pool for tenantstore.

    Args:
        dsn: a PostgreSQL URL; when None, `DATABASE_URL`, then the embedded default.
        min_size: connections opened up front.
        max_size: the most connections the pool holds.
        pgbouncer: set True behind PgBouncer in transaction pooling mode: it
            turns off asyncpg's prepared-statement cache (`statement_cache_size=0`),
            because consecutive statements may reach different server connections.
        statement_cache_size: asyncpg's per-connection statement cache (ignored
            when `pgbouncer` is True).
        command_timeout: default per-statement timeout in seconds.
        environ: where to read `DATABASE_URL` (default: `os.environ` and `.env`).
        **connect_kwargs: passed on to `asyncpg.create_pool`.

    Raises:
        ConfigurationError: bad sizes.
        DatabaseError: the server cannot be reached; the driver error is chained.
    """
    if min_size < 0:
        raise ConfigurationError("min_size is expected to be zero or greater")
    if max_size <= 0:
        raise ConfigurationError("max_size is expected to be greater than zero")
    if min_size > max_size:
        raise ConfigurationError("min_size is expected to be no greater than max_size")
    url = resolve_database_url(dsn, environ=environ)
    if url is None:
        url = await anyio.to_thread.run_sync(embedded_database_url)
    try:
        pool = await asyncpg.create_pool(
            url,
            min_size=min_size,
            max_size=max_size,
            statement_cache_size=0 if pgbouncer else statement_cache_size,
            command_timeout=command_timeout,
            **connect_kwargs,
        )
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise DatabaseError(f"cannot connect to PostgreSQL at {redact_url(url)}: {exc}") from exc
    assert pool is not None
    return pool
