"""Encrypted tables, declared once: the table, its key column, its secret columns.

`EncryptedTable` is pure data, validated when built. Every layer derives
from it: the repository's statements, the batch runner's pages and writes,
`verify`'s and `status`'s counts per column, the log lines. The names are
checked against the catalog before anything runs (`tenantstore._catalog`)
and reach SQL only quoted (`quote_identifier`), never pasted.

    TENANTS = EncryptedTable(
        "tenants", key="tenant_id",
        secrets=("gemini_api_key", "oauth_access_token", "oauth_refresh_token",
                 "webhook_signing_secret"),
    )
    integrations = EncryptedTable("integrations", schema="app", key="id",
                                  secrets=("client_secret",))
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .errors import TableDefinitionError, printable

__all__ = ["MAX_IDENTIFIER_BYTES", "EncryptedTable", "parse_qualified_name", "quote_identifier"]

MAX_IDENTIFIER_BYTES = 63
"""PostgreSQL's NAMEDATALEN - 1: a longer name would be truncated, silently."""


def check_identifier(name: object, what: str) -> str:
    """Return `name` if PostgreSQL can hold it as an identifier, else raise naming `what`.

    Raises:
        TableDefinitionError: not a str, empty, holding a NUL character or
            invalid unicode, or longer than 63 bytes in UTF-8.
    """
    if not isinstance(name, str):
        raise TableDefinitionError(f"{what} must be a str, not {type(name).__name__}")
    if not name:
        raise TableDefinitionError(f"{what} must not be empty")
    if "\x00" in name:
        raise TableDefinitionError(f"{what} {printable(name)} holds a NUL character")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise TableDefinitionError(f"{what} must be valid unicode (no lone surrogates)") from None
    if size > MAX_IDENTIFIER_BYTES:
        raise TableDefinitionError(
            f"{what} {printable(name)} is longer than PostgreSQL's "
            f"{MAX_IDENTIFIER_BYTES}-byte identifier limit"
        )
    return name


def quote_identifier(name: str) -> str:
    """Quote `name` as a PostgreSQL identifier: `order` -> `"order"`, `a"b` -> `"a""b"`.

    Always quoted, so case, spaces and keywords survive as written.

    Raises:
        TableDefinitionError: `name` cannot be an identifier (see `check_identifier`).
    """
    check_identifier(name, "identifier")
    return '"' + name.replace('"', '""') + '"'


def _display(name: str) -> str:
    """A name as a user would type it: bare when it is a plain lower-case word."""
    plain = name.isidentifier() and name.isascii() and name == name.lower()
    return name if plain else quote_identifier(name)


def parse_qualified_name(text: str) -> tuple[str | None, str]:
    """Split `[SCHEMA.]NAME` as psql would: `"My Schema"."a.b"` -> ("My Schema", "a.b").

    An unquoted part keeps its case as typed (tenantstore never folds case:
    what the catalog holds is what you write). Inside double quotes a dot is
    part of the name and `""` is one quote.

    Raises:
        TableDefinitionError: unbalanced quotes, an empty part, or more than two parts.
    """
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    index = 0
    while index < len(text):
        char = text[index]
        if quoted:
            if char == '"':
                if text[index + 1 : index + 2] == '"':
                    current.append('"')
                    index += 1
                else:
                    quoted = False
            else:
                current.append(char)
        elif char == '"':
            quoted = True
        elif char == ".":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
        index += 1
    if quoted:
        raise TableDefinitionError(f"unbalanced double quote in table name {printable(text)}")
    parts.append("".join(current))
    if len(parts) > 2 or not all(parts):
        raise TableDefinitionError(
            f"table name {printable(text)} is not [SCHEMA.]NAME "
            '(quote a name holding a dot: "my.table")'
        )
    return (None, parts[0]) if len(parts) == 1 else (parts[0], parts[1])


@dataclass(frozen=True, slots=True, init=False)
class EncryptedTable:
    """A table whose secret columns tenantstore encrypts.

    Args:
        name: the table's name as the catalog holds it (case and all), or
            `"schema.name"` (split as psql would; quote a part holding a dot).
        key: the key column: unique and NOT NULL (checked against the
            catalog); pages and compare-and-swap writes are keyed by it.
        secrets: the secret columns (`text` or `varchar`), in order.
        schema: the table's schema; None finds it on the search path.
        labels: human names of some secret columns for messages
            (`{"gemini_api_key": "Gemini API key"}`); others show their name.

    Raises:
        TableDefinitionError (a ValueError): a name cannot be an identifier, a
            column is given twice, the key is also a secret, no secret is
            given, or several key columns are (composite keys are not
            supported yet).
    """

    schema: str | None
    name: str
    key: str
    secrets: tuple[str, ...]
    labels: tuple[tuple[str, str], ...]

    def __init__(
        self,
        name: str,
        *,
        key: str | Iterable[str],
        secrets: Iterable[str],
        schema: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        if schema is None and isinstance(name, str) and ("." in name or '"' in name):
            schema, name = parse_qualified_name(name)
        if schema is not None:
            check_identifier(schema, "schema")
        check_identifier(name, "table name")
        if not isinstance(key, str):
            keys = list(key)
            if len(keys) != 1:
                raise TableDefinitionError(
                    f"table {printable(name)}: composite keys ({len(keys)} columns) are not "
                    "supported yet; give one unique, NOT NULL key column"
                )
            key = keys[0]
        check_identifier(key, "key column")
        if isinstance(secrets, str):
            raise TableDefinitionError(
                f"secrets must be a sequence of column names, not the str {printable(secrets)!r}"
            )
        columns = tuple(check_identifier(column, "secret column") for column in secrets)
        if not columns:
            raise TableDefinitionError(f"table {printable(name)} declares no secret column")
        seen: set[str] = set()
        for column in columns:
            if column in seen:
                raise TableDefinitionError(f"secret column {printable(column)} is given twice")
            if column == key:
                raise TableDefinitionError(
                    f"column {printable(column)} cannot be both the key and a secret"
                )
            seen.add(column)
        chosen_labels = tuple((c, labels[c]) for c in columns if labels and c in labels)
        object.__setattr__(self, "labels", chosen_labels)
        object.__setattr__(self, "schema", schema)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "secrets", columns)

    def __repr__(self) -> str:
        return (
            f"EncryptedTable({self.qualified_name!r}, key={self.key!r}, secrets={self.secrets!r})"
        )

    @property
    def qualified_name(self) -> str:
        """The name for messages and logs: `tenants`, `app."Integrations"`."""
        if self.schema is None:
            return printable(_display(self.name))
        return printable(f"{_display(self.schema)}.{_display(self.name)}")

    def label(self, column: str) -> str:
        """The human name of a secret column for messages: its label, else its name."""
        return dict(self.labels).get(column) or printable(column)

    def only(self, columns: Iterable[str]) -> EncryptedTable:
        """The same table restricted to some of its secret columns (`--column`).

        Raises:
            TableDefinitionError: a column is not one of this table's secrets,
                or is given twice.
        """
        chosen = list(columns)
        for column in chosen:
            if column not in self.secrets:
                raise TableDefinitionError(
                    f"{printable(column)} is not a secret column of {self.qualified_name} "
                    f"(its secret columns: {', '.join(map(_display, self.secrets))})"
                )
        return EncryptedTable(
            self.name, schema=self.schema, key=self.key, secrets=chosen, labels=dict(self.labels)
        )
