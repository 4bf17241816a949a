"""Fernet encryption of tenant secrets: a pure, synchronous key ring.

`KeyRing` holds the primary key (used for every new token) and any previous
keys (accepted for decryption only, until rotation has moved every token to
the primary). Tokens are standard Fernet tokens, so a database written by any
other Fernet-based system is readable as it is, and ours by theirs.

The synchronous methods do CPU work and no I/O. `encrypt_many` and
`decrypt_many` are the only async methods: each moves a whole list into one
anyio worker-thread call, because a thread hop costs ~15x the crypto of one
API key.

The module functions (`encrypt_api_key`, `decrypt_api_key`, `is_encrypted`,
`generate_encryption_key`) keep the seed application's calling convention.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TypeVar

import anyio.to_thread
from cryptography.fernet import Fernet

from ._fernet import (
    FernetKey,
    decrypt_tokens,
    encrypt_values,
    failure_reason,
    pyca_decrypt_tokens,
    pyca_encrypt_values,
)
from ._offload import Sealed
from .config import (
    ENCRYPTION_KEY,
    ENCRYPTION_KEYS,
    OLD_ENCRYPTION_KEY,
    TENANTSTORE_FERNET,
    FernetImplementation,
    configured_keys,
    fernet_setting,
    load_settings,
)
from .errors import (
    ConfigurationError,
    DecryptionError,
    EncryptionError,
    InvalidEncryptionKeyError,
)

__all__ = [
    "ENCRYPTION_KEY",
    "ENCRYPTION_KEYS",
    "OLD_ENCRYPTION_KEY",
    "TENANTSTORE_FERNET",
    "FernetImplementation",
    "KeyRing",
    "configured_keys",
    "decrypt_api_key",
    "encrypt_api_key",
    "fernet_setting",
    "generate_encryption_key",
    "is_encrypted",
    "key_id",
    "stored_token",
]

_S = TypeVar("_S", str, str | None)  # batches keep None in, None out

FERNET_IMPLEMENTATIONS = ("batch", "pyca")
"""`batch`: tenantstore's batch Fernet (`_fernet`); `pyca`: `cryptography.fernet.Fernet`."""

# A Fernet token is urlsafe-base64 of: version 0x80 | timestamp (8) | IV (16)
# | AES-CBC ciphertext (a positive multiple of 16) | HMAC-SHA256 (32).
_TOKEN_OVERHEAD = 1 + 8 + 16 + 32
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9_-]+={0,2}")
_KEY_CHARS = re.compile(r"[A-Za-z0-9_-]{43}=")
_SECOND = frozenset("ABCDEFGHIJKLMNOP")


def _load_key(key: object, setting: str) -> FernetKey:
    """Load a 44-character Fernet key, naming `setting` (never the key) on error."""
    if not isinstance(key, str) or not _KEY_CHARS.fullmatch(key.strip()):
        raise InvalidEncryptionKeyError(setting)
    try:
        return FernetKey(key.strip())
    except ValueError as exc:
        raise InvalidEncryptionKeyError(setting) from exc


def _utf8(value: str) -> bytes:
    if not isinstance(value, str):
        raise TypeError(f"a secret must be a str, not {type(value).__name__}")
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:
        pass
    # Raised outside the handler: the encode error carries the whole plaintext,
    # and even `from None` would keep it reachable as __context__.
    raise EncryptionError()


def check_plaintext(value: object) -> None:
    """Refuse, before any work is queued, a secret that could not be stored and read back.

    Raises:
        TypeError: `value` is not a str.
        EncryptionError: it holds a NUL character (PostgreSQL text cannot hold
            it once decrypted) or a lone surrogate (not UTF-8 encodable).
    """
    if not isinstance(value, str):
        raise TypeError(f"a secret must be a str or None, not {type(value).__name__}")
    if "\x00" in value:
        raise EncryptionError("it contains a NUL character, which PostgreSQL text cannot hold")
    if not value.isascii():
        _utf8(value)


