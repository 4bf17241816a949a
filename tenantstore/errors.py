"""Every error tenantstore raises, under one root.

Catch `TenantStoreError` to catch them all. The tree::

    TenantStoreError
    ├── ConfigurationError (ValueError)
    │   ├── EmptySettingError
    │   ├── EncryptionKeyMissingError
    │   ├── InvalidEncryptionKeyError
    │   ├── InvalidTenantIdError
    │   ├── TableDefinitionError
    │   └── UnknownSecretError
    ├── EncryptionError (ValueError)
    ├── DecryptionError
    │   └── TenantDecryptionError
    ├── PlaintextSecretError
    ├── TenantExistsError
    ├── TenantNotFoundError (LookupError)
    ├── DatabaseError
    ├── SqlFileError
    └── MigrationError
        ├── MigrationChecksumError
        └── DestructiveMigrationError

Messages and attributes carry names (settings, tenant ids, files), never a
key or a secret value.

This module is also the one place where a driver's or parser's error becomes
text (`describe_driver_error`) or one of ours (`database_error`). PostgreSQL
puts row values in an error's DETAIL, a trigger can put them in its message,
asyncpg repeats query arguments in its `DataError`, and a URL parser echoes
the URL: so what passes is the error's class, SQLSTATE, the names of the
constraint, table, column and raising function, and the server's own message
only where that message is known to name objects and never values.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = [
    "ConfigurationError",
    "DatabaseError",
    "DecryptionError",
    "DestructiveMigrationError",
    "EmptySettingError",
    "EncryptionError",
    "EncryptionKeyMissingError",
    "InvalidEncryptionKeyError",
    "InvalidTenantIdError",
    "MigrationChecksumError",
    "MigrationError",
    "PlaintextSecretError",
    "SqlFileError",
    "TableDefinitionError",
    "TenantDecryptionError",
    "TenantExistsError",
    "TenantNotFoundError",
    "TenantStoreError",
    "UnknownSecretError",
]
# Also here, for tenantstore's own modules: database_error, describe_driver_error, printable.


class TenantStoreError(Exception):
    """Root of every error raised by tenantstore."""


class ConfigurationError(TenantStoreError, ValueError):
    """A setting or argument is missing or malformed."""


class EmptySettingError(ConfigurationError):
    """A setting is present but blank, as `export NAME="$UNSET_VARIABLE"` leaves it.

    Kept apart from a missing setting on purpose: a blank key is a mistake to
    fix, never a reason to carry on as if no key had been configured (the
    migration CLI tolerates a missing `ENCRYPTION_KEY` for some commands, not
    this). The message names the setting only.

    Attributes:
        setting: the setting's name; `OLD_ENCRYPTION_KEY[1]` for an entry of a list.
    """

    def __init__(self, setting: str) -> None:
        self.setting = setting
        super().__init__(f"{setting} is set but empty: give it a value or remove the setting")


class EncryptionKeyMissingError(ConfigurationError):
    """No primary encryption key is configured: tenantstore fails closed."""

    def __init__(self, setting: str = "ENCRYPTION_KEY") -> None:
        self.setting = setting
        super().__init__(
            f"{setting} environment variable not set: refusing to read or write secrets "
            "without a key (generate one with `python -m tenantstore.keys generate`)"
        )


class InvalidEncryptionKeyError(ConfigurationError):
    """A configured key is not a 32-byte url-safe base64 Fernet key.

    The message names the setting, never the key itself.
    """

    def __init__(self, setting: str) -> None:
        self.setting = setting
        super().__init__(
            f"{setting} is not a valid Fernet key: expected 44 characters of url-safe "
            "base64 encoding 32 bytes"
        )


class InvalidTenantIdError(ConfigurationError):
    """A tenant id cannot be stored in PostgreSQL (empty, NUL byte, invalid unicode, too long)."""


class TableDefinitionError(ConfigurationError):
    """An encrypted table's declaration does not fit the names or the catalog.

    The message names the table or column and what is wrong with it (missing,
    not text, key not unique or nullable, ...); nothing has been changed.
    """


class UnknownSecretError(ConfigurationError):
    """A secret name that the table does not declare (`set_secrets(oauth_tokn=...)`)."""


class EncryptionError(TenantStoreError, ValueError):
    """A secret cannot be encrypted or stored; the message says why, never what it is."""

    def __init__(self, reason: str = "it is not valid unicode (lone surrogate)") -> None:
        self.reason = reason
        super().__init__(f"Value cannot be encrypted: {reason}")


class DecryptionError(TenantStoreError):
    """A token is corrupt or was encrypted under none of the configured keys."""

    def __init__(self, message: str = "Invalid encrypted data or wrong encryption key") -> None:
        super().__init__(message)


class TenantDecryptionError(DecryptionError):
    """A stored secret could not be decrypted; `tenant_id` and `column` say which.

    The message reads `Failed to decrypt <label> for tenant <id>`, where the
    label is the column's human name when it has one (`Gemini API key`).
    """

    def __init__(self, tenant_id: str, column: str, *, label: str | None = None) -> None:
        self.tenant_id = tenant_id
        self.column = column
        super().__init__(
            f"Failed to decrypt {label or printable(column)} for tenant {printable(tenant_id)}"
        )


class PlaintextSecretError(TenantStoreError):
    """A stored secret is plaintext where a token was required (`allow_plaintext=False`).

    `tenant_id` and `column` say which, for the repository; `AsyncCrypto`
    names the value's position in the list instead.
    """

    def __init__(
        self,
        tenant_id: str | None,
        column: str | None,
        *,
        label: str | None = None,
        position: int | None = None,
    ) -> None:
        self.tenant_id = tenant_id
        self.column = column
        self.position = position
        if tenant_id is None:
            what = f"value {position}" if position is not None else "a value"
        else:
            what = f"{label or printable(column or 'secret')} for tenant {printable(tenant_id)}"
        super().__init__(
            f"{what} is stored as plaintext (run `python -m tenantstore.migrate encrypt`)"
        )


class TenantExistsError(TenantStoreError):
    """A tenant with this id already exists."""

    def __init__(self, tenant_id: str) -> None:
        self.tenant_id = tenant_id
        super().__init__(f"Tenant {printable(tenant_id)} already exists")


class TenantNotFoundError(TenantStoreError, LookupError):
    """No tenant has this id."""

    def __init__(self, tenant_id: str) -> None:
        self.tenant_id = tenant_id
        super().__init__(f"Tenant {printable(tenant_id)} not found")


class DatabaseError(TenantStoreError):
    """PostgreSQL or the connection to it failed.

    The message is built by `describe_driver_error`: class, SQLSTATE and object
    names, never row values. The driver's error is not chained (its DETAIL
    holds row values and a traceback would print it); `driver_error` holds a
    sanitised copy instead: the same asyncpg class and SQLSTATE, no DETAIL,
    no query.

    Attributes:
        operation: what tenantstore was doing (`get_tenant`, `encrypt`, ...).
        sqlstate: PostgreSQL's error code, when the server sent one.
        constraint_name: the violated constraint, when there is one.
        tenant_id: the row's key, when one row was concerned.
        driver_error: the sanitised copy of the driver's error, or None.
    """

    driver_error: BaseException | None = None

    def __init__(
        self,
        message: str,
        *,
        operation: str | None = None,
        sqlstate: str | None = None,
        constraint_name: str | None = None,
        tenant_id: str | None = None,
    ) -> None:
        self.operation = operation
        self.sqlstate = sqlstate
        self.constraint_name = constraint_name
        self.tenant_id = tenant_id
        super().__init__(message)


class MigrationError(TenantStoreError):
    """A schema or data migration could not be applied."""


class SqlFileError(TenantStoreError):
    """A migration or named-query file is malformed; the message names file and line."""


class MigrationChecksumError(MigrationError):
    """An applied migration file has changed since it was applied."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        super().__init__(
            f"Migration {filename} was changed after it was applied (checksum differs); "
            "restore the original file and add a new migration instead"
        )


