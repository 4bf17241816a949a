"""Operator tools for one tenant's secrets: inspect their state, re-enter one.

The library behind `python -m tenantstore.tenants` (see `__main__`), for the
troubleshooting advice "re-enter the secret for that tenant":

- `show_tenant` reads a tenant and says, per secret column of `TENANTS`,
  whether it is absent, plaintext, a token under which configured key
  (primary or previous), or undecryptable. It never returns a value.
- `stored_secret` and `set_secret` re-enter one secret with compare-and-swap:
  read the stored value, encrypt the new one off the event loop, then write
  it only while the column still holds what was read. The CLI reads before
  it prompts and passes that value as `expected`, so an application write
  that lands while the operator types is never overwritten.
- `read_secret_value` and `parse_piped_value` get the new value from a
  hidden terminal prompt or from stdin, never from the command line.

Every statement is a template from `sql/operator.sql`, filled with quoted
names from `TENANTS` and the schema `resolve_table` found.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Literal

import anyio.to_thread
import asyncpg

from .._catalog import ResolvedTable, resolve_table
from .._queries import identifier, join, load_queries, render
from ..encryption import KeyRing, stored_token
from ..errors import (
    EncryptionError,
    TableDefinitionError,
    TenantNotFoundError,
    TenantStoreError,
    UnknownSecretError,
    database_error,
    printable,
)
from ..models import TENANTS
from ..repository import validate_tenant_id
from ._input import MAX_SECRET_BYTES, SecretInputError, parse_piped_value, read_secret_value

__all__ = [
    "MASK",
    "MAX_SECRET_BYTES",
    "READ_CURRENT",
    "SecretChangedError",
    "SecretInputError",
    "SecretState",
    "SecretWritten",
    "TenantView",
    "check_secret_column",
    "classify_secrets",
    "parse_piped_value",
    "read_secret_value",
    "set_secret",
    "show_tenant",
    "stored_secret",
]

MASK: Final = "**********"
"""What `show` prints in place of every stored secret, whatever its length."""

_DRIVER_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)
_Q = load_queries("operator.sql")
_MIGRATE_HINT = "apply the schema with `python -m tenantstore.migrate up`"

State = Literal["absent", "encrypted", "plaintext", "undecryptable"]


class SecretChangedError(TenantStoreError):
    """The secret changed between the read and the compare-and-swap write: nothing was written.

    Attributes:
        tenant_id: the tenant.
        column: the secret column.
    """

    def __init__(self, tenant_id: str, column: str) -> None:
        self.tenant_id = tenant_id
        self.column = column
        super().__init__(
            f"{printable(column)} of tenant {printable(tenant_id)} was changed by another "
            "writer while this command ran; nothing was written: run the command again"
        )


class _ReadCurrent:
    """Type of `READ_CURRENT`."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "READ_CURRENT"


READ_CURRENT: Final = _ReadCurrent()
"""`set_secret(expected=READ_CURRENT)`: read the stored value just before the write."""


# -- the state of stored secrets -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SecretState:
    """What one stored secret is, without its value.

    Attributes:
        column: the secret column.
        label: its human name (`Gemini API key`).
        state: `absent` (NULL or empty), `encrypted`, `plaintext` or `undecryptable`.
        key_id: for `encrypted`, the id of the key that decrypts it; None when
            no key was configured to tell (`encrypted (key unknown)`).
        primary: for `encrypted` with a known key, whether it is the primary one.
    """

    column: str
    label: str
    state: State
    key_id: str | None = None
    primary: bool | None = None

    def describe(self) -> str:
        """`absent`, `plaintext`, `encrypted (key 0a1b2c3d4e5f, primary)`, ..."""
        if self.state == "encrypted":
            if self.key_id is None:
                return "encrypted (key unknown)"
            role = "primary" if self.primary else "previous"
            return f"encrypted (key {self.key_id}, {role})"
        if self.state == "undecryptable":
            return "undecryptable (none of the configured keys)"
        return self.state

    def to_dict(self) -> dict[str, Any]:
        """The state for `--json`; `value` is the mask, or None when absent."""
        role = None if self.primary is None else ("primary" if self.primary else "previous")
        return {
            "column": self.column,
            "label": self.label,
            "state": self.state,
            "key_id": self.key_id,
            "key": role,
            "value": None if self.state == "absent" else MASK,
            "description": self.describe(),
        }


