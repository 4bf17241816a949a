"""`TenantRepository`: raw asyncpg queries, off-loop crypto, `Tenant` models.

Every statement is a named template from `sql/tenants.sql`, filled with the
columns of the `TENANTS` declaration (derived from the `Tenant` model) and
parameterised with `$n`. All Fernet work goes through an `AsyncCrypto` (one
coalesced worker thread per loop, a cache keyed by token), so the event loop
never runs Fernet and hot tenants cost no crypto at all. A call reads or
writes every secret of its rows with at most one worker hop.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import asyncpg

from ._cache import RowMemo
from ._offload import Ticket
from ._queries import identifier, join, load_queries, placeholder, render
from .crypto import AsyncCrypto
from .encryption import KeyRing, stored_token
from .errors import (
    InvalidTenantIdError,
    PlaintextSecretError,
    TenantDecryptionError,
    TenantExistsError,
    TenantNotFoundError,
    UnknownSecretError,
    database_error,
    printable,
)
from .models import TENANTS, Tenant

__all__ = ["MAX_TENANT_ID_LENGTH", "TenantRepository", "validate_tenant_id"]

logger = logging.getLogger("tenantstore")

MAX_TENANT_ID_LENGTH = 255
"""Longest tenant id accepted on create (btree entries are capped near 2.7 kB)."""

# The errors a database call can raise besides PostgresError subclasses.
_DRIVER_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)

_FIELDS = tuple(Tenant.model_fields)
_SECRETS = TENANTS.secrets
_SECRET_AT = tuple(_FIELDS.index(column) for column in _SECRETS)
_T = load_queries("tenants.sql")
_COMMON = {
    "table": identifier(TENANTS.name),
    "key": identifier(TENANTS.key),
    "columns": join(", ", map(identifier, _FIELDS)),
    "secrets": join(", ", map(identifier, _SECRETS)),
    "secret_values": join(", ", (placeholder(3 + i) for i in range(len(_SECRETS)))),
}
_SQL = {
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


def _set_secrets_sql(columns: Sequence[str]) -> str:
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


def _is_key_conflict(exc: asyncpg.UniqueViolationError) -> bool:
    """Whether a unique violation is on the tenant id (not on another unique column).

    DETAIL is read here to classify the error, never shown: `Key (tenant_id)=(...)`.
    """
    detail = exc.detail or ""
    names = {f"{TENANTS.name}_pkey", f"{TENANTS.name}_{TENANTS.key}_key"}
    return detail.startswith(f"Key ({TENANTS.key})=") or exc.constraint_name in names


def _check_secret_names(names: Iterable[str]) -> None:
    for name in names:
        if name not in _SECRETS:
            raise UnknownSecretError(
                f"unknown secret {printable(name)!r} (the secrets of a tenant: "
                f"{', '.join(_SECRETS)})"
            )


class TenantRepository:
    """Reads and writes tenants; secrets are encrypted in the table, decrypted in `Tenant`.

    Args:
        pool: an asyncpg pool, or a connection when the caller wants its own transaction.
        crypto: a `KeyRing`, or an `AsyncCrypto` to share its worker and cache
            with the application's own reads and writes.
        allow_plaintext: accept legacy plaintext secrets on read (True by default,
            so an application keeps working while `migrate encrypt` runs); when
            False such a value raises `PlaintextSecretError`.
        cache_size: with a `KeyRing`, how many decrypted secrets to keep, keyed
            by token; 0 turns the cache off. With an `AsyncCrypto`, its own cache is used.
    """

    def __init__(
        self,
        pool: asyncpg.Pool | asyncpg.Connection,
        crypto: KeyRing | AsyncCrypto,
        *,
        allow_plaintext: bool = True,
        cache_size: int | None = None,
    ) -> None:
        if isinstance(crypto, KeyRing):
            crypto = AsyncCrypto(crypto, cache_size=10_000 if cache_size is None else cache_size)
        elif not isinstance(crypto, AsyncCrypto):
            raise TypeError("crypto must be a tenantstore.KeyRing or tenantstore.AsyncCrypto")
        elif cache_size is not None:
            raise TypeError("cache_size is for a KeyRing; an AsyncCrypto brings its own cache")
        self._db = pool
        self._crypto = crypto
        self._allow_plaintext = allow_plaintext
        self._set_sql: dict[tuple[str, ...], str] = {}
        # Tenants by the row they were built from: a warm read whose row is
        # unchanged costs a dict lookup and a row comparison, no validation.
        self._tenants: RowMemo[Tenant] = RowMemo(crypto.cache.size)

    def __repr__(self) -> str:
        return f"<TenantRepository {self._crypto!r}>"

    @property
    def crypto(self) -> AsyncCrypto:
        """The shared off-loop crypto (worker, cache, key ring)."""
        return self._crypto

    # -- reads ---------------------------------------------------------------

    async def get_tenant(self, tenant_id: str) -> Tenant | None:
        """Return the tenant with this id, or None.

        Raises:
            TenantDecryptionError: one of its secrets cannot be decrypted with the key ring.
            PlaintextSecretError: a secret is plaintext and `allow_plaintext` is False.
            InvalidTenantIdError: the id cannot exist in PostgreSQL.
            DatabaseError: the query failed (the message holds no value from a row).
        """
        validate_tenant_id(tenant_id)
        # Announce the decryption this call will probably need, so a batch about
        # to go can wait for it under load (see Coalescer).
        ticket = self._crypto.announce()
        try:
            try:
                row = await self._db.fetchrow(_SQL["get_tenant"], tenant_id)
            except _DRIVER_ERRORS as exc:
                raise database_error(exc, "get_tenant", tenant_id=tenant_id) from None
            if row is None:
                return None
            return (await self._to_tenants([row], ticket))[0]
        finally:
            ticket.close()

    async def get_tenants(self, tenant_ids: Iterable[str]) -> dict[str, Tenant]:
        """Return the known tenants among `tenant_ids`, as a dict keyed by tenant id.

        One query and at most one decryption hop for the whole set, every secret included.
        """
        ids = list(dict.fromkeys(validate_tenant_id(t) for t in tenant_ids))
        if not ids:
            return {}
        try:
            rows = await self._db.fetch(_SQL["get_tenants"], ids)
        except _DRIVER_ERRORS as exc:
            raise database_error(exc, "get_tenants") from None
        return {tenant.tenant_id: tenant for tenant in await self._to_tenants(rows)}

    async def iter_tenants(self, batch_size: int = 1000) -> AsyncIterator[Tenant]:
        """Yield every tenant in `tenant_id` order, a keyset page at a time.

        Holds one page in memory; each page costs one query and one decryption hop.
        """
        if batch_size <= 0:
            raise ValueError("batch_size is expected to be greater than zero")
        last: str | None = None
        while True:
            try:
                if last is None:
                    rows = await self._db.fetch(_SQL["first_page_tenants"], batch_size)
                else:
                    rows = await self._db.fetch(_SQL["next_page_tenants"], last, batch_size)
            except _DRIVER_ERRORS as exc:
                raise database_error(exc, "iter_tenants") from None
            if not rows:
                return
            for tenant in await self._to_tenants(rows):
                yield tenant
            if len(rows) < batch_size:
                return
            last = rows[-1][0]

    # -- writes --------------------------------------------------------------

    async def create_tenant(self, tenant_id: str, name: str, **secrets: str | None) -> Tenant:
        """Insert a tenant, storing its secrets encrypted (one worker hop), and return it.

        `secrets` are keyword arguments named as the secret fields of `Tenant`
        (`gemini_api_key=...`, `oauth_access_token=...`); omitted ones are NULL.

        Raises:
            TenantExistsError: a tenant with this id exists.
            InvalidTenantIdError: the id cannot be stored.
            UnknownSecretError: a keyword names no secret of a tenant (before any I/O).
            DatabaseError: the insert failed (a constraint, a trigger: named, no values).
        """
        _check_secret_names(secrets)
        validate_tenant_id(tenant_id, creating=True)
        plaintexts = [secrets.get(column) for column in _SECRETS]
        tokens = await self._crypto.encrypt_many(plaintexts)
        try:
            row = await self._db.fetchrow(_SQL["create_tenant"], tenant_id, name, *tokens)
        except asyncpg.UniqueViolationError as exc:
            if _is_key_conflict(exc):
                raise TenantExistsError(tenant_id) from None
            raise database_error(exc, "create_tenant", tenant_id=tenant_id) from None
        except _DRIVER_ERRORS as exc:
            raise database_error(exc, "create_tenant", tenant_id=tenant_id) from None
        assert row is not None
        values = dict(zip(_FIELDS, row, strict=True))
        values.update(zip(_SECRETS, plaintexts, strict=True))
        return Tenant.from_row(values)

    async def set_secrets(self, tenant_id: str, **values: str | None) -> None:
        """Set some of a tenant's secrets in one statement (`None` clears one).

        Only the named secrets change; all are encrypted in one worker hop.

        Raises:
            UnknownSecretError: a keyword names no secret of a tenant (before any I/O).
            TenantNotFoundError: no tenant has this id.
            DatabaseError: the update failed (a constraint, a trigger: named, no values).
        """
        _check_secret_names(values)
        validate_tenant_id(tenant_id)
        if not values:
            raise TypeError("set_secrets() needs at least one secret, e.g. gemini_api_key=...")
        columns = tuple(column for column in _SECRETS if column in values)
        tokens = await self._crypto.encrypt_many([values[column] for column in columns])
        sql = self._set_sql.get(columns)
        if sql is None:
            sql = self._set_sql[columns] = _set_secrets_sql(columns)
        try:
            status = await self._db.execute(sql, tenant_id, *tokens)
        except _DRIVER_ERRORS as exc:
            raise database_error(exc, "set_secrets", tenant_id=tenant_id) from None
        if status == "UPDATE 0":
            raise TenantNotFoundError(tenant_id)

    async def set_gemini_api_key(self, tenant_id: str, api_key: str | None) -> None:
        """Replace a tenant's Gemini API key (None clears it): `set_secrets(gemini_api_key=...)`.

        Raises:
            TenantNotFoundError: no tenant has this id.
        """
        await self.set_secrets(tenant_id, gemini_api_key=api_key)

    async def delete_tenant(self, tenant_id: str) -> bool:
        """Delete a tenant; return whether it existed."""
        validate_tenant_id(tenant_id)
        try:
            status = await self._db.execute(_SQL["delete_tenant"], tenant_id)
        except _DRIVER_ERRORS as exc:
            raise database_error(exc, "delete_tenant", tenant_id=tenant_id) from None
        return bool(status != "DELETE 0")

    # -- decryption ----------------------------------------------------------

    async def _to_tenants(self, rows: Sequence[Any], ticket: Ticket | None = None) -> list[Tenant]:
        """Turn rows into tenants, decrypting every uncached token of every row in one batch."""
        memo = self._tenants
        tenants: list[Tenant | None] = [memo.get(row[0], row) for row in rows]
        if all(tenants):
            return tenants  # type: ignore[return-value]
        cache = self._crypto.cache
        records: dict[int, dict[str, Any]] = {}
        missing: list[tuple[int, str, str]] = []  # (row, column, token)
        for index, row in enumerate(rows):
            if tenants[index] is not None:
                continue
            values = records[index] = dict(zip(_FIELDS, row, strict=True))
            for column, at in zip(_SECRETS, _SECRET_AT, strict=True):
                stored = row[at]
                if not stored:
                    continue
                hit = cache.get(stored)  # keyed by the value as stored: no parsing on a hit
                if hit is not None:
                    values[column] = hit
                    continue
                token = stored_token(stored)
                if token is None:
                    if not self._allow_plaintext:
                        raise PlaintextSecretError(row[0], column, label=TENANTS.label(column))
                    continue
                missing.append((index, column, token))
        if missing:
            tokens = [token for _, _, token in missing]
            results = await self._crypto.decrypt_tokens(tokens, ticket=ticket)
            for (index, column, token), result in zip(missing, results, strict=True):
                if result is None:
                    tenant_id = rows[index][0]
                    error = TenantDecryptionError(tenant_id, column, label=TENANTS.label(column))
                    logger.error("%s", error)
                    raise error
                records[index][column] = result[0]
                stored = rows[index][_FIELDS.index(column)]
                if stored is not token:  # padded with whitespace: remember it as stored too
                    cache.put(stored, result[0])
        for index, values in records.items():
            tenant = tenants[index] = Tenant.from_row(values)
            memo.put(rows[index][0], rows[index], tenant)
        return tenants  # type: ignore[return-value]
