"""The repository's half that is not I/O: its statements, input checks, rows to tenants.

Statements are rendered once from the templates in `sql/tenants.sql` with
the names of the `TENANTS` declaration. `TenantDecoder` turns rows into
`Tenant` models: from a memo of unchanged rows, else through the token
cache and at most one decryption hop for every uncached secret of the rows,
counting metrics and building the audit events of the read.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg

from ._cache import RowMemo
from ._offload import Ticket
from ._queries import identifier, join, load_queries, placeholder, render
from .audit import AuditEvent, current_actor
from .crypto import AsyncCrypto
from .encryption import stored_token
from .errors import (
    InvalidTenantIdError,
    PlaintextSecretError,
    TenantDecryptionError,
    UnknownSecretError,
    printable,
)
from .models import TENANTS, Tenant

__all__ = [
    "FIELDS",
    "MAX_TENANT_ID_LENGTH",
    "SECRETS",
    "SQL",
    "TenantDecoder",
    "check_secret_names",
    "is_key_conflict",
    "set_secrets_sql",
    "validate_tenant_id",
]

logger = logging.getLogger("tenantstore")

MAX_TENANT_ID_LENGTH = 255
"""Longest tenant id accepted on create (btree entries are capped near 2.7 kB)."""

FIELDS = tuple(Tenant.model_fields)
SECRETS = TENANTS.secrets
TABLE = TENANTS.qualified_name
_SECRET_AT = tuple(FIELDS.index(column) for column in SECRETS)
_T = load_queries("tenants.sql")
_COMMON = {
    "table": identifier(TENANTS.name),
    "key": identifier(TENANTS.key),
    "columns": join(", ", map(identifier, FIELDS)),
    "secrets": join(", ", map(identifier, SECRETS)),
    "secret_values": join(", ", (placeholder(3 + i) for i in range(len(SECRETS)))),
}
SQL = {
    name: render(_T[name], **_COMMON).text
    for name in (
        "get_tenant",
        "get_tenants",
        "create_tenant",
        "delete_tenant",
        "first_page_tenants",
        "next_page_tenants",
    )
}


def set_secrets_sql(columns: Sequence[str]) -> str:
    """`UPDATE tenants SET c = $2, d = $3, updated_at = now() WHERE tenant_id = $1`."""
    assignments = join(
        ", ",
        (
            render(_T["set_secret"], column=identifier(column), value=placeholder(2 + i))
            for i, column in enumerate(columns)
        ),
    )
    return render(_T["set_secrets"], **_COMMON, assignments=assignments).text


def validate_tenant_id(tenant_id: object, *, creating: bool = False) -> str:
    """Return `tenant_id` if PostgreSQL can hold it, else raise `InvalidTenantIdError`.

    PostgreSQL `text` cannot contain NUL, and the driver cannot encode lone
    surrogates; rejecting both here gives a clear error instead of a driver one.
    """
    if not isinstance(tenant_id, str):
        raise InvalidTenantIdError(f"tenant_id must be a str, not {type(tenant_id).__name__}")
    if not tenant_id:
        raise InvalidTenantIdError("tenant_id must not be empty")
    if "\x00" in tenant_id:
        raise InvalidTenantIdError("tenant_id must not contain a NUL character")
    try:
        tenant_id.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidTenantIdError("tenant_id must be valid unicode (no lone surrogates)") from None
    if creating and len(tenant_id) > MAX_TENANT_ID_LENGTH:
        raise InvalidTenantIdError(
            f"tenant_id must be at most {MAX_TENANT_ID_LENGTH} characters, got {len(tenant_id)}"
        )
    return tenant_id


def is_key_conflict(exc: asyncpg.UniqueViolationError) -> bool:
    """Whether a unique violation is on the tenant id (not on another unique column).

    DETAIL is read here to classify the error, never shown: `Key (tenant_id)=(...)`.
    """
    detail = exc.detail or ""
    names = {f"{TENANTS.name}_pkey", f"{TENANTS.name}_{TENANTS.key}_key"}
    return detail.startswith(f"Key ({TENANTS.key})=") or exc.constraint_name in names


def check_secret_names(names: Iterable[str]) -> None:
    """Raise `UnknownSecretError` for a name that is not a secret of a tenant."""
    for name in names:
        if name not in SECRETS:
            raise UnknownSecretError(
                f"unknown secret {printable(name)!r} (the secrets of a tenant: "
                f"{', '.join(SECRETS)})"
            )


KeyIds = tuple[str | None, ...]
"""Per secret column: the key id its token was made under (None: absent or plaintext)."""


class TenantDecoder:
    """Rows to tenants for one repository: memo, token cache, one hop, metrics, audit events."""

    __slots__ = ("_allow_plaintext", "_crypto", "_memo")

    def __init__(self, crypto: AsyncCrypto, *, allow_plaintext: bool) -> None:
        self._crypto = crypto
        self._allow_plaintext = allow_plaintext
        # Tenants by the row they were built from: a warm read whose row is
        # unchanged costs a dict lookup and a row comparison, no validation.
        self._memo: RowMemo[tuple[Tenant, KeyIds]] = RowMemo(crypto.cache.size)

    async def tenants(self, rows: Sequence[Any], ticket: Ticket | None = None) -> list[Tenant]:
        """Turn rows into tenants, decrypting every uncached token of every row in one batch.

        Raises:
            TenantDecryptionError: a token no key decrypts (tenant and column named).
            PlaintextSecretError: a plaintext secret, when plaintext is refused.
        """
        return [tenant for tenant, _ in await self.entries(rows, ticket)]

    def knows(self, tenant_id: str) -> bool:
        """Whether a tenant with this id is remembered (its next read will likely hit)."""
        return tenant_id in self._memo

    def remembered(self, row: Any) -> tuple[Tenant, KeyIds] | None:
        """The entry built from a row equal to `row`, if remembered (the warm path: no await).

        A hit is counted; the caller audits it (`audit_reads`) when auditing is on.
        """
        entry = self._memo.get(row[0], row)
        if entry is not None:
            self._crypto.metrics.cache("tenants", 1, 0)
        return entry

    async def entries(
        self, rows: Sequence[Any], ticket: Ticket | None = None
    ) -> list[tuple[Tenant, KeyIds]]:
        """As `tenants`, each with the key id of each of its secrets (for a cache to keep)."""
        memo = self._memo
        found = [memo.get(row[0], row) for row in rows]
        hits = sum(entry is not None for entry in found)
        metrics = self._crypto.metrics
        if hits:
            metrics.cache("tenants", hits, 0)
        if hits < len(rows):
            metrics.cache("tenants", 0, len(rows) - hits)
            await self._build(rows, found, ticket)
        entries: list[tuple[Tenant, KeyIds]] = found  # type: ignore[assignment]
        await self.audit_reads(entries)
        return entries

    async def audit_reads(self, entries: Sequence[tuple[Tenant, KeyIds]]) -> None:
        """Emit a `read` event for every secret the tenants carry (from a cache or not)."""
        audit = self._crypto.audit
        if audit.enabled:
            actor, at = current_actor(), datetime.now(UTC)  # once for the whole read
            await audit.emit(
                [
                    AuditEvent("read", TABLE, column, tenant.tenant_id, key_id, "ok", 1, actor, at)
                    for tenant, key_ids in entries
                    for column, key_id in zip(SECRETS, key_ids, strict=True)
                    if getattr(tenant, column) is not None
                ]
            )

    async def _build(
        self,
        rows: Sequence[Any],
        found: list[tuple[Tenant, KeyIds] | None],
        ticket: Ticket | None,
    ) -> None:
        cache = self._crypto.cache
        records: dict[int, dict[str, Any]] = {}
        key_ids: dict[int, list[str | None]] = {}
        missing: list[tuple[int, int, str]] = []  # (row, secret index, token)
        hits = 0
        for index, row in enumerate(rows):
            if found[index] is not None:
                continue
            values = records[index] = dict(zip(FIELDS, row, strict=True))
            ids = key_ids[index] = [None] * len(SECRETS)
            for secret, at in enumerate(_SECRET_AT):
                stored = row[at]
                if not stored:
                    continue
                hit = cache.get(stored)  # keyed by the value as stored: no parsing on a hit
                if hit is not None:
                    values[SECRETS[secret]], ids[secret] = hit
                    hits += 1
                    continue
                token = stored_token(stored)
                if token is None:
                    if not self._allow_plaintext:
                        await self._refuse(row[0], SECRETS[secret])
                    continue
                missing.append((index, secret, token))
        self._crypto.metrics.cache("secrets", hits, len(missing))
        if missing:
            results = await self._crypto.decrypt_tokens(
                [token for _, _, token in missing],
                [SECRETS[secret] for _, secret, _ in missing],
                ticket=ticket,
            )
            for (index, secret, token), result in zip(missing, results, strict=True):
                column = SECRETS[secret]
                if result is None:
                    await self._fail(rows[index][0], column)
                    continue
                records[index][column], key_ids[index][secret] = result
                stored = rows[index][_SECRET_AT[secret]]
                if stored is not token:  # padded with whitespace: remember it as stored too
                    cache.put(stored, *result)
        for index, values in records.items():
            entry = found[index] = (Tenant.from_row(values), tuple(key_ids[index]))
            self._memo.put(rows[index][0], rows[index], entry)

    async def _fail(self, tenant_id: str, column: str) -> None:
        error = TenantDecryptionError(tenant_id, column, label=TENANTS.label(column))
        logger.error("%s", error)
        audit = self._crypto.audit
        if audit.enabled:
            await audit.emit([AuditEvent("read", TABLE, column, tenant_id, None, "failed")])
        raise error

    async def _refuse(self, tenant_id: str, column: str) -> None:
        self._crypto.metrics.decrypt_failed(column, "plaintext_refused")
        audit = self._crypto.audit
        if audit.enabled:
            await audit.emit([AuditEvent("read", TABLE, column, tenant_id, None, "refused")])
        raise PlaintextSecretError(tenant_id, column, label=TENANTS.label(column))
