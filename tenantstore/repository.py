"""`TenantRepository`: raw asyncpg queries, off-loop crypto, `Tenant` models.

Every statement is a named template from `sql/tenants.sql`, filled with the
columns of the `TENANTS` declaration (derived from the `Tenant` model) and
parameterised with `$n`. All Fernet work goes through an `AsyncCrypto` (one
coalesced worker thread per loop, a cache keyed by token), so the event loop
never runs Fernet and hot tenants cost no crypto at all. A call reads or
writes every secret of its rows with at most one worker hop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence

import asyncpg
from opentelemetry.metrics import MeterProvider

from ._tenant_rows import (
    FIELDS,
    MAX_TENANT_ID_LENGTH,
    SECRETS,
    SQL,
    TABLE,
    TenantDecoder,
    check_secret_names,
    is_key_conflict,
    set_secrets_sql,
    validate_tenant_id,
)
from .audit import AuditEvent, AuditLog
from .crypto import AsyncCrypto
from .encryption import KeyRing, check_plaintext
from .errors import TenantExistsError, TenantNotFoundError, database_error
from .keys.check import KeyCheckReport, check_keys
from .keys.store import KeyUseRecorder
from .live_cache import Entry, LiveCache
from .models import Tenant

__all__ = ["MAX_TENANT_ID_LENGTH", "TenantRepository", "validate_tenant_id"]

# The errors a database call can raise besides PostgresError subclasses.
_DRIVER_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)


class TenantRepository:
    """Reads and writes tenants; secrets are encrypted in the table, decrypted in `Tenant`.

    Args:
        pool: an asyncpg pool, or a connection when the caller wants its own transaction.
        crypto: a `KeyRing`, or an `AsyncCrypto` to share its worker and cache
            with the application's own reads and writes.
        allow_plaintext: accept legacy plaintext secrets on read (True by default,
            so an application keeps working while `migrate encrypt` runs); when
            False such a value raises `PlaintextSecretError`.
        cache_size: with a `KeyRing`, how many decrypted secrets (and tenants)
            to keep; 0 turns the caches off. With an `AsyncCrypto`, its own is used.
        audit: with a `KeyRing`, where audit events go (default: the
            `tenantstore.audit` logger). With an `AsyncCrypto`, its own.
        meter_provider: with a `KeyRing`, where metrics go (default: the
            global OpenTelemetry provider). With an `AsyncCrypto`, its own.
        live_cache: a `LiveCache` to answer `get_tenant` / `get_tenants` from
            memory, kept fresh by PostgreSQL notifications; started by
            `async with` on the repository (or its own `start()`), closed with it.

    Close it (`await repo.aclose()`, or `async with`) so a buffering audit
    sink writes what it holds; the pool stays the caller's to close.
    """

    def __init__(
        self,
        pool: asyncpg.Pool | asyncpg.Connection,
        crypto: KeyRing | AsyncCrypto,
        *,
        allow_plaintext: bool = True,
        cache_size: int | None = None,
        audit: AuditLog | None = None,
        meter_provider: MeterProvider | None = None,
        live_cache: LiveCache | None = None,
    ) -> None:
        if isinstance(crypto, KeyRing):
            crypto = AsyncCrypto(
                crypto,
                cache_size=10_000 if cache_size is None else cache_size,
                audit=audit,
                meter_provider=meter_provider,
            )
        elif not isinstance(crypto, AsyncCrypto):
            raise TypeError("crypto must be a tenantstore.KeyRing or tenantstore.AsyncCrypto")
        elif cache_size is not None or audit is not None or meter_provider is not None:
            raise TypeError(
                "cache_size, audit and meter_provider are for a KeyRing; "
                "an AsyncCrypto brings its own"
            )
        if live_cache is not None and not isinstance(pool, asyncpg.Pool):
            raise TypeError(
                "live_cache needs an asyncpg pool: read through one connection, a row its "
                "open transaction has not committed would be cached for every caller"
            )
        self._db = pool
        self._crypto = crypto
        self._decoder = TenantDecoder(crypto, allow_plaintext=allow_plaintext)
        # tenantstore_keys learns which key encrypts, at most once per key per interval.
        self._key_use = KeyUseRecorder(pool)
        self._set_sql: dict[tuple[str, ...], str] = {}
        self._live = live_cache
        if live_cache is not None:
            live_cache.attach(crypto.metrics, self._decoder.audit_reads)

    def __repr__(self) -> str:
        return f"<TenantRepository {self._crypto!r}>"

    async def __aenter__(self) -> TenantRepository:
        if self._live is not None:
            await self._live.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the live cache, flush and close the audit sinks. The pool stays the caller's."""
        try:
            if self._live is not None:
                await self._live.aclose()
        finally:
            await self._crypto.aclose()

    async def check_keys(self, *, sample: int = 20) -> KeyCheckReport:
        """Check the key ring against the database, for start-up and readiness probes.

        See `tenantstore.keys.check_keys`: the key ids the database uses that
        the ring lacks, and a canary decrypt of `sample` stored tokens per
        secret column. The outcome is the `tenantstore.keys.check` gauge.

        Raises:
            KeyCheckError: a key is missing or a canary fails (`.report` says which).
        """
        metrics = self._crypto.metrics
        try:
            report = await check_keys(self._db, self._crypto.keyring, sample=sample)
        except BaseException:
            metrics.key_check(False)
            raise
        metrics.key_check(True)
        return report

    @property
    def live_cache(self) -> LiveCache | None:
        """The live cache this repository reads through, if any."""
        return self._live

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
        if self._live is not None:
            entry = await self._live.get(tenant_id, self._load_one)
            return None if entry is None else entry[0]
        # _load_one inlined, with the warm path taken without a further await. A
        # remembered tenant will most likely not need a decryption: not announced.
        ticket = None if self._decoder.knows(tenant_id) else self._crypto.announce()
        try:
            try:
                row = await self._db.fetchrow(SQL["get_tenant"], tenant_id)
            except _DRIVER_ERRORS as exc:
                raise database_error(exc, "get_tenant", tenant_id=tenant_id) from None
            if row is None:
                return None
            entry = self._decoder.remembered(row)
            if entry is None:
                return (await self._decoder.entries([row], ticket))[0][0]
            if self._crypto.audit.enabled:
                await self._decoder.audit_reads([entry])
            return entry[0]
        finally:
            if ticket is not None:
                ticket.close()

    async def _load_one(self, tenant_id: str) -> Entry | None:
        # Announce the decryption this call will probably need, so a batch about
        # to go can wait for it under load (see Coalescer).
        ticket = self._crypto.announce()
        try:
            try:
                row = await self._db.fetchrow(SQL["get_tenant"], tenant_id)
            except _DRIVER_ERRORS as exc:
                raise database_error(exc, "get_tenant", tenant_id=tenant_id) from None
            if row is None:
                return None
            return (await self._decoder.entries([row], ticket))[0]
        finally:
            ticket.close()

    async def get_tenants(self, tenant_ids: Iterable[str]) -> dict[str, Tenant]:
        """Return the known tenants among `tenant_ids`, as a dict keyed by tenant id.

        One query and at most one decryption hop for the whole set, every secret included.
        """
        ids = list(dict.fromkeys(validate_tenant_id(t) for t in tenant_ids))
        if not ids:
            return {}
        if self._live is None:
            entries = await self._load_many(ids)
        else:
            entries = await self._live.get_many(ids, self._load_many)
        return {tenant.tenant_id: tenant for tenant, _ in entries}

    async def _load_many(self, ids: list[str]) -> list[Entry]:
        try:
            rows = await self._db.fetch(SQL["get_tenants"], ids)
        except _DRIVER_ERRORS as exc:
            raise database_error(exc, "get_tenants") from None
        return await self._decoder.entries(rows)

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
                    rows = await self._db.fetch(SQL["first_page_tenants"], batch_size)
                else:
                    rows = await self._db.fetch(SQL["next_page_tenants"], last, batch_size)
            except _DRIVER_ERRORS as exc:
                raise database_error(exc, "iter_tenants") from None
            if not rows:
                return
            for tenant in await self._decoder.tenants(rows):
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
        check_secret_names(secrets)
        validate_tenant_id(tenant_id, creating=True)
        plaintexts = [secrets.get(column) for column in SECRETS]
        tokens = await self._encrypt(plaintexts)
        error: Exception | None = None
        try:
            row = await self._db.fetchrow(SQL["create_tenant"], tenant_id, name, *tokens)
        except asyncpg.UniqueViolationError as exc:
            if is_key_conflict(exc):
                error = TenantExistsError(tenant_id)
            else:
                error = database_error(exc, "create_tenant", tenant_id=tenant_id)
        except _DRIVER_ERRORS as exc:
            error = database_error(exc, "create_tenant", tenant_id=tenant_id)
        finally:
            self._changed(tenant_id)
        if error is not None:
            # Audited and raised out here: an await inside the handler would keep the
            # driver's error (row values in its DETAIL) as this error's __context__.
            await self._audit_write(tenant_id, secrets, "failed")
            raise error
        assert row is not None
        await self._audit_write(tenant_id, secrets, "ok")
        await self._recorded(tokens)
        values = dict(zip(FIELDS, row, strict=True))
        values.update(zip(SECRETS, plaintexts, strict=True))
        return Tenant.from_row(values)

    async def set_secrets(self, tenant_id: str, **values: str | None) -> None:
        """Set some of a tenant's secrets in one statement (`None` clears one).

        Only the named secrets change; all are encrypted in one worker hop.

        Raises:
            UnknownSecretError: a keyword names no secret of a tenant (before any I/O).
            TenantNotFoundError: no tenant has this id.
            DatabaseError: the update failed (a constraint, a trigger: named, no values).
        """
        check_secret_names(values)
        validate_tenant_id(tenant_id)
        if not values:
            raise TypeError("set_secrets() needs at least one secret, e.g. gemini_api_key=...")
        columns = tuple(column for column in SECRETS if column in values)
        tokens = await self._encrypt([values[column] for column in columns], columns)
        sql = self._set_sql.get(columns)
        if sql is None:
            sql = self._set_sql[columns] = set_secrets_sql(columns)
        error: Exception | None = None
        try:
            status = await self._db.execute(sql, tenant_id, *tokens)
        except _DRIVER_ERRORS as exc:
            error = database_error(exc, "set_secrets", tenant_id=tenant_id)
        finally:
            self._changed(tenant_id)
        if error is not None:  # out of the handler: see create_tenant
            await self._audit_write(tenant_id, values, "failed")
            raise error
        if status == "UPDATE 0":
            await self._audit_write(tenant_id, values, "not_found")
            raise TenantNotFoundError(tenant_id)
        await self._audit_write(tenant_id, values, "ok")
        await self._recorded(tokens)

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
            status = await self._db.execute(SQL["delete_tenant"], tenant_id)
        except _DRIVER_ERRORS as exc:
            raise database_error(exc, "delete_tenant", tenant_id=tenant_id) from None
        finally:
            self._changed(tenant_id)
        return bool(status != "DELETE 0")

    def _changed(self, tenant_id: str) -> None:
        """After a write (whatever its outcome): this process reads its own writes at once."""
        if self._live is not None:
            self._live.invalidate((tenant_id,))

    # -- encryption and audit ---------------------------------------------------

    async def _encrypt(
        self, plaintexts: Sequence[str | None], columns: Sequence[str] = SECRETS
    ) -> list[str | None]:
        """The tokens to store (one worker hop): `None` stays NULL, `""` becomes a token too."""
        todo = [i for i, value in enumerate(plaintexts) if value is not None]
        for i in todo:
            # Checked here, not in the worker: one bad value must fail only its own call,
            # not every request batched with it.
            check_plaintext(plaintexts[i])
        tokens: list[str | None] = [None] * len(plaintexts)
        if todo:
            made = await self._crypto.encrypt_values(
                [plaintexts[i] for i in todo],  # type: ignore[misc]
                [columns[i] for i in todo],
            )
            for i, token in zip(todo, made, strict=True):
                tokens[i] = token
        return tokens

    async def _recorded(self, tokens: Sequence[str | None]) -> None:
        """After a write that stored tokens: tenantstore_keys hears of the primary key."""
        if any(token is not None for token in tokens):
            # On the caller's own connection the record runs in a savepoint when
            # a transaction is open, so its failure cannot abort that transaction.
            conn = None if isinstance(self._db, asyncpg.Pool) else self._db
            await self._key_use.record(self._crypto.keyring.primary_key_id, primary=True, conn=conn)

    async def _audit_write(
        self, tenant_id: str, values: dict[str, str | None], outcome: str
    ) -> None:
        audit = self._crypto.audit
        if values and audit.enabled:
            key_id = self._crypto.keyring.primary_key_id
            await audit.emit(
                [
                    AuditEvent(
                        "clear" if values.get(column) is None else "write",
                        TABLE,
                        column,
                        tenant_id,
                        None if values.get(column) is None else key_id,
                        outcome,
                    )
                    for column in SECRETS
                    if column in values
                ]
            )
