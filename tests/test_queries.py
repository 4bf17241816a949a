"""Named SQL queries: pure parsing with file:line errors, and the shipped .sql files."""

from __future__ import annotations

import re

import pytest

from tenantstore import SqlFileError, TenantStoreError
from tenantstore._queries import (
    Query,
    Sql,
    identifier,
    join,
    load_queries,
    parse_queries,
    placeholder,
    render,
    sql_resource,
)

SHIPPED_FILES = (
    "tenants.sql",
    "secrets.sql",
    "tracking.sql",
    "catalog.sql",
    "operator.sql",
    "keys.sql",
    "live_cache.sql",
    "pooling.sql",
    "health.sql",
    "audit.sql",
)

TWO_QUERIES = """\
-- A file comment before the first name is allowed.

-- name: get_tenant
-- Fetch one tenant
-- by primary key.
SELECT tenant_id, name
FROM tenants
WHERE tenant_id = $1;

-- name: delete_tenant
DELETE FROM tenants WHERE tenant_id = $1;
"""


# -- parse_queries ---------------------------------------------------------------


def test_parse_finds_each_named_query_in_order() -> None:
    queries = parse_queries(TWO_QUERIES, source="q.sql")
    assert list(queries) == ["get_tenant", "delete_tenant"]
    assert all(isinstance(q, Query) for q in queries.values())


def test_parse_joins_doc_comment_lines() -> None:
    queries = parse_queries(TWO_QUERIES, source="q.sql")
    assert queries["get_tenant"].doc == "Fetch one tenant by primary key."
    assert queries["delete_tenant"].doc == ""


def test_parse_keeps_the_statement_without_doc_or_trailing_semicolon() -> None:
    queries = parse_queries(TWO_QUERIES, source="q.sql")
    assert queries["get_tenant"].sql == (
        "SELECT tenant_id, name\nFROM tenants\nWHERE tenant_id = $1"
    )
    assert queries["delete_tenant"].sql == "DELETE FROM tenants WHERE tenant_id = $1"


def test_parse_records_source_and_the_name_line() -> None:
    queries = parse_queries(TWO_QUERIES, source="sql/q.sql")
    assert (queries["get_tenant"].source, queries["get_tenant"].line) == ("sql/q.sql", 3)
    assert queries["delete_tenant"].line == 10


@pytest.mark.parametrize(
    ("statement", "expected"),
    [
        ("SELECT 1;", "SELECT 1"),
        ("SELECT 1 ;", "SELECT 1"),
        ("SELECT 1;;", "SELECT 1"),
        ("SELECT 1", "SELECT 1"),
        ("SELECT ';' AS x;", "SELECT ';' AS x"),
    ],
)
def test_parse_removes_only_trailing_semicolons(statement: str, expected: str) -> None:
    text = f"-- name: q\n{statement}\n"
    assert parse_queries(text, source="q.sql")["q"].sql == expected


def test_parse_keeps_comments_inside_a_statement_out_of_the_doc() -> None:
    text = "-- name: q\n-- Doc.\nSELECT 1\n-- inside\n, 2;\n"
    query = parse_queries(text, source="q.sql")["q"]
    assert query.doc == "Doc."
    assert query.sql == "SELECT 1\n-- inside\n, 2"


def test_parse_accepts_name_line_spacing_variants() -> None:
    text = "--name:a\nSELECT 1;\n--   name :  b  \nSELECT 2;\n"
    assert {q.name: q.sql for q in parse_queries(text, source="q.sql").values()} == {
        "a": "SELECT 1",
        "b": "SELECT 2",
    }


def test_parse_empty_text_gives_no_queries() -> None:
    assert parse_queries("", source="q.sql") == {}
    assert parse_queries("-- only a comment\n\n", source="q.sql") == {}


@pytest.mark.parametrize(
    ("text", "message", "line"),
    [
        pytest.param(
            "\nSELECT 1;\n-- name: q\nSELECT 2;", "SQL before the first", 2, id="sql-first"
        ),
        pytest.param(
            "-- name: q\nSELECT 1;\n\n-- name: q\nSELECT 2;",
            "duplicate query name 'q'",
            4,
            id="duplicate",
        ),
        pytest.param("-- name: GetTenant\nSELECT 1;", "invalid query name", 1, id="uppercase"),
        pytest.param("SELECT 0;\n", "SQL before the first", 1, id="no-name-at-all"),
        pytest.param("-- name: a\nSELECT 1;\n-- name: get-x\n", "invalid query name", 3, id="dash"),
        pytest.param("-- name: 1st\nSELECT 1;", "invalid query name", 1, id="digit-first"),
        pytest.param("-- name:\nSELECT 1;", "invalid query name ''", 1, id="empty-name"),
        pytest.param("\n\n-- name: q\n-- doc\n", "'q' has no statement", 3, id="empty-statement"),
    ],
)
def test_parse_errors_say_at_file_and_line(text: str, message: str, line: int) -> None:
    with pytest.raises(SqlFileError) as info:
        parse_queries(text, source="sql/bad.sql")
    assert message in str(info.value)
    assert str(info.value).endswith(f" at sql/bad.sql:{line}")
    assert isinstance(info.value, TenantStoreError)


def test_parse_error_for_a_statement_not_the_first_block_points_at_its_name_line() -> None:
    text = "-- name: a\nSELECT 1;\n\n-- name: b\n-- nothing here\n\n-- name: c\nSELECT 3;"
    with pytest.raises(SqlFileError, match=r"'b' has no statement at f\.sql:4$"):
        parse_queries(text, source="f.sql")


