"""What the operator tools share: the tenants table as the catalog has it, and its columns."""

from __future__ import annotations

from typing import Any

import asyncpg

from .._catalog import ResolvedTable, resolve_table
from .._queries import load_queries
from ..errors import TableDefinitionError, UnknownSecretError
from ..models import TENANTS

DRIVER_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)
Q = load_queries("operator.sql")
_MIGRATE_HINT = "apply the schema with `python -m tenantstore.migrate up`"


def check_secret_column(column: str) -> str:
    """Return `column` if it is a secret column of `TENANTS`.

    Raises:
        UnknownSecretError: it is not; the message names the valid ones.
    """
    if column not in TENANTS.secrets:
        # Not echoed: a secret pasted where the column name goes must not come back out.
        raise UnknownSecretError(
            f"COLUMN is not a secret column of {TENANTS.qualified_name} "
            f"(its secret columns: {', '.join(TENANTS.secrets)})"
        )
    return column


async def resolve(conn: Any) -> ResolvedTable:
    """`TENANTS` checked against the catalog, with a hint when the schema is behind."""
    try:
        return await resolve_table(conn, TENANTS)
    except TableDefinitionError as exc:
        raise TableDefinitionError(f"{exc} ({_MIGRATE_HINT})") from None
