"""`TenantRepository`: raw asyncpg queries, off-loop crypto, `Tenant` models.

Every statement is a named query from `sql/tenants.sql`, parameterised with
`$n`. Decryption goes through a `Coalescer` (one worker thread drains every
request made meanwhile) and a bounded cache keyed by ciphertext, so the event
loop never runs Fernet and hot tenants cost no crypto at all.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import anyio.to_thread
import asyncpg

from ._cache import DecryptedCache
from ._offload import Coalescer, Ticket
from ._queries import load_queries
from .encryption import KeyRing, is_encrypted
from .errors import (
    DatabaseError,
    EncryptionError,
    InvalidTenantIdError,
    PlaintextSecretError,
    TenantDecryptionError,
    TenantExistsError,
    TenantNotFoundError,
)
from .models import Tenant

__all__ = ["MAX_TENANT_ID_LENGTH", "TenantRepository", "validate_tenant_id"]

logger = logging.getLogger("tenantstore")

_Q = {name: query.sql for name, query in load_queries("tenants.sql").items()}

MAX_TENANT_ID_LENGTH = 255
"""Longest tenant id accepted on create (btree entries are capped near 2.7 kB)."""

# The errors a database call can raise besides PostgresError subclasses.
_DRIVER_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)


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
    except UnicodeEncodeError as exc:
        raise InvalidTenantIdError("tenant_id must be valid unicode (no lone surrogates)") from exc
    if creating and len(tenant_id) > MAX_TENANT_ID_LENGTH:
        raise InvalidTenantIdError(
            f"tenant_id must be at most {MAX_TENANT_ID_LENGTH} characters, got {len(tenant_id)}"
        )
    return tenant_id


class TenantRepository:
    """Reads and writes tenants; secrets are encrypted in the table, decrypted in `Tenant`.

    Args:
        pool: an asyncpg pool, or a connection when the caller wants its own transaction.
        keyring: the keys to encrypt and decrypt with.
        allow_plaintext: accept legacy plaintext secrets on read (True by default,
            so an application keeps working while `migrate encrypt` runs); when
            False such a value raises `PlaintextSecretError`.
        cache_size: how many decrypted secrets to keep, keyed by ciphertext; 0 turns it off.
    """

    def __init__(
        self,
        pool: asyncpg.Pool | asyncpg.Connection,
        keyring: KeyRing,
        *,
        allow_plaintext: bool = True,
        cache_size: int = 10_000,
    ) -> None:
        if not isinstance(keyring, KeyRing):
            raise TypeError("keyring must be a tenantstore.KeyRing")
        self._db = pool
        self._keyring = keyring
        self._allow_plaintext = allow_plaintext
        self._cache = DecryptedCache(cache_size)
        self._decryptor: Coalescer[str, str | None] = Coalescer(keyring.try_decrypt_batch)

    def __repr__(self) -> str:
        return f"<TenantRepository cache={len(self._cache)}/{self._cache.size}>"

    @property
    def decryptor(self) -> Coalescer[str, str | None]:
        """The coalescing decryptor (its `stats` show requests vs worker batches)."""
        return self._decryptor

    # -- reads ---------------------------------------------------------------

    async def get_tenant(self, tenant_id: str) -> Tenant | None:
        """Return the tenant with this id, or None.

        Raises:
            TenantDecryptionError: its secret cannot be decrypted with the key ring.
            PlaintextSecretError: its secret is plaintext and `allow_plaintext` is False.
            InvalidTenantIdError: the id cannot exist in PostgreSQL.
        """
        validate_tenant_id(tenant_id)
        # Announce the decryption this call will probably need, so a batch about
        # to go can wait for it under load (see Coalescer).
        ticket = self._decryptor.announce()
        try:
            try:
                row = await self._db.fetchrow(_Q["get_tenant"], tenant_id)
            except _DRIVER_ERRORS as exc:
                raise DatabaseError("get_tenant failed") from exc
            if row is None:
                return None
            return (await self._to_tenants([row], ticket))[0]
        finally:
            ticket.close()

    async def get_tenants(self, tenant_ids: Iterable[str]) -> dict[str, Tenant]:
        """Return the known tenants among `tenant_ids`, keyed by id.

        One query and at most one decryption hop for the whole set.
        """
        ids = list(dict.fromkeys(validate_tenant_id(t) for t in tenant_ids))
        if not ids:
            return {}
        try:
            rows = await self._db.fetch(_Q["get_tenants"], ids)
        except _DRIVER_ERRORS as exc:
            raise DatabaseError("get_tenants failed") from exc
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
                    rows = await self._db.fetch(_Q["first_page_tenants"], batch_size)
                else:
                    rows = await self._db.fetch(_Q["next_page_tenants"], last, batch_size)
            except _DRIVER_ERRORS as exc:
                raise DatabaseError("iter_tenants failed") from exc
            if not rows:
                return
            for tenant in await self._to_tenants(rows):
                yield tenant
            if len(rows) < batch_size:
                return
            last = rows[-1]["tenant_id"]

    # -- writes --------------------------------------------------------------

    async def create_tenant(
        self, tenant_id: str, name: str, *, gemini_api_key: str | None = None
    ) -> Tenant:
        """Insert a tenant, storing its secret encrypted, and return it.

        Raises:
            TenantExistsError: a tenant with this id exists.
            InvalidTenantIdError: the id cannot be stored.
        """
        validate_tenant_id(tenant_id, creating=True)
        token = await self._encrypt(gemini_api_key)
        try:
            row = await self._db.fetchrow(_Q["create_tenant"], tenant_id, name, token)
        except asyncpg.UniqueViolationError as exc:
            raise TenantExistsError(tenant_id) from exc
        except _DRIVER_ERRORS as exc:
            raise DatabaseError("create_tenant failed") from exc
        assert row is not None
        return _tenant(row, gemini_api_key)

    async def set_gemini_api_key(self, tenant_id: str, api_key: str | None) -> None:
        """Replace a tenant's Gemini API key (None clears it) and bump `updated_at`.

        Raises:
            TenantNotFoundError: no tenant has this id.
        """
        validate_tenant_id(tenant_id)
        token = await self._encrypt(api_key)
        try:
            status = await self._db.execute(_Q["set_gemini_api_key"], tenant_id, token)
        except _DRIVER_ERRORS as exc:
            raise DatabaseError("set_gemini_api_key failed") from exc
        if status == "UPDATE 0":
            raise TenantNotFoundError(tenant_id)

    async def delete_tenant(self, tenant_id: str) -> bool:
        """Delete a tenant; return whether it existed."""
        validate_tenant_id(tenant_id)
        try:
            status = await self._db.execute(_Q["delete_tenant"], tenant_id)
        except _DRIVER_ERRORS as exc:
            raise DatabaseError("delete_tenant failed") from exc
        return bool(status != "DELETE 0")

    # -- crypto --------------------------------------------------------------

    async def _encrypt(self, plaintext: str | None) -> str | None:
        """The token to store: `None` stays NULL; anything else, `""` too, becomes a token."""
        if plaintext is None:
            return None
        if "\x00" in plaintext:
            # Storable as a token, but `migrate down` could never write it back as text.
            raise EncryptionError("it contains a NUL character, which PostgreSQL text cannot hold")
        return await anyio.to_thread.run_sync(self._keyring.encrypt, plaintext)

    async def _to_tenants(self, rows: Sequence[Any], ticket: Ticket | None = None) -> list[Tenant]:
        """Turn rows into tenants, decrypting every uncached token in one worker batch."""
        cache = self._cache
        plaintexts: list[str | None] = []
        missing: list[int] = []
        for row in rows:
            stored: str | None = row["gemini_api_key"]
            if not stored:
                plaintexts.append(stored)
                continue
            hit = cache.get(stored)
            if hit is not None:
                plaintexts.append(hit)
            elif is_encrypted(stored):
                missing.append(len(plaintexts))
                plaintexts.append(None)
            elif self._allow_plaintext:
                plaintexts.append(stored)
            else:
                raise PlaintextSecretError(
                    row["tenant_id"], "gemini_api_key", label="Gemini API key"
                )
        if missing:
            tokens = [rows[index]["gemini_api_key"] for index in missing]
            for index, token, value in zip(
                missing, tokens, await self._decryptor.run(tokens, ticket=ticket), strict=True
            ):
                if value is None:
                    tenant_id = rows[index]["tenant_id"]
                    logger.error("Failed to decrypt Gemini API key for tenant %s", tenant_id)
                    raise TenantDecryptionError(tenant_id, "gemini_api_key", label="Gemini API key")
                cache.put(token, value)
                plaintexts[index] = value
        return [_tenant(row, plain) for row, plain in zip(rows, plaintexts, strict=True)]


def _tenant(row: Any, plaintext: str | None) -> Tenant:
    return Tenant.from_row(
        row["tenant_id"], row["name"], plaintext, row["created_at"], row["updated_at"]
    )
