"""Named SQL queries, kept in `.sql` files under `sql/` (shipped as `tenantstore.sql`).

A file holds blocks in aiosql's convention::

    -- name: get_tenant
    -- Fetch one tenant by primary key.
    SELECT ... WHERE tenant_id = $1;

Parsing (`parse_queries`) is pure; `load_queries` reads a file through
`importlib.resources`, so it works from a wheel as well as a checkout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable

from .errors import SqlFileError

__all__ = ["Query", "load_queries", "parse_queries", "sql_resource"]

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
