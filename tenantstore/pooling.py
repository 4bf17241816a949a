"""Running behind PgBouncer: the setting that says so, and the check for a session of one's own.

In transaction pooling mode PgBouncer hands each transaction to whichever
server connection is free, so session state (an advisory lock, LISTEN, a
temporary function) does not stay with the client. The application's pool
works through it (`create_pool(pgbouncer=True)`); what needs a session, such
as the schema runner's lock, connects to `DATABASE_DIRECT_URL` instead and
checks that it got one (`require_session`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from ._queries import load_queries
from .config import load_settings
from .db import AnyConnection
from .errors import ConfigurationError

__all__ = [
    "PGBOUNCER_SETTING",
    "SessionRequiredError",
    "pgbouncer_setting",
    "require_session",
    "through_pooler",
]

PGBOUNCER_SETTING = "TENANTSTORE_PGBOUNCER"
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})
_Q = load_queries("pooling.sql")


class SessionRequiredError(ConfigurationError):
    """A connection that needs to be a session of its own goes through a pooler."""

    def __init__(self, purpose: str) -> None:
        super().__init__(
            f"{purpose} needs a PostgreSQL session of its own, and this connection goes "
            "through a pooler such as PgBouncer (the server process id it was given at "
            "login is not the one running its statements): "
            "set DATABASE_DIRECT_URL (or --direct-url) to a URL that reaches PostgreSQL "
            "directly; from Python, pass connection=await asyncpg.connect(direct_url)"
        )


def pgbouncer_setting(
    explicit: bool | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    env_file: str | os.PathLike[str] | None = ".env",
) -> bool:
    """Whether `DATABASE_URL` goes through PgBouncer: `explicit`, else `TENANTSTORE_PGBOUNCER`.

    Args:
        explicit: the caller's answer (a CLI flag); None reads the setting.
        environ: where to read the setting (default: `os.environ`).
        env_file: a dotenv file read under the environment, or None.

    Returns:
        True for 1/true/yes/on; False for 0/false/no/off, blank or absent.

    Raises:
        ConfigurationError: the setting holds anything else.
    """
    if explicit is not None:
        return explicit
    settings = load_settings(environ, [] if env_file is None else [env_file])
    value = settings.get(PGBOUNCER_SETTING, "").strip().lower()
    if value not in _TRUE | _FALSE:
        raise ConfigurationError(f"{PGBOUNCER_SETTING} must be 1 or 0 (true/false, yes/no, on/off)")
    return value in _TRUE


async def through_pooler(conn: AnyConnection) -> bool:
    """Whether `conn` reaches PostgreSQL through a pooler (or another proxy that answers for it).

    At login PostgreSQL tells the client its backend's process id (with the
    cancel key). PgBouncer, in every pool mode, answers with an id and key of
    its own instead, because it has to route cancel requests itself, as do
    other poolers and proxies (pgcat, Odyssey, RDS Proxy). On a direct
    connection the id equals `pg_backend_pid()`.
    """
    pid = await conn.fetchval(_Q["backend_pid"].sql)
    return bool(pid != conn.get_server_pid())


async def require_session(conn: AnyConnection, purpose: str) -> None:
    """Make sure `conn` is a session of its own before `purpose` relies on session state.

    Raises:
        SessionRequiredError: it goes through a pooler (see `through_pooler`).
    """
    if await through_pooler(conn):
        raise SessionRequiredError(purpose)