def is_encrypted(value: object) -> bool:
    """Tell whether `value` is structurally a Fernet token, without any key.

    True for a str of url-safe base64 that decodes to version byte 0x80 and a
    valid Fernet length. Plain API keys (`AIza...`) never qualify: they do not
    decode to 0x80 and are far too short.
    """
    if not isinstance(value, str) or len(value) % 4 or len(value) < 100:
        return False
    # Version byte 0x80: the first character is "g" (100000) and the second
    # holds its last two bits (00) and four of the next byte: "A" to "P".
    if value[0] != "g" or value[1] not in _SECOND or not _TOKEN_CHARS.fullmatch(value):
        return False
    # The characters are url-safe base64 with padding only at the end, so the
    # decoded length follows from the text: no need to decode the whole token.
    body = len(value) // 4 * 3 - value.count("=", -2) - _TOKEN_OVERHEAD
    return body >= 16 and body % 16 == 0


def stored_token(value: object) -> str | None:
    """The Fernet token a stored value holds, or None when it holds plaintext.

    The one rule for what a token is, shared by the repository, the batch
    runner and `verify`: a value that is structurally a token once
    surrounding whitespace is stripped (a hand-edited row, a `psql \\copy`
    artefact) is that token, and is never encrypted a second time.
    """
    if not isinstance(value, str) or len(value) < 100:
        return None
    if is_encrypted(value):
        return value
    stripped = value.strip()
    return stripped if stripped is not value and is_encrypted(stripped) else None


def key_id(key: str) -> str:
    """The id of a Fernet key: 12 hex characters that name it and reveal nothing of it.

    HMAC-SHA256 keyed by the key over a fixed label, truncated: stable across
    processes and versions, shown by `keys list`, `verify`, logs and errors.

    Raises:
        InvalidEncryptionKeyError: `key` is not a Fernet key.
    """
    return _load_key(key, "key").key_id


