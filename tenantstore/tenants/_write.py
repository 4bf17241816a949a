"""Re-entering one secret: read what is stored, then compare-and-swap the new token in."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import anyio.to_thread
import asyncpg

from .._offload import Sealed
from .._queries import identifier, render
from ..audit import AuditEvent, AuditLog, Operation
from ..encryption import KeyRing, check_plaintext
from ..errors import TenantNotFoundError, TenantStoreError, database_error, printable
from ..keys.store import KeyUseRecorder
from ..models import TENANTS
from ..repository import validate_tenant_id
from ._table import DRIVER_ERRORS, Q, check_secret_column, resolve


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
        table = await resolve(conn)
        sql = render(
            Q["stored_secret"],
            table=table.sql_name,
            key=identifier(TENANTS.key),
            column=identifier(column),
        )
        row = await conn.fetchrow(sql.text, tenant_id)
    except DRIVER_ERRORS as exc:
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
    audit: AuditLog | None = None,
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
        audit: where the `write` or `clear` event goes, whatever the outcome
            (default: the `tenantstore.audit` logger).

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
    if value is not None:
        check_plaintext(value)
    if isinstance(expected, _ReadCurrent):
        expected = await stored_secret(conn, tenant_id, column)
    token = None
    if value is not None:
        # Sealed: asyncio's debug log shows what a thread hands back.
        sealed = await anyio.to_thread.run_sync(lambda: Sealed(keyring.encrypt(value)))
        token = sealed.value
    key_id = None if token is None else keyring.primary_key_id
    error: TenantStoreError | None = None
    try:
        table = await resolve(conn)
        parts = {"table": table.sql_name, "key": identifier(TENANTS.key)}
        swap = render(Q["swap_secret"], **parts, column=identifier(column))
        status = await conn.execute(swap.text, tenant_id, token, expected)
        if status != "UPDATE 0":
            pass
        elif await conn.fetchval(render(Q["tenant_exists"], **parts).text, tenant_id):
            error = SecretChangedError(tenant_id, column)
        else:
            error = TenantNotFoundError(tenant_id)
    except DRIVER_ERRORS as exc:
        error = database_error(exc, "set_secret", tenant_id=tenant_id)
    # Out of the handler, so the driver's error is no __context__ of what is raised.
    outcome = "ok" if error is None else _OUTCOMES.get(type(error), "failed")
    audit = audit if audit is not None else AuditLog()
    if audit.enabled:
        operation: Operation = "write" if token is not None else "clear"
        await audit.emit(
            [AuditEvent(operation, TENANTS.qualified_name, column, tenant_id, key_id, outcome)]
        )
    if error is not None:
        raise error
    if key_id is not None:
        # tenantstore_keys hears of the key, so `keys retire` knows it is in use.
        own = None if isinstance(conn, asyncpg.Pool) else conn
        await KeyUseRecorder(conn).record(key_id, primary=True, conn=own)
    return SecretWritten(tenant_id, column, key_id)


_OUTCOMES: Final[dict[type[Exception], str]] = {
    SecretChangedError: "changed",
    TenantNotFoundError: "not_found",
}
