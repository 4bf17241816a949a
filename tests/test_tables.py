"""EncryptedTable: the declaration (pure) and its check against the catalog (real PostgreSQL)."""

from __future__ import annotations

import asyncpg
import pytest

from tenantstore import ConfigurationError, EncryptedTable, TableDefinitionError
from tenantstore._catalog import resolve_table
from tenantstore.tables import parse_qualified_name, quote_identifier

# -- the declaration ---------------------------------------------------------------


def test_a_declaration_keeps_names_exactly_as_written() -> None:
    table = EncryptedTable("Integrations", schema="App Data", key="ID", secrets=["client secret"])
    assert (table.schema, table.name, table.key, table.secrets) == (
        "App Data",
        "Integrations",
        "ID",
        ("client secret",),
    )
    assert table.qualified_name == '"App Data"."Integrations"'
    assert EncryptedTable("tenants", key="id", secrets=["s"]).qualified_name == "tenants"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tenants", (None, "tenants")),
        ("app.integrations", ("app", "integrations")),
        ('"My Schema"."a.b"', ("My Schema", "a.b")),
        ('app."we""ird"', ("app", 'we"ird')),
        ("App.Order", ("App", "Order")),
    ],
)
def test_qualified_names_split_as_psql_does(text: str, expected: tuple[str | None, str]) -> None:
    assert parse_qualified_name(text) == expected
    table = EncryptedTable(text, key="k", secrets=["s"])
    assert (table.schema, table.name) == expected


@pytest.mark.parametrize("text", ['"open', "a.b.c", ".t", "s.", '""'])
def test_malformed_qualified_names_are_refused(text: str) -> None:
    with pytest.raises(TableDefinitionError):
        parse_qualified_name(text)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"key": "id", "secrets": ["a", "a"]}, "given twice"),
        ({"key": "id", "secrets": ["id", "a"]}, "both the key and a secret"),
        ({"key": "id", "secrets": []}, "no secret column"),
        ({"key": "id", "secrets": "token"}, "not the str"),
        ({"key": ["a", "b"], "secrets": ["s"]}, "composite keys .* not supported yet"),
        ({"key": "", "secrets": ["s"]}, "must not be empty"),
        ({"key": "id", "secrets": ["x" * 64]}, "63-byte"),
        ({"key": "id", "secrets": ["a\x00b"]}, "NUL"),
    ],
)
def test_bad_declarations_are_refused_naming_the_problem(
    kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(TableDefinitionError, match=message) as info:
        EncryptedTable("t", **kwargs)  # type: ignore[arg-type]
    assert isinstance(info.value, ConfigurationError) and isinstance(info.value, ValueError)


def test_only_restricts_to_declared_columns() -> None:
    table = EncryptedTable("t", key="id", secrets=["a", "b", "c"], labels={"b": "Bee"})
    assert table.only(["c", "b"]).secrets == ("c", "b")
    assert table.only(["b"]).label("b") == "Bee"
    with pytest.raises(TableDefinitionError, match="not a secret column of t"):
        table.only(["z"])


def test_identifiers_are_quoted_never_pasted() -> None:
    assert quote_identifier('a"; DROP TABLE t; --') == '"a""; DROP TABLE t; --"'


# -- against the catalog -------------------------------------------------------------

ODD = '"Odd Schema"'


@pytest.fixture
async def odd(pool: asyncpg.Pool) -> asyncpg.Pool:
    """A table whose every name needs quoting, in a schema that is not public."""
    await pool.execute(
        f"""
        CREATE SCHEMA {ODD};
        CREATE TABLE {ODD}."Order" (
            "Key Col" text PRIMARY KEY,
            "order" text,
            "we""ird" varchar,
            "short" varchar(20),
            "number" integer,
            "nullable key" text UNIQUE,
            "a" text, "b" text,
            "not unique" text NOT NULL DEFAULT '',
            UNIQUE ("a", "b")
        );
        CREATE VIEW {ODD}."a view" AS SELECT 1 AS x;
        """
    )
    return pool


async def test_a_table_whose_names_need_quoting_resolves(odd: asyncpg.Pool) -> None:
    table = EncryptedTable("Order", schema="Odd Schema", key="Key Col", secrets=["order", 'we"ird'])
    resolved = await resolve_table(odd, table)
    assert resolved.schema == "Odd Schema"
    assert resolved.sql_name.text == '"Odd Schema"."Order"'
    assert resolved.key_type.text == "text"


@pytest.mark.parametrize(
    ("name", "key", "secrets", "message"),
    [
        ("Missing", "Key Col", ["order"], "does not exist"),
        ("order", "Key Col", ["order"], "does not exist"),  # case is kept, never folded
        ("Order", "Key Col", ["nope"], "has no column nope"),
        ("Order", "nope", ["order"], "has no key column nope"),
        ("Order", "Key Col", ["number"], "is int4: secret columns must be text or varchar"),
        ("Order", "Key Col", ["short"], r"varchar\(20\): too short"),
        ("Order", "nullable key", ["order"], "allows NULL"),
        ("Order", "not unique", ['we"ird'], "is not unique"),
        ("a view", "x", ["order"], "is not a table"),
    ],
)
async def test_a_table_that_does_not_fit_is_refused_naming_the_problem(
    odd: asyncpg.Pool, name: str, key: str, secrets: list[str], message: str
) -> None:
    table = EncryptedTable(name, schema="Odd Schema", key=key, secrets=secrets)
    with pytest.raises(TableDefinitionError, match=message):
        await resolve_table(odd, table)


async def test_a_key_unique_only_with_other_columns_is_a_composite_key(odd: asyncpg.Pool) -> None:
    await odd.execute(f'ALTER TABLE {ODD}."Order" ALTER COLUMN "a" SET NOT NULL')
    table = EncryptedTable("Order", schema="Odd Schema", key="a", secrets=["b"])
    with pytest.raises(TableDefinitionError, match="composite keys are not supported yet"):
        await resolve_table(odd, table)


async def test_without_a_schema_the_search_path_decides(odd: asyncpg.Pool) -> None:
    table = EncryptedTable("Order", key="Key Col", secrets=["order"])
    with pytest.raises(TableDefinitionError, match="does not exist on the search path"):
        await resolve_table(odd, table)
    async with odd.acquire() as conn:
        await conn.execute(f"SET search_path TO {ODD}, public")
        assert (await resolve_table(conn, table)).schema == "Odd Schema"
        await conn.execute("RESET search_path")