class DestructiveMigrationError(MigrationError):
    """A down step would drop a table that still holds rows, or a column that holds values."""

    def __init__(self, filename: str, table: str, rows: int, *, column: str | None = None) -> None:
        self.filename = filename
        self.table = table
        self.column = column
        self.rows = rows
        what = f"table {table}, which holds {rows} rows"
        if column is not None:
            what = f"column {table}.{column}, which holds {rows} values"
        super().__init__(
            f"Refusing {filename}: it drops {what} (pass --yes / confirm=True to drop them)"
        )


# SQLSTATE classes whose server-made messages name objects (constraints,
# relations, columns, roles) and put row values only in DETAIL. Class 22
# (data exceptions: "invalid input syntax for type uuid: \"...\"") is not
# one of them, nor P0 (a PL/pgSQL RAISE says whatever its author wrote).
_OBJECT_ONLY_CLASSES = frozenset(
    {"08", "0A", "23", "25", "28", "3D", "3F", "40", "42", "53", "54", "55", "57", "58"}
)
# Server functions that emit a message written by user code, whatever its SQLSTATE.
_USER_MESSAGE_SOURCES = frozenset(
    {"exec_stmt_raise", "exec_stmt_assert", "PLy_elog", "PLy_elog_impl", "PLy_output", "elog"}
)
_FUNCTION_IN_CONTEXT = re.compile(r"(?:PL/\w+|SQL) function ([\w.$\"]{1,200})\(")
_NAME_FIELDS = (
    ("constraint_name", "constraint"),
    ("schema_name", "schema"),
    ("table_name", "table"),
    ("column_name", "column"),
    ("data_type_name", "type"),
)


