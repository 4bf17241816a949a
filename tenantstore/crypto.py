"""`AsyncCrypto`: Fernet off the event loop, batched, for the repository and the application.

One worker thread per event loop takes every encryption and decryption
requested meanwhile as one batch (`_offload.Coalescer`), because a thread hop
costs ~15x the crypto of one secret. Decrypted values are cached by token
(`_cache.DecryptedCache`): a changed secret is a new token, so the cache
never serves a stale value. The repository and the application share one
`AsyncCrypto`, so they share the worker and the cache:

    crypto = AsyncCrypto(KeyRing.from_env())
    repo = TenantRepository(pool, crypto)
    token, = await crypto.encrypt_many([client_secret])
    secret, = await crypto.decrypt_many([row["client_secret"]])
"""

from __future__ import annotations

from collections.abc import Sequence

from ._cache import DecryptedCache
from ._offload import Coalescer, Ticket
from .encryption import KeyRing, stored_token
from .errors import DecryptionError, EncryptionError, PlaintextSecretError

__all__ = ["AsyncCrypto"]

_DECRYPT = 0
_ENCRYPT = 1

_Job = tuple[int, str]
_Result = tuple[str, int] | None  # (plaintext or token, key index), or None: undecryptable


class AsyncCrypto:
    """Encrypt and decrypt lists of secrets in one worker-thread hop each, shared and cached.

    Args:
        keyring: the keys.
        cache_size: decrypted values kept, keyed by token; 0 turns the cache off.
        allow_plaintext: the default for `decrypt_many`: pass a stored value
            that is not a token through as it is (legacy plaintext, while
            `migrate encrypt` runs), or refuse it with `PlaintextSecretError`.
    """

    __slots__ = ("_allow_plaintext", "_cache", "_coalescer", "_keyring")

    def __init__(
        self, keyring: KeyRing, *, cache_size: int = 10_000, allow_plaintext: bool = True
    ) -> None:
        if not isinstance(keyring, KeyRing):
            raise TypeError("keyring must be a tenantstore.KeyRing")
        self._keyring = keyring
        self._cache = DecryptedCache(cache_size)
        self._allow_plaintext = allow_plaintext
        self._coalescer: Coalescer[_Job, _Result] = Coalescer(self._work)

    def __repr__(self) -> str:
        return f"<AsyncCrypto {self._keyring!r} cache={len(self._cache)}/{self._cache.size}>"

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
            found = self._keyring.decrypt_batch_with_key_index([jobs[i][1] for i in decrypts])
            for i, result in zip(decrypts, found, strict=True):
                results[i] = result
        encrypts = [i for i, (kind, _) in enumerate(jobs) if kind == _ENCRYPT]
        if encrypts:
            plaintexts = [jobs[i][1] for i in encrypts]
            tokens = self._keyring.encrypt_batch(plaintexts)
            for i, token, plaintext in zip(encrypts, tokens, plaintexts, strict=True):
                # encrypt_batch passes "" through; a stored "" must be a token too.
                results[i] = (token or self._keyring.encrypt(plaintext), 0)
        return results

    # -- for the repository --------------------------------------------------

    def announce(self) -> Ticket:
        """Say a decryption will probably follow (see `Coalescer.announce`)."""
        return self._coalescer.announce()

    async def decrypt_tokens(
        self, tokens: Sequence[str], *, ticket: Ticket | None = None
    ) -> list[tuple[str, int] | None]:
        """Decrypt tokens in one hop (no cache lookup); cache and return each result.

        Per token `(plaintext, key index)`, or None where no key decrypts it.
        """
        results = await self._coalescer.run([(_DECRYPT, token) for token in tokens], ticket=ticket)
        cache = self._cache
        for token, result in zip(tokens, results, strict=True):
            if result is not None:
                cache.put(token, result[0])
        return results

    # -- for the application -------------------------------------------------

    async def encrypt_many(self, values: Sequence[str | None]) -> list[str | None]:
        """Encrypt each value (`""` too) in one worker hop; `None` stays `None`.

        Raises:
            TypeError: a value is neither a str nor None.
            EncryptionError: a value holds a NUL character (PostgreSQL text
                could not hold it once decrypted) or is not valid unicode.
        """
        todo: list[int] = []
        for index, value in enumerate(values):
            if value is None:
                continue
            if not isinstance(value, str):
                raise TypeError(f"a secret must be a str or None, not {type(value).__name__}")
            if "\x00" in value:
                raise EncryptionError(
                    "it contains a NUL character, which PostgreSQL text cannot hold"
                )
            todo.append(index)
        out: list[str | None] = list(values)
        if todo:
            jobs = [(_ENCRYPT, values[index]) for index in todo]
            results = await self._coalescer.run(jobs)  # type: ignore[arg-type]
            for index, result in zip(todo, results, strict=True):
                assert result is not None
                out[index] = result[0]
        return out

    async def decrypt_many(
        self, values: Sequence[str | None], *, allow_plaintext: bool | None = None
    ) -> list[str | None]:
        """Decrypt stored values in at most one worker hop, through the cache.

        `None` and `""` pass through. A value that is not a token (see
        `encryption.stored_token`) passes through as plaintext, or raises
        when plaintext is not allowed (`allow_plaintext`, default: the
        instance's setting).

        Raises:
            DecryptionError: a token is corrupt or made under none of the keys
                (the message says which position, never the value).
            PlaintextSecretError: a value is plaintext and plaintext is refused.
            TypeError: a value is neither a str nor None.
        """
        allow = self._allow_plaintext if allow_plaintext is None else allow_plaintext
        out: list[str | None] = list(values)
        missing: list[tuple[int, str]] = []
        cache = self._cache
        for index, value in enumerate(values):
            if value is None:
                continue
            if not isinstance(value, str):
                raise TypeError(f"a stored value must be a str or None, not {type(value).__name__}")
            if not value:
                continue
            token = stored_token(value)
            if token is None:
                if not allow:
                    raise PlaintextSecretError(None, None, position=index)
                continue
            hit = cache.get(token)
            if hit is not None:
                out[index] = hit
            else:
                missing.append((index, token))
        if missing:
            results = await self.decrypt_tokens([token for _, token in missing])
            for (index, _), result in zip(missing, results, strict=True):
                if result is None:
                    raise DecryptionError(
                        f"Invalid encrypted data or wrong encryption key (value {index})"
                    )
                out[index] = result[0]
        return out

    async def encrypt(self, value: str) -> str:
        """Encrypt one value (see `encrypt_many`)."""
        token = (await self.encrypt_many([value]))[0]
        assert token is not None
        return token

    async def decrypt(self, value: str, *, allow_plaintext: bool | None = None) -> str:
        """Decrypt one stored value (see `decrypt_many`)."""
        plaintext = (await self.decrypt_many([value], allow_plaintext=allow_plaintext))[0]
        assert plaintext is not None
        return plaintext