def test_parse_rejects_a_name_containing_whitespace() -> None:
    text = "-- name: a\nSELECT 1;\n\n-- name: get tenant\nSELECT 2;\n"
    with pytest.raises(SqlFileError, match=r"invalid query name 'get tenant' at f\.sql:4$"):
        parse_queries(text, source="f.sql")


def test_parse_rejects_a_statement_that_is_only_a_semicolon() -> None:
    with pytest.raises(SqlFileError, match=r"'q' has no statement at f\.sql:1$"):
        parse_queries("-- name: q\n;\n", source="f.sql")


# -- shipped files ---------------------------------------------------------------


def test_load_tenants_sql_has_the_repository_queries() -> None:
    queries = load_queries("tenants.sql")
    assert set(queries) == {
        "get_tenant",
        "get_tenants",
        "create_tenant",
        "set_secret",
        "set_secrets",
        "delete_tenant",
        "first_page_tenants",
        "next_page_tenants",
    }
    assert queries["get_tenant"].source == "sql/tenants.sql"
    assert queries["get_tenant"].doc


def test_load_secrets_and_tracking_sql_have_the_runner_queries() -> None:
    assert set(load_queries("secrets.sql")) == {
        "present",
        "count_rows",
        "first_page",
        "next_page",
        "write_assignment",
        "write_swapped",
        "write_written",
        "write_page",
        "current_values",
    }
    assert {"create_migrations_table", "table_row_count", "try_lock", "last_runs"} <= set(
        load_queries("tracking.sql")
    )


def test_every_shipped_sql_file_is_covered() -> None:
    shipped = {e.name for e in sql_resource().iterdir() if e.name.endswith(".sql")}
    assert shipped == set(SHIPPED_FILES)


def _shipped_queries() -> list[Query]:
    return [q for name in SHIPPED_FILES for q in load_queries(name).values()]


# The documented uses of format(): SQL's own, filling in a table name already
# resolved and quoted by regclass (%s) and a column quoted by %I, inside
# tracking.sql's row and value counting.
FORMAT_CALL = re.compile(r"format\('[^'{}]*%[sIL][^'{}]*',[^;]*?\)(?= INTO|\))")
FORMAT_ALLOWED = {
    ("sql/tracking.sql", "table_row_count"),
    ("sql/tracking.sql", "create_row_counter"),
    ("sql/tracking.sql", "create_value_counter"),
}
# Template fields: only simple names, filled by `render` with quoted identifiers.
TEMPLATE_FIELD = re.compile(r"\{[a-z_]+\}")


def test_format_is_used_only_by_the_documented_row_count() -> None:
    users = {(q.source, q.name) for q in _shipped_queries() if "format(" in q.sql}
    assert users
    assert users <= FORMAT_ALLOWED


@pytest.mark.parametrize("query", _shipped_queries(), ids=lambda q: f"{q.source}:{q.name}")
def test_shipped_query_uses_dollar_placeholders_and_no_python_formatting(query: Query) -> None:
    sql = query.sql
    if (query.source, query.name) in FORMAT_ALLOWED:
        sql = FORMAT_CALL.sub("", sql)
    sql = TEMPLATE_FIELD.sub("", sql)
    assert "{" not in sql
    assert "}" not in sql
    assert not re.search(r"%(?:\(\w+\))?[sdrif]", sql), "no Python %-format markers"
    assert not re.search(r"(?<![:\w]):[a-z_]+\b", sql), "named placeholders are not asyncpg's"
    assert "?" not in sql
    assert not re.search(r"%[sdrifIL]", sql), "no format() outside the documented counters"
    assert query.doc, "every query has a doc comment"
    numbers = sorted({int(n) for n in re.findall(r"\$(\d+)", sql)})
    assert numbers == list(range(1, len(numbers) + 1)), "placeholders are $1..$n"


def test_shipped_queries_with_parameters_number_them_from_one() -> None:
    with_params = [q for q in _shipped_queries() if re.search(r"\$\d", q.sql)]
    assert len(with_params) >= 15
    for query in with_params:
        assert "$1" in query.sql, query.name


# -- templates -------------------------------------------------------------------


def _template(text: str) -> Query:
    return parse_queries(f"-- name: t\n-- doc\n{text}\n", source="t.sql")["t"]


def test_identifiers_are_always_quoted_and_quotes_doubled() -> None:
    assert identifier("tenants").text == '"tenants"'
    assert identifier("order").text == '"order"'
    assert identifier('we"ird name').text == '"we""ird name"'
    assert identifier("MixedCase").text == '"MixedCase"'


def test_render_fills_fields_with_sql_pieces_only() -> None:
    query = _template("SELECT {columns} FROM {table} WHERE {key} = $1")
    sql = render(
        query,
        columns=join(", ", [identifier("a"), identifier("b c")]),
        table=identifier("t"),
        key=identifier("k"),
    )
    assert sql.text == 'SELECT "a", "b c" FROM "t" WHERE "k" = $1'
    with pytest.raises(TypeError, match="takes Sql, not str"):
        render(query, columns=Sql("x"), table="t; DROP TABLE t", key=Sql("k"))  # type: ignore[arg-type]


def test_render_reports_an_unfilled_field_or_a_format_spec_at_file_and_line() -> None:
    with pytest.raises(SqlFileError, match=r"\{key\} is not filled at t\.sql:1$"):
        render(_template("SELECT 1 WHERE {key} = $1"))
    with pytest.raises(SqlFileError, match=r"format spec at t\.sql:1$"):
        render(_template("SELECT {key!r}"), key=Sql("k"))


def test_placeholders_and_join_refuse_what_is_not_theirs() -> None:
    assert placeholder(3).text == "$3"
    with pytest.raises(ValueError, match="positive"):
        placeholder(0)
    with pytest.raises(TypeError, match="Sql pieces only"):
        join(", ", ["a"])  # type: ignore[list-item]