def _server_message(exc: BaseException) -> str | None:
    """The server's message when it cannot hold a value from a row, else None."""
    sqlstate = getattr(exc, "sqlstate", None)
    message = getattr(exc, "message", None)
    if not isinstance(sqlstate, str) or not isinstance(message, str):
        return None
    if sqlstate[:2] not in _OBJECT_ONLY_CLASSES:
        return None
    if getattr(exc, "server_source_function", None) in _USER_MESSAGE_SOURCES:
        return None
    if getattr(exc, "context", None):
        # Raised inside a function or trigger (RAISE ... USING ERRCODE =
        # 'check_violation', a PL/Python or PL/Perl error): the message may be
        # the function author's, holding any value.
        return None
    return printable(message)


def printable(text: str) -> str:
    """`text` as it is when printable, else with control characters escaped.

    Every id or name that came from the database goes through this before it
    reaches a message or a log line, so a tenant id holding a newline cannot
    forge a line of output.
    """
    if text.isprintable():
        return text
    return text.encode("unicode_escape").decode("ascii")


def describe_driver_error(exc: BaseException) -> str:
    """Describe a driver, parser or OS error without any value it may carry.

    `CheckViolationError (SQLSTATE 23514): new row for relation "tenants"
    violates check constraint "key_shape"`, or for a trigger's RAISE
    `RaiseError (SQLSTATE P0001) in function reject_key`. PostgreSQL errors
    keep their class, SQLSTATE, object names and, from the SQLSTATE classes
    whose messages name objects only, the server's message; OS errors keep
    their errno text; anything else (asyncpg's `DataError`, which quotes query
    arguments, or a URL parser's `ValueError`) only its class name.
    """
    name = type(exc).__name__
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(sqlstate, str) and hasattr(exc, "message"):
        text = f"{name} (SQLSTATE {printable(sqlstate)})"
        message = _server_message(exc)
        if message:
            text += f": {message}"
        function = _FUNCTION_IN_CONTEXT.search(getattr(exc, "context", None) or "")
        if function:
            text += f" in function {printable(function[1])}"
        names = [
            f'{label} "{printable(value)}"'
            for attribute, label in _NAME_FIELDS
            if isinstance(value := getattr(exc, attribute, None), str)
            and value
            and (message is None or f'"{value}"' not in message)
        ]
        if names:
            text += f" ({', '.join(names)})"
        return text
    if isinstance(exc, OSError) and exc.errno is not None and exc.strerror:
        return f"{name}: [Errno {exc.errno}] {exc.strerror}"
    return name


def _sanitised_copy(exc: BaseException) -> BaseException | None:
    """The same asyncpg error class without DETAIL, hint, query or user message."""
    new = getattr(type(exc), "new", None)
    sqlstate = getattr(exc, "sqlstate", None)
    if new is None or not isinstance(sqlstate, str):
        return None
    fields: dict[str, Any] = {"C": sqlstate, "M": describe_driver_error(exc)}
    for code, attribute in (("n", "constraint_name"), ("s", "schema_name"),
                            ("t", "table_name"), ("c", "column_name")):  # fmt: skip
        value = getattr(exc, attribute, None)
        if isinstance(value, str):
            fields[code] = value
    try:
        copy: BaseException = new(fields)
    except Exception:  # an unexpected driver version: no copy is better than a leak
        return None
    return copy


def database_error(
    exc: BaseException, operation: str, *, tenant_id: str | None = None
) -> DatabaseError:
    """Translate a driver error into a `DatabaseError` that holds no row value.

    Use as `raise database_error(exc, "get_tenant", tenant_id=...) from None`
    inside the `except` block, so neither a traceback nor a logging handler
    ever prints the original's DETAIL; a sanitised copy of `exc` is kept as
    `driver_error`.
    """
    where = f" for tenant {printable(tenant_id)}" if tenant_id is not None else ""
    error = DatabaseError(
        f"{operation} failed{where}: {describe_driver_error(exc)}",
        operation=operation,
        sqlstate=getattr(exc, "sqlstate", None),
        constraint_name=getattr(exc, "constraint_name", None),
        tenant_id=tenant_id,
    )
    error.driver_error = _sanitised_copy(exc)
    return error
