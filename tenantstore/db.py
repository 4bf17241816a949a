"""Connecting to PostgreSQL: `create_pool`, `DATABASE_URL` and the embedded default.

Where the database is, in order: an explicit `dsn` argument, then
`DATABASE_URL` (environment, then `.env`), then the embedded default: a
PostgreSQL data directory under `./.tenantstore/` run by the `pgserver`
package, which ships PostgreSQL binaries in its wheel and copes with running
as root. The embedded server is for development and tests; point
`DATABASE_URL` at a real server for anything else.

Behind PgBouncer in transaction pooling mode, `DATABASE_URL` points at
PgBouncer (`create_pool(pgbouncer=True)`, or `TENANTSTORE_PGBOUNCER=1` for the
CLI) and `DATABASE_DIRECT_URL` at PostgreSQL itself, for what needs a session
of its own: the schema runner's advisory lock (and LISTEN).
"""

from __future__ import annotations

import logging
import os
import re
import urllib.parse
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeAlias

import anyio.to_thread
import asyncpg
from asyncpg.pool import PoolConnectionProxy

from .config import load_settings
from .errors import (
    ConfigurationError,
    DatabaseError,
    TenantStoreError,
    database_error,
    describe_driver_error,
    printable,
)

__all__ = [
    "DATABASE_DIRECT_URL",
    "DATABASE_URL",
    "DEFAULT_EMBEDDED_DIR",
    "AnyConnection",
    "check_database_url",
    "connect",
    "create_pool",
    "embedded_database_url",
    "redact_url",
    "resolve_database_url",
    "resolve_direct_url",
]

logger = logging.getLogger("tenantstore")

AnyConnection: TypeAlias = "asyncpg.Connection[Any] | PoolConnectionProxy[Any]"
"""A connection of one's own or one acquired from a pool."""

DATABASE_URL = "DATABASE_URL"
DATABASE_DIRECT_URL = "DATABASE_DIRECT_URL"
DEFAULT_EMBEDDED_DIR = ".tenantstore"

# Query parameters whose values are shown by `redact_url`: they name places,
# modes and labels, never a secret. Any other parameter (password, passfile,
# sslpassword, sslkey, a misspelling, a percent-encoded name) hides the rest
# of the query, since an unencoded `&` in a password would split it into
# parameters of its own.
_SHOWN_PARAMS = frozenset(
    {
        "application_name",
        "channel_binding",
        "connect_timeout",
        "database",
        "dbname",
        "fallback_application_name",
        "gssencmode",
        "gsslib",
        "host",
        "hostaddr",
        "krbsrvname",
        "load_balance_hosts",
        "port",
        "service",
        "ssl_max_protocol_version",
        "ssl_min_protocol_version",
        "sslmode",
        "sslnegotiation",
        "sslrootcert",
        "target_session_attrs",
        "user",
    }
)
_SCHEMES = frozenset({"postgresql", "postgres"})
_URL_START = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_SAFE_USER = re.compile(r"[\w.~%+-]*")
_PLAIN_NAME = re.compile(r"\w+")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_IPV6_HOST = re.compile(r"\[[^\]]+\](?::[0-9]+)?")
_PORT = re.compile(r"\s*[0-9]+\s*")
_ENCODE_ADVICE = (
    "percent-encode the password and user name: @ as %40, / as %2F, ? as %3F, # as %23, "
    "% as %25, & as %26 (urllib.parse.quote(password, safe='') does it)"
)


def redact_url(url: str) -> str:
    """Return `url` for display, with every password, wherever it is, hidden as `***`.

    Built for the worst case: the URL may be malformed (a password with an
    unencoded `@`, `/`, `?` or `#`), carry `password=`-like query parameters,
    or be a libpq `key=value` string. Where the layout is ambiguous, more is
    hidden, never less: a string that does not start with `scheme://` becomes
    `***`, and so does all of a URL in which an `@` may sit inside a query value.

    Args:
        url: a database URL or connection string, well-formed or not.

    Returns:
        The URL with the password in the login and the values of every query
        parameter not known to be harmless replaced by `***`; control
        characters escaped.
    """
    start = _URL_START.match(url)
    if start is None:
        return "***"  # key=value strings and anything else: it could all be a password
    scheme, rest = start[1], url[start.end() :]
    at = rest.rfind("@")
    if at >= 0:
        login, rest = rest[:at], rest[at + 1 :]
        question = login.find("?")
        if question >= 0 and "=" in login[question:]:
            # This `@` may be inside a query value (`?password=p@ss`): what
            # follows it could be the rest of a password.
            return f"{scheme}://***"
        user, colon, _ = login.partition(":")
        shown_user = user if _SAFE_USER.fullmatch(user) else "***"
        prefix = f"{shown_user}:***@" if colon else f"{shown_user}@"
    else:
        prefix = ""
    location, mark, query = rest.partition("?")
    hosts, slash, path = location.partition("/")
    hosts = ",".join(_redact_host(spec) for spec in hosts.split(","))
    return printable(f"{scheme}://{prefix}{hosts}{slash}{path}{mark}{_redact_query(query)}")