def classify_secrets(
    keyring: KeyRing | None, stored: Mapping[str, str | None]
) -> list[SecretState]:
    """Say what each stored value is, in `TENANTS`' declared order (CPU work: run off the loop).

    A value with surrounding whitespace around a token counts as that token
    (`encryption.stored_token`). Without a key ring a token's key is unknown.
    Decryption is the only way to tell which key made a token (a Fernet
    token does not name its key); the plaintexts are dropped at once.

    Args:
        keyring: the configured keys, or None when `ENCRYPTION_KEY` is not set.
        stored: column -> stored value, for every secret column of `TENANTS`.

    Returns:
        One `SecretState` per secret column of `TENANTS`.
    """
    states: list[SecretState | None] = []
    tokens: list[tuple[int, str]] = []
    for column in TENANTS.secrets:
        value = stored[column]
        label = TENANTS.label(column)
        if not value:
            states.append(SecretState(column, label, "absent"))
            continue
        token = stored_token(value)
        if token is None:
            states.append(SecretState(column, label, "plaintext"))
        elif keyring is None:
            states.append(SecretState(column, label, "encrypted"))
        else:
            tokens.append((len(states), token))
            states.append(None)
    if keyring is not None and tokens:
        results = keyring.decrypt_batch_with_key_index([token for _, token in tokens])
        key_ids = keyring.key_ids
        for (at, _), result in zip(tokens, results, strict=True):
            column = TENANTS.secrets[at]
            label = TENANTS.label(column)
            if result is None:
                states[at] = SecretState(column, label, "undecryptable")
            else:
                index = result[1]
                states[at] = SecretState(column, label, "encrypted", key_ids[index], index == 0)
    return [state for state in states if state is not None]


@dataclass(frozen=True, slots=True)
class TenantView:
    """A tenant as `show` prints it: every secret masked, with its state.

    Attributes:
        tenant_id: the tenant's id.
        name: its name.
        created_at: when it was created.
        updated_at: when it last changed.
        secrets: one `SecretState` per secret column, in declared order.
        keys_configured: False when no `ENCRYPTION_KEY` was set, so tokens'
            keys are unknown and undecryptable ones cannot be told apart.
    """

    tenant_id: str
    name: str
    created_at: datetime
    updated_at: datetime
    secrets: tuple[SecretState, ...] = field(default=())
    keys_configured: bool = True

    def lines(self) -> list[str]:
        """The text `show` prints: ids through `printable`, secrets masked."""
        out = [
            f"Tenant:  {printable(self.tenant_id)}",
            f"Name:    {printable(self.name)}",
            f"Created: {self.created_at.isoformat()}",
            f"Updated: {self.updated_at.isoformat()}",
            "Secrets:",
        ]
        for secret in self.secrets:
            shown = "" if secret.state == "absent" else f"{MASK}  "
            named = (
                secret.column
                if secret.label == secret.column
                else (f"{secret.column} ({secret.label})")
            )
            out.append(f"  {named}: {shown}{secret.describe()}")
        return out

    def to_dict(self) -> dict[str, Any]:
        """The tenant for `--json`."""
        return {
            "tenant_id": self.tenant_id,
            "name": self.name,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "keys_configured": self.keys_configured,
            "secrets": [secret.to_dict() for secret in self.secrets],
        }


# -- reading and writing ---------------------------------------------------------------


def check_secret_column(column: str) -> str:
    """Return `column` if it is a secret column of `TENANTS`.

    Raises:
        UnknownSecretError: it is not; the message names the valid ones.
    """
    if column not in TENANTS.secrets:
        raise UnknownSecretError(
            f"{printable(column)} is not a secret column of {TENANTS.qualified_name} "
            f"(its secret columns: {', '.join(TENANTS.secrets)})"
        )
    return column


async def _resolve(conn: Any) -> ResolvedTable:
    """`TENANTS` checked against the catalog, with a hint when the schema is behind."""
    try:
        return await resolve_table(conn, TENANTS)
    except TableDefinitionError as exc:
        raise TableDefinitionError(f"{exc} ({_MIGRATE_HINT})") from None


