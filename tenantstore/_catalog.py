"""Checking a declared `EncryptedTable` against the catalog, before anything runs.

`resolve_table` finds the table (in its schema, or on the search path) and
checks what every statement over it relies on: the key column exists, is
NOT NULL and unique on its own, and has a type the runner can page by; each
secret column exists and is `text` or `varchar` long enough for a token.
Whatever is wrong comes back as one `TableDefinitionError` naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._queries import Sql, identifier, load_queries
from .errors import TableDefinitionError, printable
from .tables import EncryptedTable

__all__ = [
    "KEY_TYPES",
    "MIN_TOKEN_LENGTH",
    "ResolvedTable",
    "present_columns",
    "resolve_table",
]

_Q = load_queries("catalog.sql")

KEY_TYPES: dict[str, Sql] = {
    "text": Sql("text"),
    "varchar": Sql("text"),
    "int2": Sql("smallint"),
    "int4": Sql("integer"),
    "int8": Sql("bigint"),
    "uuid": Sql("uuid"),
}
"""Key column types the runner pages by, and the array type it sends keys as."""

_SECRET_TYPES = frozenset({"text", "varchar"})

MIN_TOKEN_LENGTH = 100
"""The shortest Fernet token (of an empty secret): a varchar(n) below it holds none."""


@dataclass(frozen=True, slots=True)
class ResolvedTable:
    """A declaration checked against the catalog: the schema it lives in, its key's type."""

    table: EncryptedTable
    schema: str
    key_type: Sql

    @property
    def sql_name(self) -> Sql:
        """The table as SQL: `"schema"."name"`, both quoted."""
        return Sql(f"{identifier(self.schema).text}.{identifier(self.table.name).text}")

    @property
    def qualified_name(self) -> str:
        """`schema.name` for messages (the schema as found, the search path resolved)."""
        found = EncryptedTable(
            self.table.name, schema=self.schema, key=self.table.key, secrets=self.table.secrets
        )
        return found.qualified_name


async def resolve_table(conn: Any, table: EncryptedTable) -> ResolvedTable:
    """Check `table` against the catalog through `conn` (a connection or a pool).

    Raises:
        TableDefinitionError: the table or a column does not exist, a secret
            column is not `text`/`varchar` (or too short for a token), the
            key column allows NULL, is not unique on its own (or only as part
            of a composite key, which is not supported yet), or has a type
            the runner cannot page by.
    """
    name = table.qualified_name
    found = await conn.fetchrow(_Q["find_table"].sql, table.schema, table.name)
    if found is None:
        where = "on the search path" if table.schema is None else "in its schema"
        raise TableDefinitionError(f"table {name} does not exist {where}")
    if found["kind"] not in ("r", "p"):
        raise TableDefinitionError(f"{name} is not a table (a view or another relation kind)")
    oid = found["oid"]
    columns = {row["name"]: row for row in await conn.fetch(_Q["table_columns"].sql, oid)}

    for column in table.secrets:
        info = columns.get(column)
        if info is None:
            raise TableDefinitionError(f"table {name} has no column {printable(column)}")
        if info["type"] not in _SECRET_TYPES:
            raise TableDefinitionError(
                f"secret column {printable(column)} of {name} is {info['type']}: "
                "secret columns must be text or varchar"
            )
        length = info["atttypmod"] - 4 if info["atttypmod"] >= 4 else None
        if info["type"] == "varchar" and length is not None and length < MIN_TOKEN_LENGTH:
            raise TableDefinitionError(
                f"secret column {printable(column)} of {name} is varchar({length}): too short "
                f"for a Fernet token (at least {MIN_TOKEN_LENGTH} characters; use text)"
            )

    key = columns.get(table.key)
    if key is None:
        raise TableDefinitionError(f"table {name} has no key column {printable(table.key)}")
    key_name = printable(table.key)
    if key["type"] not in KEY_TYPES:
        raise TableDefinitionError(
            f"key column {key_name} of {name} is {key['type']}: supported key types are "
            "text, varchar, smallint, integer, bigint and uuid"
        )
    if not key["attnotnull"]:
        raise TableDefinitionError(
            f"key column {key_name} of {name} allows NULL: a NULL key would be skipped "
            "(make it NOT NULL)"
        )
    indexes = await conn.fetch(_Q["unique_indexes"].sql, oid, key["attnum"])
    if not any(row["columns"] == 1 and row["plain"] for row in indexes):
        if any(row["columns"] > 1 for row in indexes):
            raise TableDefinitionError(
                f"key column {key_name} of {name} is unique only together with other "
                "columns: composite keys are not supported yet"
            )
        raise TableDefinitionError(
            f"key column {key_name} of {name} is not unique (give it a primary key or "
            "unique constraint)"
        )
    return ResolvedTable(table, found["schema"], KEY_TYPES[key["type"]])


async def present_columns(conn: Any, table: EncryptedTable) -> list[str]:
    """The declared secret columns of `table` that exist now, in declared order.

    Empty when the table does not exist. For migration data steps, which run
    at a point in the schema's history where later columns are not there yet.
    """
    found = await conn.fetchrow(_Q["find_table"].sql, table.schema, table.name)
    if found is None:
        return []
    names = {row["name"] for row in await conn.fetch(_Q["table_columns"].sql, found["oid"])}
    return [column for column in table.secrets if column in names]