def _redact_host(spec: str) -> str:
    """`host:port` as it is, unless the port is not a number (`user:password` missing its `@`)."""
    if spec.startswith("[") and not _IPV6_HOST.fullmatch(spec):
        return "***"
    _, colon, port = spec.rpartition("]")[2].partition(":")
    if colon and port and not port.isdigit():
        return f"{spec[: len(spec) - len(port)]}***"
    return spec


def _redact_query(query: str) -> str:
    """Show harmless parameters; from the first other one on, show no name or value."""
    params = query.split("&") if query else []
    shown = []
    for index, param in enumerate(params):
        name = param.partition("=")[0]
        if name.lower() in _SHOWN_PARAMS:
            shown.append(param)
            continue
        shown.append(f"{name}=***" if _PLAIN_NAME.fullmatch(name) else "***")
        if index + 1 < len(params):
            shown.append("***")
        break
    return "&".join(shown)


def check_database_url(url: str) -> str:
    """Check that `url` is a PostgreSQL URL that asyncpg reads as it was meant.

    asyncpg splits a URL with `urllib.parse`: an unencoded `/`, `?`, `#` or `@`
    in the password moves part of it into the host, database or query, where
    it turns up in error messages, or makes the parser raise a `ValueError`
    that quotes it. So this is checked before any connection is tried, and
    strictly: at most one `@` (the one ending the login), no `#`, every `%`
    starting an escape, a query of `name=value` pairs, numeric ports.

    Args:
        url: the URL to check.

    Returns:
        `url`, unchanged.

    Raises:
        ConfigurationError: the URL is malformed; the message shows it only
            through `redact_url` and says what to fix, and no exception is
            chained to it (a parser's error would quote the URL).
    """
    problem = _url_problem(url)
    if problem is None:
        return url
    raise ConfigurationError(f"invalid database URL {redact_url(url)}: {problem}")


def _url_problem(url: str) -> str | None:
    """What is wrong with `url`, in words that quote none of it; None when nothing is."""
    start = _URL_START.match(url)
    if start is None:
        return "expected a URL like postgresql://user:password@host:5432/database"
    if start[1].lower() not in _SCHEMES:
        return "the scheme must be postgresql:// or postgres://"
    rest = url[start.end() :]
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    # The `@` that ends the login always follows the password, so a password
    # holding `/`, `?` or `#` leaves an `@` after the authority, and one holding
    # `@` leaves two in it. An `@` in a query value is refused too (`%40` works):
    # it cannot be told apart from the end of a login that swallowed a `?`.
    if "#" in url or "@" in rest[len(authority) :] or authority.count("@") > 1:
        return _ENCODE_ADVICE
    if _BAD_ESCAPE.search(url):
        return _ENCODE_ADVICE
    parsed = None
    try:
        parts = urllib.parse.urlsplit(url)
        query = urllib.parse.parse_qs(parts.query, strict_parsing=True) if parts.query else {}
        parsed = (parts, query)
    except ValueError:
        pass  # the parser's message quotes the URL; the advice below does not
    if parsed is None or parsed[0].netloc != authority:
        return _ENCODE_ADVICE
    problem = _hostlist_problem(authority.rpartition("@")[2], unquote=True)
    for name, values in parsed[1].items():
        for value in values:
            if name == "host":
                problem = problem or _hostlist_problem(value, unquote=False)
            elif name == "port" and not all(_PORT.fullmatch(p) for p in value.split(",")):
                problem = problem or "a port is not a number"
    return problem


def _hostlist_problem(hostlist: str, *, unquote: bool) -> str | None:
    """Check `h1:5432,[::1]:5433,/socket/dir` the way asyncpg splits it."""
    if not hostlist:
        return None
    for spec in hostlist.split(","):
        if not spec:
            return "an empty host in the host list"
        if spec.startswith("/"):
            continue
        if spec.startswith("["):
            if not _IPV6_HOST.fullmatch(spec):
                return "a malformed [IPv6] host"
            continue
        port = spec.partition(":")[2]
        if unquote:
            port = urllib.parse.unquote(port)
        if port and not _PORT.fullmatch(port):
            return "a port is not a number"
    return None