class KeyRing:
    """A primary Fernet key plus previous keys still accepted for decryption.

    Args:
        primary: the key new tokens are made with (44 url-safe base64 chars).
        previous: older keys, tried in order after the primary when decrypting.
        fernet: `"batch"` (the default) runs tenantstore's batch Fernet
            (`tenantstore._fernet`); `"pyca"` runs pyca's `cryptography.fernet.Fernet`
            for every token instead, trying the keys in order as `MultiFernet`
            does. Both make standard tokens and give the same results, key
            index included; the batch one is faster on lists.

    Raises:
        InvalidEncryptionKeyError: a key is malformed; the message names
            `ENCRYPTION_KEY` or `OLD_ENCRYPTION_KEY[i]`, never the key.
        ConfigurationError: `fernet` is neither `"batch"` nor `"pyca"`.
    """

    __slots__ = ("_hits", "_keys", "_order", "fernet")

    def __init__(
        self, primary: str, previous: Iterable[str] = (), *, fernet: FernetImplementation = "batch"
    ) -> None:
        if isinstance(previous, str):
            previous = [previous]
        self._setup(
            (
                _load_key(primary, ENCRYPTION_KEY),
                *(_load_key(key, f"{OLD_ENCRYPTION_KEY}[{i}]") for i, key in enumerate(previous)),
            ),
            fernet,
        )

    def _setup(self, keys: tuple[FernetKey, ...], fernet: FernetImplementation) -> None:
        if fernet not in FERNET_IMPLEMENTATIONS:
            raise ConfigurationError(
                f"unknown Fernet implementation {fernet!r}: expected one of "
                + ", ".join(FERNET_IMPLEMENTATIONS)
            )
        self._keys = keys
        self.fernet: FernetImplementation = fernet
        self._hits = [0] * len(keys)  # tokens each key decrypted, recently (halved now and then)
        self._order = list(range(len(keys)))

    # The implementation is looked up per call, not bound once: every Fernet
    # operation goes through these module functions (tests spy on them).
    def _encrypt(
        self, key: FernetKey, values: Sequence[bytes], *, current_time: int, randomness: bytes
    ) -> list[str]:
        if self.fernet == "pyca":
            return pyca_encrypt_values(key, values, current_time=current_time)
        return encrypt_values(key, values, current_time=current_time, randomness=randomness)

    def _decrypt(
        self, keys: Sequence[FernetKey], tokens: Sequence[str]
    ) -> list[tuple[str, int] | None]:
        # Keys are tried most-used first: when most tokens are under an old key
        # (a rotation not yet run), they cost one HMAC each, not one per newer key.
        order = self._order
        if self.fernet == "pyca":
            results = pyca_decrypt_tokens(keys, tokens, order)
        else:
            results = decrypt_tokens(keys, tokens, order)
        if len(keys) > 1:
            hits = self._hits
            for result in results:
                if result is not None:
                    hits[result[1]] += 1
            if max(hits) > 100_000:  # recent use counts: after a rotation the primary catches up
                self._hits = hits = [count // 2 for count in hits]
            self._order = sorted(range(len(keys)), key=hits.__getitem__, reverse=True)
        return results

    @classmethod
    def _named(
        cls, keys: Sequence[tuple[str, str]], fernet: FernetImplementation = "batch"
    ) -> KeyRing:
        """A ring of `(key, setting)` pairs, primary first; errors name the setting."""
        ring = cls.__new__(cls)
        ring._setup(tuple(_load_key(key, setting) for key, setting in keys), fernet)
        return ring

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        env_file: str | os.PathLike[str] | None = ".env.secrets",
    ) -> KeyRing:
        """Build a key ring from the key settings (plain keys only; see `configured_keys`).

        `ENCRYPTION_KEYS` (comma-separated, primary first), or `ENCRYPTION_KEY`
        plus `OLD_ENCRYPTION_KEY` (comma-separated); each may instead be given
        as `NAME_FILE`, the path of a file holding it. `TENANTSTORE_FERNET=pyca`
        picks pyca's Fernet (see `KeyRing`). The environment (`os.environ` when
        `environ` is None) wins over `env_file`.

        Raises:
            EncryptionKeyMissingError: no primary key is set at all.
            EmptySettingError: a key setting (or one of its entries, or its
                file) is set but blank, e.g. copied from an unset shell variable.
            InvalidEncryptionKeyError: a key is malformed; the message names the
                setting (`ENCRYPTION_KEYS[1]`), never the key.
            ConfigurationError: `ENCRYPTION_KEYS` is set together with
                `ENCRYPTION_KEY` or `OLD_ENCRYPTION_KEY`, a setting is given both
                directly and as `NAME_FILE`, a key file is unsafe or unreadable,
                or `TENANTSTORE_FERNET` is not `batch` or `pyca`.
        """
        settings = load_settings(environ, [] if env_file is None else [env_file])
        return cls._named(configured_keys(settings), fernet_setting(settings))

    def __repr__(self) -> str:
        return f"<KeyRing primary={self._keys[0].key_id} previous={self.previous_count}>"

    @property
    def previous_count(self) -> int:
        """How many previous keys this ring accepts for decryption."""
        return len(self._keys) - 1

    @property
    def key_ids(self) -> tuple[str, ...]:
        """The id of every key, primary first (see `key_id`)."""
        return tuple(key.key_id for key in self._keys)

    @property
    def primary_key_id(self) -> str:
        """The id of the key new tokens are made with."""
        return self._keys[0].key_id

    is_encrypted = staticmethod(is_encrypted)

    # -- single values -------------------------------------------------------

    def encrypt(self, plaintext: str) -> str:
        """Encrypt `plaintext` (even `""`) under the primary key and return the ASCII token.

        Raises:
            EncryptionError: `plaintext` is not valid unicode.
            TypeError: `plaintext` is not a str (bytes and bytearray included).
        """
        return self.encrypt_at_time(plaintext, int(time.time()))

    def encrypt_at_time(self, plaintext: str, current_time: int) -> str:
        """Like `encrypt`, with the token's timestamp pinned (for tests and vectors)."""
        data = [_utf8(plaintext)]
        return self._encrypt(
            self._keys[0], data, current_time=current_time, randomness=os.urandom(32)
        )[0]

    def decrypt(self, token: str) -> str:
        """Decrypt `token` with the primary key, then each previous key.

        Raises:
            DecryptionError: the token is corrupt or made under none of the keys.
            TypeError: `token` is not a str.
        """
        return self.decrypt_with_key_index(token)[0]

    def decrypt_with_key_index(self, token: str) -> tuple[str, int]:
        """Decrypt `token` and say which key did: 0 for the primary, i + 1 for previous[i].

        Raises:
            DecryptionError: no configured key decrypts the token.
        """
        if not isinstance(token, str):
            raise TypeError(f"a token must be a str, not {type(token).__name__}")
        result = self._decrypt(self._keys, [token.strip()])[0]
        if result is None:
            raise DecryptionError()
        return result

    def key_index(self, token: str) -> int:
        """Return which key decrypts `token`: 0 for the primary, i + 1 for previous[i].

        Raises:
            DecryptionError: no configured key decrypts the token.
        """
        return self.decrypt_with_key_index(token)[1]

    def needs_rotation(self, token: str) -> bool:
        """True when `token` decrypts only under a previous key.

        Raises:
            DecryptionError: no configured key decrypts the token.
        """
        return self.key_index(token) > 0

    def rotate(self, token: str) -> str:
        """Re-encrypt `token` under the primary key.

        Raises:
            DecryptionError: no configured key decrypts the token.
        """
        return self.encrypt(self.decrypt(token))

    # -- batches -------------------------------------------------------------

    def encrypt_batch(self, values: Sequence[_S]) -> list[_S]:
        """Encrypt each value; `None` and `""` pass through unchanged.

        All tokens of one batch share a timestamp (Fernet's TTL is not used here).
        """
        out = list(values)
        todo = [index for index, value in enumerate(out) if value]
        data = [_utf8(out[index]) for index in todo]  # type: ignore[arg-type]
        tokens = self._encrypt(
            self._keys[0],
            data,
            current_time=int(time.time()),
            randomness=os.urandom(16 * (len(data) + 1)) if self.fernet == "batch" else b"",
        )
        for index, token in zip(todo, tokens, strict=True):
            out[index] = token
        return out

    def decrypt_batch(self, values: Sequence[_S]) -> list[_S]:
        """Decrypt each token; `None` and `""` pass through unchanged.

        Raises:
            DecryptionError: any token fails (use `try_decrypt_batch` to keep going).
        """
        out = list(values)
        todo = [index for index, value in enumerate(out) if value]
        for index in todo:
            if not isinstance(out[index], str):
                raise TypeError(f"a token must be a str, not {type(out[index]).__name__}")
        results = self._decrypt(self._keys, [out[index] for index in todo])  # type: ignore[misc]
        for index, result in zip(todo, results, strict=True):
            if result is None:
                raise DecryptionError()
            out[index] = result[0]
        return out

    def try_decrypt_batch(self, tokens: Sequence[str]) -> list[str | None]:
        """Decrypt each token, giving `None` for one that no key decrypts."""
        return [None if r is None else r[0] for r in self._decrypt(self._keys, tokens)]

    def decrypt_batch_with_key_index(self, tokens: Sequence[str]) -> list[tuple[str, int] | None]:
        """Per token `(plaintext, key index)`, or None where no key decrypts it."""
        return self._decrypt(self._keys, tokens)

    def failure_reason(self, token: str) -> str:
        """Why `token` does not decrypt: `wrong_key` (no key authenticates it) or `corrupt`."""
        return failure_reason(self._keys, token)

    async def encrypt_many(self, values: Sequence[_S]) -> list[_S]:
        """Encrypt a list in one worker-thread call; `None` and `""` pass through."""
        # Sealed both ways: asyncio's debug log shows a callback's arguments and result.
        sealed = await anyio.to_thread.run_sync(lambda: Sealed(self.encrypt_batch(values)))
        return sealed.value

    async def decrypt_many(self, values: Sequence[_S]) -> list[_S]:
        """Decrypt a list in one worker-thread call; `None` and `""` pass through.

        Raises:
            DecryptionError: any token fails.
        """
        sealed = await anyio.to_thread.run_sync(lambda: Sealed(self.decrypt_batch(values)))
        return sealed.value


def generate_encryption_key() -> str:
    """Return a new random Fernet key (44 url-safe base64 characters)."""
    return Fernet.generate_key().decode("ascii")


def _ring_from_environment() -> KeyRing:
    return KeyRing.from_env()


def encrypt_api_key(plaintext: str | None) -> str | None:
    """Encrypt with the key ring from the environment; `None` and `""` pass through.

    Raises:
        EncryptionKeyMissingError: `ENCRYPTION_KEY` is not set.
    """
    if plaintext is not None and not isinstance(plaintext, str):
        raise TypeError(f"a secret must be a str or None, not {type(plaintext).__name__}")
    if not plaintext:
        return plaintext
    return _ring_from_environment().encrypt(plaintext)


def decrypt_api_key(ciphertext: str | None) -> str | None:
    """Decrypt with the key ring from the environment; `None` and `""` pass through.

    Raises:
        EncryptionKeyMissingError: `ENCRYPTION_KEY` is not set.
        DecryptionError: the token is corrupt or made under another key.
    """
    if ciphertext is not None and not isinstance(ciphertext, str):
        raise TypeError(f"a token must be a str or None, not {type(ciphertext).__name__}")
    if not ciphertext:
        return ciphertext
    return _ring_from_environment().decrypt(ciphertext)
