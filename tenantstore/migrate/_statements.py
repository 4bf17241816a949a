"""The batch runner's statements for one resolved table and a choice of its columns.

Rendered once per run from the templates in `sql/secrets.sql`: only quoted
identifiers, generated column aliases and a whitelisted key type go in;
every value stays a `$n` parameter.
"""

from __future__ import annotations

from dataclasses import dataclass

from .._catalog import ResolvedTable
from .._queries import Sql, identifier, join, load_queries, placeholder, render

__all__ = ["RunnerStatements"]

_T = load_queries("secrets.sql")

FIRST_ARRAY = 4
"""The write's first old/new array parameter: $1 is the keys, $2 and $3 the page's bounds."""


@dataclass(frozen=True, slots=True)
class RunnerStatements:
    """SQL text of each statement the runner sends, for one table and set of columns."""

    count_rows: str
    first_page: str
    next_page: str
    write_page: str
    current_values: str

    @classmethod
    def build(cls, resolved: ResolvedTable) -> RunnerStatements:
        """Render the templates for `resolved` (its table's secret columns, in order)."""
        table = resolved.table
        columns = [identifier(column) for column in table.secrets]
        common = {
            "table": resolved.sql_name,
            "key": identifier(table.key),
            "key_type": resolved.key_type,
            "columns": join(", ", columns),
            "any_present": join(" OR ", (render(_T["present"], column=c) for c in columns)),
        }
        olds = [identifier(f"o{i}") for i in range(len(columns))]
        news = [identifier(f"n{i}") for i in range(len(columns))]
        each = [
            {"column": c, "old": o, "new": n} for c, o, n in zip(columns, olds, news, strict=True)
        ]
        arrays = [
            Sql(f"{placeholder(FIRST_ARRAY + i).text}::text[]") for i in range(2 * len(columns))
        ]
        write = render(
            _T["write_page"],
            **common,
            assignments=join(", ", (render(_T["write_assignment"], **e) for e in each)),
            arrays=join(", ", arrays),
            pairs=join(", ", (p for o, n in zip(olds, news, strict=True) for p in (o, n))),
            any_swapped=join(" OR ", (render(_T["write_swapped"], **e) for e in each)),
            written=join(", ", (render(_T["write_written"], **e) for e in each)),
        )
        return cls(
            count_rows=render(_T["count_rows"], **common).text,
            first_page=render(_T["first_page"], **common).text,
            next_page=render(_T["next_page"], **common).text,
            write_page=write.text,
            current_values=render(_T["current_values"], **common).text,
        )
