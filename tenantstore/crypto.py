"""`AsyncCrypto`: Fernet off the event loop, batched, for the repository and the application.

One worker thread per event loop takes every encryption and decryption
requested meanwhile as one batch (`_offload.Coalescer`), because a thread hop
costs ~15x the crypto of one secret. Decrypted values are cached by token
(`_cache.DecryptedCache`): a changed secret is a new token, so the cache
never serves a stale value. The repository and the application share one
`AsyncCrypto`, so they share the worker, the cache, the metrics and the
audit log:

    crypto = AsyncCrypto(KeyRing.from_env())
    repo = TenantRepository(pool, crypto)
    [token] = await crypto.encrypt_many([client_secret], table="integrations",
                                        column="client_secret", keys=[row_id])
    [secret] = await crypto.decrypt_many([row["client_secret"]], ...)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from opentelemetry.metrics import MeterProvider

from ._cache import DecryptedCache
from ._offload import Coalescer, Ticket
from .audit import AuditEvent, AuditLog
from .encryption import KeyRing, check_plaintext, stored_token
from .errors import DecryptionError, EncryptionError, PlaintextSecretError
from .metrics import Metrics

__all__ = ["AsyncCrypto"]

_DECRYPT = 0
_ENCRYPT = 1

_Job = tuple[int, str]
# (plaintext or token, key index); a str: why a token does not decrypt (`wrong_key`,
# `corrupt`); None: a value that could not be encrypted.
_Result = tuple[str, int] | str | None


class AsyncCrypto:
    """Encrypt and decrypt lists of secrets in one worker-thread hop each, shared and cached.

    Args:
        keyring: the keys.
        cache_size: decrypted values kept, keyed by token; 0 turns the cache off.
        allow_plaintext: the default for `decrypt_many`: pass a stored value
            that is not a token through as it is (legacy plaintext, while
            `migrate encrypt` runs), or refuse it with `PlaintextSecretError`.
        audit: where audit events go (default: the `tenantstore.audit` logger).
        meter_provider: where metrics go (default: OpenTelemetry's global provider).
    """

    __slots__ = ("_allow_plaintext", "_cache", "_coalescer", "_keyring", "audit", "metrics")

    def __init__(
        self,
        keyring: KeyRing,
        *,
        cache_size: int = 10_000,
        allow_plaintext: bool = True,
        audit: AuditLog | None = None,
        meter_provider: MeterProvider | None = None,
    ) -> None:
        if not isinstance(keyring, KeyRing):
            raise TypeError("keyring must be a tenantstore.KeyRing")
        self._keyring = keyring
        self._cache = DecryptedCache(cache_size)
        self._allow_plaintext = allow_plaintext
        self.metrics = Metrics(meter_provider)
        self.metrics.primary_key(keyring.primary_key_id)
        self.audit = audit if audit is not None else AuditLog()
        self._coalescer: Coalescer[_Job, _Result] = Coalescer(
            self._work, on_batch=self.metrics.batch
        )

    def __repr__(self) -> str:
        return f"<AsyncCrypto {self._keyring!r} cache={len(self._cache)}/{self._cache.size}>"

    async def __aenter__(self) -> AsyncCrypto:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Flush the metrics and close the audit sinks (a buffering sink writes what it holds)."""
        self.metrics.flush()
        await self.audit.aclose()

    @property
    def keyring(self) -> KeyRing:
        """The keys this instance encrypts and decrypts with."""
        return self._keyring

    @property
    def cache(self) -> DecryptedCache:
        """The decrypted-value cache (its length is how many values it holds)."""
        return self._cache

    @property
    def coalescer(self) -> Coalescer[_Job, _Result]:
        """The batching worker (its `stats` show requests against batches)."""
        return self._coalescer

    @property
    def allow_plaintext(self) -> bool:
        """Whether a stored value that is not a token passes through `decrypt_many`."""
        return self._allow_plaintext

    # -- the worker thread ---------------------------------------------------

    def _work(self, jobs: list[_Job]) -> list[_Result]:
        """One batch: every decryption at once, then every encryption at once."""
        results: list[_Result] = [None] * len(jobs)
        decrypts = [i for i, (kind, _) in enumerate(jobs) if kind == _DECRYPT]
        if decrypts:
            keyring = self._keyring
            found = keyring.decrypt_batch_with_key_index([jobs[i][1] for i in decrypts])
            for i, result in zip(decrypts, found, strict=True):
                # The reason costs an HMAC per key: here in the worker, not on the loop.
                results[i] = keyring.failure_reason(jobs[i][1]) if result is None else result
        encrypts = [i for i, (kind, _) in enumerate(jobs) if kind == _ENCRYPT]
        if encrypts:
            plaintexts = [jobs[i][1] for i in encrypts]
            try:
                tokens = self._keyring.encrypt_batch(plaintexts)
            except Exception:  # callers check first; still, one value must not fail the batch
                for i, plaintext in zip(encrypts, plaintexts, strict=True):
                    results[i] = self._encrypt_one(plaintext)
                return results
            for i, token, plaintext in zip(encrypts, tokens, plaintexts, strict=True):
                # encrypt_batch passes "" through; a stored "" must be a token too.
                results[i] = (token, 0) if token else self._encrypt_one(plaintext)
        return results

    def _encrypt_one(self, plaintext: str) -> _Result:
        try:
            return (self._keyring.encrypt(plaintext), 0)
        except Exception:  # None: this one could not be encrypted (the caller raises)
            return None

    # -- for the repository --------------------------------------------------

    def announce(self) -> Ticket:
        """Say a decryption will probably follow (see `Coalescer.announce`)."""
        return self._coalescer.announce()

    async def decrypt_tokens(
        self,
        tokens: Sequence[str],
        columns: Sequence[str],
        *,
        ticket: Ticket | None = None,
    ) -> list[tuple[str, str] | None]:
        """Decrypt tokens in one hop (no cache lookup); cache, count and return each result.

        Per token `(plaintext, key id)`, or None where no key decrypts it (the
        failure counted under its column with its reason). `columns` name each
        token's column, for the metrics.
        """
        results = await self._coalescer.run([(_DECRYPT, token) for token in tokens], ticket=ticket)
        cache, metrics, key_ids = self._cache, self.metrics, self._keyring.key_ids
        out: list[tuple[str, str] | None] = []
        for token, column, result in zip(tokens, columns, results, strict=True):
            if not isinstance(result, tuple):
                metrics.decrypt_failed(column, result or "corrupt")
                out.append(None)
                continue
            plaintext, key_id = result[0], key_ids[result[1]]
            metrics.decrypted(column, key_id)
            cache.put(token, plaintext, key_id)
            out.append((plaintext, key_id))
        return out

    async def encrypt_values(self, values: Sequence[str], columns: Sequence[str]) -> list[str]:
        """Encrypt plaintexts in one hop (checked by the caller), counted per column."""
        results = await self._coalescer.run([(_ENCRYPT, value) for value in values])
        tokens = [result[0] for result in results if isinstance(result, tuple)]
        if len(tokens) != len(results):
            raise EncryptionError()
        key_id = self._keyring.primary_key_id
        for column in columns:
            self.metrics.encrypted(column, key_id)
        return tokens

    # -- for the application -------------------------------------------------

    async def encrypt_many(
        self,
        values: Sequence[str | None],
        *,
        table: str = "-",
        column: str = "-",
        keys: Sequence[Any] | None = None,
    ) -> list[str | None]:
        """Encrypt each value (`""` too) in one worker hop; `None` stays `None`.

        `table`, `column` and `keys` (the rows' keys, aligned with `values`)
        name the secrets in the audit log and the metrics.

        Raises:
            TypeError: a value is neither a str nor None.
            EncryptionError: a value holds a NUL character (PostgreSQL text
                could not hold it once decrypted) or is not valid unicode.
        """
        todo = [index for index, value in enumerate(values) if value is not None]
        for index in todo:
            check_plaintext(values[index])  # before queuing: a bad value fails only this call
        out: list[str | None] = list(values)
        if todo:
            plaintexts = [values[index] for index in todo]
            tokens = await self.encrypt_values(plaintexts, [column] * len(todo))  # type: ignore[arg-type]
            for index, token in zip(todo, tokens, strict=True):
                out[index] = token
            if self.audit.enabled:
                key_id = self._keyring.primary_key_id
                await self.audit.emit(
                    [
                        AuditEvent("encrypt", table, column, _key(keys, i), key_id, "ok")
                        for i in todo
                    ]
                )
        return out

    async def decrypt_many(
        self,
        values: Sequence[str | None],
        *,
        allow_plaintext: bool | None = None,
        table: str = "-",
        column: str = "-",
        keys: Sequence[Any] | None = None,
    ) -> list[str | None]:
        """Decrypt stored values in at most one worker hop, through the cache.

        `None` and `""` pass through. A value that is not a token (see
        `encryption.stored_token`) passes through as plaintext, or raises
        when plaintext is not allowed (`allow_plaintext`, default: the
        instance's setting). `table`, `column` and `keys` (the rows' keys,
        aligned with `values`) name the secrets in the audit log and metrics.

        Raises:
            DecryptionError: a token is corrupt or made under none of the keys
                (the message says which position, never the value).
            PlaintextSecretError: a value is plaintext and plaintext is refused.
            TypeError: a value is neither a str nor None.
        """
        allow = self._allow_plaintext if allow_plaintext is None else allow_plaintext
        out: list[str | None] = list(values)
        key_ids: dict[int, str | None] = {}
        missing: list[tuple[int, str]] = []
        cache = self._cache
        hits = 0
        for index, value in enumerate(values):
            if value is None:
                continue
            if not isinstance(value, str):
                raise TypeError(f"a stored value must be a str or None, not {type(value).__name__}")
            if not value:
                continue
            hit = cache.get(value)
            if hit is not None:
                out[index], key_ids[index] = hit
                hits += 1
                continue
            token = stored_token(value)
            if token is None:
                if not allow:
                    self.metrics.decrypt_failed(column, "plaintext_refused")
                    await self._audit_decrypt(table, column, keys, {index: None}, "refused")
                    raise PlaintextSecretError(None, None, position=index)
                key_ids[index] = None
                continue
            missing.append((index, token))
        self.metrics.cache("secrets", hits, len(missing))
        if missing:
            results = await self.decrypt_tokens(
                [token for _, token in missing], [column] * len(missing)
            )
            for (index, _), result in zip(missing, results, strict=True):
                if result is None:
                    await self._audit_decrypt(table, column, keys, {index: None}, "failed")
                    raise DecryptionError(
                        f"Invalid encrypted data or wrong encryption key (value {index})"
                    )
                out[index], key_ids[index] = result
        await self._audit_decrypt(table, column, keys, key_ids, "ok")
        return out

    async def _audit_decrypt(
        self,
        table: str,
        column: str,
        keys: Sequence[Any] | None,
        key_ids: dict[int, str | None],
        outcome: str,
    ) -> None:
        if key_ids and self.audit.enabled:
            await self.audit.emit(
                [
                    AuditEvent("decrypt", table, column, _key(keys, index), key_id, outcome)
                    for index, key_id in sorted(key_ids.items())
                ]
            )

    async def encrypt(self, value: str, **names: Any) -> str:
        """Encrypt one value (see `encrypt_many`)."""
        token = (await self.encrypt_many([value], **names))[0]
        assert token is not None
        return token

    async def decrypt(self, value: str, **options: Any) -> str:
        """Decrypt one stored value (see `decrypt_many`)."""
        plaintext = (await self.decrypt_many([value], **options))[0]
        assert plaintext is not None
        return plaintext


def _key(keys: Sequence[Any] | None, index: int) -> str | None:
    return None if keys is None else str(keys[index])