def resolve_database_url(
    database_url: str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    env_file: str | os.PathLike[str] | None = ".env",
) -> str | None:
    """Return the explicit URL, else `DATABASE_URL`, else None (meaning: embedded default).

    Every caller that connects (`create_pool`, the migration CLI's lock
    connection) gets its URL from here, so each URL is checked once, before
    any connection attempt.

    Args:
        database_url: an explicit URL; wins when not empty.
        environ: where to read `DATABASE_URL` (default: `os.environ`).
        env_file: a dotenv file read under the environment, or None.

    Returns:
        The URL, or None when none is configured.

    Raises:
        ConfigurationError: the URL is malformed (see `check_database_url`).
    """
    return _resolve_url(DATABASE_URL, database_url, environ, env_file)


def resolve_direct_url(
    direct_url: str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    env_file: str | os.PathLike[str] | None = ".env",
) -> str | None:
    """Return the explicit URL, else `DATABASE_DIRECT_URL`, else None (meaning: `DATABASE_URL`).

    It reaches PostgreSQL itself, not a pooler: what needs a session of its
    own (the schema runner's lock) connects there when `DATABASE_URL` goes
    through PgBouncer. Read and checked like `DATABASE_URL`.

    Raises:
        ConfigurationError: the URL is malformed (see `check_database_url`).
    """
    return _resolve_url(DATABASE_DIRECT_URL, direct_url, environ, env_file)


def _resolve_url(
    name: str,
    url: str | None,
    environ: Mapping[str, str] | None,
    env_file: str | os.PathLike[str] | None,
) -> str | None:
    if not url:
        settings = load_settings(environ, [] if env_file is None else [env_file])
        url = settings.get(name)
    return check_database_url(url) if url else None


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
        min_size: connections opened up front (with 0, one is opened and
            returned, to check the URL).
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
        ConfigurationError: bad sizes, a malformed URL or settings asyncpg rejects.
        DatabaseError: the server cannot be reached or refuses the connection; the
            message holds the redacted URL and `describe_driver_error`'s text, and
            only a sanitised copy of a PostgreSQL error is chained.
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
    failure: BaseException | None = None
    try:
        pool = await asyncpg.create_pool(
            url,
            min_size=min_size,
            max_size=max_size,
            statement_cache_size=0 if pgbouncer else statement_cache_size,
            command_timeout=command_timeout,
            **connect_kwargs,
        )
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, ValueError) as exc:
        failure = exc
    if failure is None and min_size == 0:
        # No connection opened up front: open one now, so a wrong URL or
        # password fails here and not at the first query.
        try:
            async with pool.acquire():
                pass
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, ValueError) as exc:
            failure = exc
        if failure is not None:
            await pool.close()
    if failure is not None:
        # Raised here, outside the handler, so the driver's error (whose text
        # may hold the URL, a DETAIL or a setting's value) is not the context.
        raise _connect_error(failure, url)
    assert pool is not None
    return pool


async def connect(url: str, **kwargs: Any) -> asyncpg.Connection:
    """Open one connection of one's own (a session: the schema lock, LISTEN) to `url`.

    Raises:
        ConfigurationError: a malformed URL or settings asyncpg rejects.
        DatabaseError: the server cannot be reached or refuses the connection;
            the message holds the redacted URL, never the driver's text of it.
    """
    check_database_url(url)
    try:
        return await asyncpg.connect(url, **kwargs)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, ValueError) as exc:
        failure: BaseException = exc
    raise _connect_error(failure, url)


def _connect_error(exc: BaseException, url: str) -> TenantStoreError:
    """Translate a failure of `asyncpg.create_pool` without quoting the driver."""
    where = redact_url(url)
    if isinstance(exc, asyncpg.ClientConfigurationError | ValueError) and not isinstance(
        exc, asyncpg.PostgresError
    ):
        return ConfigurationError(
            f"invalid connection settings for {where}: {describe_driver_error(exc)}"
        )
    translated = database_error(exc, "connect")
    error = DatabaseError(
        f"cannot connect to PostgreSQL at {where}: {describe_driver_error(exc)}",
        operation="connect",
        sqlstate=translated.sqlstate,
    )
    error.driver_error = translated.driver_error  # a sanitised copy, or None
    return error
