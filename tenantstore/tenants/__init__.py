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

from .._queries import identifier, join, render
from ..encryption import KeyRing, stored_token
from ..errors import TenantNotFoundError, database_error, printable
from ..models import TENANTS
from ..repository import validate_tenant_id
from ._input import MAX_SECRET_BYTES, SecretInputError, parse_piped_value, read_secret_value
from ._table import DRIVER_ERRORS, Q, check_secret_column, resolve
from ._write import READ_CURRENT, SecretChangedError, SecretWritten, set_secret, stored_secret

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

State = Literal["absent", "encrypted", "plaintext", "undecryptable"]


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


# -- reading ----------------------------------------------------------------------------


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
        table = await resolve(conn)
        sql = render(
            Q["show_tenant"],
            table=table.sql_name,
            key=identifier(TENANTS.key),
            secrets=join(", ", map(identifier, TENANTS.secrets)),
        )
        row = await conn.fetchrow(sql.text, tenant_id)
    except DRIVER_ERRORS as exc:
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
