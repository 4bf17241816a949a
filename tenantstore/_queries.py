"""Named SQL queries, kept in `.sql` files under `sql/` (shipped as `tenantstore.sql`).

A file holds blocks in aiosql's convention::

    -- name: get_tenant
    -- Fetch one tenant by primary key.
    SELECT ... WHERE tenant_id = $1;

Parsing (`parse_queries`) is pure; `load_queries` reads a file through
`importlib.resources`, so it works from a wheel as well as a checkout.

Statements over a declared table are templates: `{table}`, `{key}` and the
like are filled by `render` with `Sql` pieces only, which come from
`identifier` (a quoted name), `placeholder` (`$n`), other rendered templates
or `join`. A plain `str` is refused, so a value can never become SQL text.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable

from .errors import SqlFileError
from .tables import quote_identifier

__all__ = [
    "Query",
    "Sql",
    "identifier",
    "join",
    "load_queries",
    "parse_queries",
    "placeholder",
    "render",
    "sql_resource",
]

_NAME_LINE = re.compile(r"--\s*name\s*:\s*(?P<name>.*?)\s*$")
_VALID_NAME = re.compile(r"[a-z_][a-z0-9_]*")


@dataclass(frozen=True, slots=True)
class Query:
    """One named statement: its SQL text, doc comment and where it was defined."""

    name: str
    sql: str
    doc: str
    source: str
    line: int


def parse_queries(text: str, *, source: str) -> dict[str, Query]:
    """Split `text` into named queries.

    Raises:
        SqlFileError: text before the first `-- name:`, a bad or duplicate
            name, or a name with no statement; the message says `at file:line`.
    """
    queries: dict[str, Query] = {}
    name: str | None = None
    start = 0
    doc: list[str] = []
    body: list[str] = []

    def finish() -> None:
        if name is None:
            return
        sql = "\n".join(body).strip().rstrip(";").rstrip()
        if not sql:
            raise SqlFileError(f"query {name!r} has no statement at {source}:{start}")
        queries[name] = Query(name, sql, " ".join(doc), source, start)

    for lineno, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        match = _NAME_LINE.match(stripped)
        if match:
            finish()
            name, start, doc, body = match["name"], lineno, [], []
            if not _VALID_NAME.fullmatch(name):
                raise SqlFileError(f"invalid query name {name!r} at {source}:{lineno}")
            if name in queries:
                raise SqlFileError(f"duplicate query name {name!r} at {source}:{lineno}")
        elif name is None:
            if stripped and not stripped.startswith("--"):
                raise SqlFileError(f"SQL before the first '-- name:' at {source}:{lineno}")
        elif not body and stripped.startswith("--"):
            doc.append(stripped.lstrip("-").strip())
        elif body or stripped:
            body.append(line)
    finish()
    return queries


def sql_resource(*parts: str) -> Traversable:
    """Return the packaged SQL resource at `parts` (e.g. `"migrations"`)."""
    resource = files("tenantstore.sql")
    for part in parts:
        resource = resource / part
    return resource


def load_queries(filename: str) -> dict[str, Query]:
    """Read and parse one named-query file shipped in `tenantstore.sql`."""
    resource = sql_resource(filename)
    return parse_queries(resource.read_text(encoding="utf-8"), source=f"sql/{filename}")


@dataclass(frozen=True, slots=True)
class Sql:
    """SQL text that is safe to splice into a template.

    Made only by `identifier`, `placeholder`, `join`, `render`, or from a
    fixed string in tenantstore's own code (a type name from a whitelist).
    """

    text: str


def identifier(name: str) -> Sql:
    """A quoted identifier (`order` -> `"order"`); see `tables.quote_identifier`."""
    return Sql(quote_identifier(name))


def placeholder(number: int) -> Sql:
    """The parameter placeholder `$number`."""
    if not isinstance(number, int) or number < 1:
        raise ValueError("placeholder number is expected to be a positive int")
    return Sql(f"${number}")


def join(separator: str, parts: Iterable[Sql]) -> Sql:
    """Join pieces with a separator written in tenantstore's code (`", "`, `" OR "`)."""
    pieces = list(parts)
    if not all(isinstance(part, Sql) for part in pieces):
        raise TypeError("join takes Sql pieces only")
    return Sql(separator.join(part.text for part in pieces))


_FORMATTER = string.Formatter()


def render(query: Query, /, **parts: Sql) -> Sql:
    """Fill a template's `{name}` fields with `Sql` pieces.

    Raises:
        SqlFileError: the template has a field no piece is given for, or a
            format spec or conversion (`{x!r}`, `{x:>5}`); at file:line.
        TypeError: a piece is not `Sql` (a plain str would paste a value).
    """
    out: list[str] = []
    for literal, field, spec, conversion in _FORMATTER.parse(query.sql):
        out.append(literal)
        if field is None:
            continue
        where = f"{query.source}:{query.line}"
        if spec or conversion:
            raise SqlFileError(f"template field {{{field}}} has a format spec at {where}")
        if field not in parts:
            raise SqlFileError(f"template field {{{field}}} is not filled at {where}")
        piece = parts[field]
        if not isinstance(piece, Sql):
            raise TypeError(f"template field {field} takes Sql, not {type(piece).__name__}")
        out.append(piece.text)
    return Sql("".join(out))