async def show_tenant(conn: Any, tenant_id: str, keyring: KeyRing | None) -> TenantView:
    """Read a tenant and the state of each of its secrets, never their values.

    Args:
        conn: an asyncpg pool or connection.
        tenant_id: the tenant.
        keyring: the configured keys, or None: tokens are then `encrypted (key unknown)`.

    Returns:
        The tenant with every secret masked.

    Raises:
        InvalidTenantIdError: the id cannot be stored.
        TableDefinitionError: the tenants table is missing or lacks a column.
        TenantNotFoundError: no tenant has this id.
        DatabaseError: a query failed.
    """
    validate_tenant_id(tenant_id)
    try:
        table = await _resolve(conn)
        sql = render(
            _Q["show_tenant"],
            table=table.sql_name,
            key=identifier(TENANTS.key),
            secrets=join(", ", map(identifier, TENANTS.secrets)),
        )
        row = await conn.fetchrow(sql.text, tenant_id)
    except _DRIVER_ERRORS as exc:
        raise database_error(exc, "show_tenant", tenant_id=tenant_id) from None
    if row is None:
        raise TenantNotFoundError(tenant_id)
    stored = {column: row[column] for column in TENANTS.secrets}
    states = await anyio.to_thread.run_sync(classify_secrets, keyring, stored)
    return TenantView(
        tenant_id=row[0],
        name=row["name"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        secrets=tuple(states),
        keys_configured=keyring is not None,
    )


async def stored_secret(conn: Any, tenant_id: str, column: str) -> str | None:
    """The value one secret column of a tenant holds now, as stored (token, plaintext or None).

    Raises:
        UnknownSecretError: `column` is not a secret column of `TENANTS`.
        InvalidTenantIdError: the id cannot be stored.
        TableDefinitionError: the tenants table is missing or lacks the column.
        TenantNotFoundError: no tenant has this id.
        DatabaseError: the query failed.
    """
    check_secret_column(column)
    validate_tenant_id(tenant_id)
    try:
        table = await _resolve(conn)
        sql = render(
            _Q["stored_secret"],
            table=table.sql_name,
            key=identifier(TENANTS.key),
            column=identifier(column),
        )
        row = await conn.fetchrow(sql.text, tenant_id)
    except _DRIVER_ERRORS as exc:
        raise database_error(exc, "stored_secret", tenant_id=tenant_id) from None
    if row is None:
        raise TenantNotFoundError(tenant_id)
    value: str | None = row[0]
    return value


@dataclass(frozen=True, slots=True)
class SecretWritten:
    """What `set_secret` did.

    Attributes:
        tenant_id: the tenant.
        column: the secret column.
        key_id: the id of the key the new token was made with; None when cleared.
    """

    tenant_id: str
    column: str
    key_id: str | None

    def summary(self) -> str:
        """`Set oauth_access_token for tenant acme (encrypted under key 0a1b2c3d4e5f)`."""
        tenant = printable(self.tenant_id)
        if self.key_id is None:
            return f"Cleared {self.column} for tenant {tenant}"
        return f"Set {self.column} for tenant {tenant} (encrypted under key {self.key_id})"


async def set_secret(
    conn: Any,
    keyring: KeyRing,
    tenant_id: str,
    column: str,
    value: str | None,
    *,
    expected: str | _ReadCurrent | None = READ_CURRENT,
) -> SecretWritten:
    """Encrypt `value` under the primary key and store it with compare-and-swap.

    The write happens only while the column still holds `expected`, the
    value read before (NULL matches NULL); a write by anyone else in between
    is kept and reported, never overwritten. The Fernet work runs in a
    worker thread.

    Args:
        conn: an asyncpg pool or connection.
        keyring: the keys; the primary one makes the token.
        tenant_id: the tenant.
        column: a secret column of `TENANTS`.
        value: the new secret (`""` is stored as a token of the empty
            string), or None to clear the column (store NULL).
        expected: the stored value the write replaces, as `stored_secret`
            returned it; `READ_CURRENT` (the default) reads it just before.

    Returns:
        What was done: the tenant, the column and the key id (None when cleared).

    Raises:
        UnknownSecretError: `column` is not a secret column (before any I/O).
        InvalidTenantIdError: the id cannot be stored (before any I/O).
        EncryptionError: `value` holds a NUL or is not valid unicode (before any I/O).
        TenantNotFoundError: no tenant has this id.
        SecretChangedError: the column no longer holds `expected`; nothing was written.
        TableDefinitionError: the tenants table is missing or lacks the column.
        DatabaseError: a statement failed.
    """
    check_secret_column(column)
    validate_tenant_id(tenant_id)
    if value is not None and "\x00" in value:
        raise EncryptionError("it contains a NUL character, which PostgreSQL text cannot hold")
    if isinstance(expected, _ReadCurrent):
        expected = await stored_secret(conn, tenant_id, column)
    token = None if value is None else await anyio.to_thread.run_sync(keyring.encrypt, value)
    try:
        table = await _resolve(conn)
        parts = {"table": table.sql_name, "key": identifier(TENANTS.key)}
        swap = render(_Q["swap_secret"], **parts, column=identifier(column))
        status = await conn.execute(swap.text, tenant_id, token, expected)
        if status == "UPDATE 0":
            exists = await conn.fetchval(render(_Q["tenant_exists"], **parts).text, tenant_id)
        else:
            exists = True
    except _DRIVER_ERRORS as exc:
        raise database_error(exc, "set_secret", tenant_id=tenant_id) from None
    if not exists:
        raise TenantNotFoundError(tenant_id)
    if status == "UPDATE 0":
        raise SecretChangedError(tenant_id, column)
    return SecretWritten(tenant_id, column, None if token is None else keyring.primary_key_id)
