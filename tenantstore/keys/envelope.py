"""Envelope mode: Fernet data keys stored wrapped by a KEK, unwrapped once at start-up.

`new_data_key` makes a data key, wraps it with the provider's KEK and stores
it in `tenantstore_keys` as the new primary (the old one stays for
decryption until `migrate rotate` has moved every secret). `load_keyring`
reads the wrapped keys and unwraps each once, giving an ordinary `KeyRing`:
requests never reach the HSM. `rewrap` moves every data key to another KEK
without touching a row of any secret table. `import_keys` wraps the plain
keys of `ENCRYPTION_KEY(S)` so a deployment can move to envelope mode and
still read what those keys encrypted.

`keyring_from_env(pool)` is the one call an application makes at start-up,
in either mode.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio.to_thread
import asyncpg

from .._offload import Sealed
from ..config import (
    FernetImplementation,
    configured_keys,
    fernet_setting,
    load_settings,
    nonblank_setting,
)
from ..encryption import ENCRYPTION_KEY, ENCRYPTION_KEYS, KeyRing, generate_encryption_key, key_id
from ..errors import ConfigurationError, database_error, printable
from .providers import KeyProvider, KeyProviderError, UnwrapError, provider_name
from .store import Q

__all__ = [
    "RewrapReport",
    "env_keys",
    "import_keys",
    "keyring_from_env",
    "load_keyring",
    "new_data_key",
    "rewrap",
]

_DRIVER_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)
_MIGRATE_HINT = "tenantstore_keys does not exist: run `python -m tenantstore.migrate up`"


def _raw(key: str) -> bytes:
    return base64.urlsafe_b64decode(key)


def _unwrap(provider: KeyProvider, kid: str, wrapped: bytes) -> str:
    """Unwrap data key `kid` and check that it is the key its id names."""
    try:
        raw = provider.unwrap(bytes(wrapped))
    except KeyProviderError as exc:
        raise UnwrapError(kid, str(exc)) from None
    try:
        key = base64.urlsafe_b64encode(raw).decode("ascii")
        matches = len(raw) == 32 and key_id(key) == kid
    except (binascii.Error, ValueError):
        matches = False
    if not matches:
        raise UnwrapError(kid, "it unwraps to another key (its row was altered or mixed up)")
    return key


def _check_wrapped_by(kid: str, wrapped_by: str, provider: KeyProvider) -> None:
    if wrapped_by != provider.kek_id:
        raise KeyProviderError(
            f"data key {printable(kid)} is wrapped by {printable(wrapped_by)}, not by this "
            f"process's KEK {printable(provider.kek_id)}: configure that KEK, or run "
            "`python -m tenantstore.keys rewrap`"
        )


async def load_keyring(
    pool: Any, provider: KeyProvider, *, fernet: FernetImplementation = "batch"
) -> KeyRing:
    """The key ring of the wrapped data keys in `tenantstore_keys`, each unwrapped once.

    Primary first, then the other keys newest first; retired keys are left
    out. The unwrapping runs in one worker thread.

    Args:
        pool: a pool or connection.
        provider: the KEK's provider (closed by the caller).
        fernet: the ring's Fernet implementation (`batch` or `pyca`).

    Raises:
        KeyProviderError: no data key is stored or none is primary, a key is
            wrapped by another KEK, or the provider fails.
        UnwrapError: a wrapped key does not unwrap (naming its key id).
        ConfigurationError: migration 0005 is not applied.
        DatabaseError: the database failed.
    """
    try:
        rows = await pool.fetch(Q["wrapped_keys"].sql)
    except asyncpg.UndefinedTableError:
        raise ConfigurationError(_MIGRATE_HINT) from None
    except _DRIVER_ERRORS as exc:
        raise database_error(exc, "load_keyring") from None
    if not rows:
        raise KeyProviderError(
            "tenantstore_keys holds no data key: run `python -m tenantstore.keys new-data-key` "
            "(or `keys import` to wrap the keys of ENCRYPTION_KEY)"
        )
    if rows[0]["state"] != "primary":
        raise KeyProviderError(
            "no wrapped data key is primary: run `python -m tenantstore.keys new-data-key`"
        )
    for row in rows:
        _check_wrapped_by(row["key_id"], row["wrapped_by"], provider)

    def unwrap_all() -> Sealed[list[str]]:  # sealed: these are the data keys themselves
        return Sealed([_unwrap(provider, row["key_id"], row["wrapped_key"]) for row in rows])

    keys = (await anyio.to_thread.run_sync(unwrap_all)).value
    return KeyRing(keys[0], keys[1:], fernet=fernet)


async def _store(pool: Any, provider: KeyProvider, key: str, *, primary: bool) -> bool:
    """Wrap `key`, check the wrap round-trips, store it; False if already stored wrapped."""
    kid = key_id(key)

    def wrap_checked() -> bytes:
        wrapped = provider.wrap(_raw(key))
        if _unwrap(provider, kid, wrapped) != key:  # pragma: no cover - _unwrap checks the id
            raise UnwrapError(kid, "the new wrapping does not round-trip")
        return wrapped

    wrapped = await anyio.to_thread.run_sync(wrap_checked)
    try:
        stored = await pool.fetchval(
            Q["store_data_key"].sql, kid, wrapped, provider.kek_id, primary
        )
    except asyncpg.UndefinedTableError:
        raise ConfigurationError(_MIGRATE_HINT) from None
    except _DRIVER_ERRORS as exc:
        raise database_error(exc, "store_data_key") from None
    return stored is not None


async def new_data_key(pool: Any, provider: KeyProvider) -> str:
    """Make a Fernet data key, wrap it with the KEK and store it as the new primary.

    The previous primary becomes decrypt-only in the same statement. The key
    itself is never returned, printed or stored unwrapped; before it is
    stored, its wrapping is unwrapped once to prove the KEK can give it back.

    Returns:
        The new key's id.

    Raises:
        KeyProviderError: the provider fails; nothing is stored.
        ConfigurationError: migration 0005 is not applied.
        DatabaseError: the database failed.
    """
    key = generate_encryption_key()
    await _store(pool, provider, key, primary=True)
    return key_id(key)


async def import_keys(
    pool: Any, provider: KeyProvider, keys: Sequence[str]
) -> list[tuple[str, bool]]:
    """Wrap plain keys (primary first) and store them: the first as primary, the rest decrypt-only.

    For moving a deployment from `ENCRYPTION_KEY(S)` to envelope mode without
    losing what those keys encrypted. A key already stored wrapped is left as
    it is.

    Returns:
        Per key, `(key id, whether it was stored now)`.

    Raises:
        As `new_data_key`.
    """
    done = []
    for index, key in enumerate(keys):
        stored = await _store(pool, provider, key, primary=index == 0)
        done.append((key_id(key), stored))
    return done


@dataclass
class RewrapReport:
    """What `rewrap` did: the key ids it moved, and how many were already there."""

    kek_id: str
    moved: list[str] = field(default_factory=list)
    already: int = 0

    def summary(self) -> str:
        """One line for the CLI."""
        return (
            f"Rewrap complete: {len(self.moved)} data keys moved to {printable(self.kek_id)}, "
            f"{self.already} already there"
        )


async def rewrap(
    pool: Any,
    source: KeyProvider,
    target: KeyProvider,
    *,
    progress: Callable[[str], object] | None = None,
) -> RewrapReport:
    """Move every wrapped data key (retired ones included) from `source`'s KEK to `target`'s.

    One key per transaction (its row locked, compare-and-swap on the KEK it
    was wrapped by), so an interrupted run leaves every key wrapped by one KEK
    or the other, and a rerun skips the keys already moved. No secret table
    is read or written: this is O(keys), not O(rows). Before anything moves,
    the target KEK must wrap and unwrap a probe.

    Raises:
        KeyProviderError: either provider fails, or a key is wrapped by a third KEK.
        UnwrapError: a key does not unwrap under `source` (naming its key id).
        ConfigurationError: migration 0005 is not applied.
        DatabaseError: the database failed.
    """
    probe = os.urandom(32)
    if await anyio.to_thread.run_sync(lambda: target.unwrap(target.wrap(probe))) != probe:
        raise KeyProviderError(f"{printable(target.kek_id)} does not give a wrapped key back")
    report = RewrapReport(target.kek_id)
    try:
        async with pool.acquire() as conn:
            total = await conn.fetchval(Q["count_wrapped_keys"].sql)
            candidates = [
                row[0] for row in await conn.fetch(Q["rewrap_candidates"].sql, target.kek_id)
            ]
            report.already = total - len(candidates)
            for kid in candidates:
                async with conn.transaction():
                    row = await conn.fetchrow(Q["lock_wrapped_key"].sql, kid)
                    if row is None or row["wrapped_by"] == target.kek_id:
                        report.already += 1  # moved by a concurrent run
                        continue
                    _check_wrapped_by(kid, row["wrapped_by"], source)
                    wrapped = row["wrapped_key"]

                    def move(kid: str = kid, wrapped: bytes = wrapped) -> bytes:
                        key = _unwrap(source, kid, wrapped)
                        new = target.wrap(_raw(key))
                        _unwrap(target, kid, new)
                        return new

                    new = await anyio.to_thread.run_sync(move)
                    await conn.execute(Q["rewrap_key"].sql, kid, new, target.kek_id, source.kek_id)
                report.moved.append(kid)
                if progress is not None:
                    progress(f"data key {kid} is now wrapped by {printable(target.kek_id)}")
    except asyncpg.UndefinedTableError:
        raise ConfigurationError(_MIGRATE_HINT) from None
    except _DRIVER_ERRORS as exc:
        raise database_error(exc, "rewrap") from None
    return report


async def keyring_from_env(
    pool: Any,
    environ: Mapping[str, str] | None = None,
    env_file: str | os.PathLike[str] | None = ".env.secrets",
) -> KeyRing:
    """The application's key ring, in either mode: the one call to make at start-up.

    `TENANTSTORE_KEY_PROVIDER` unset or `env`: `KeyRing.from_env` (no database
    access). `pkcs11`: open the HSM (in a worker thread), unwrap the data keys
    of `tenantstore_keys` once (`load_keyring`), close the HSM session. Plain
    keys in `ENCRYPTION_KEY(S)` are refused in pkcs11 mode: the point of the
    HSM is that no key sits in the environment or on disk.

    Raises:
        ConfigurationError: as `KeyRing.from_env`; in pkcs11 mode a key
            setting is also set, or a provider setting is missing.
        KeyProviderError, UnwrapError: as `load_keyring` and the provider.
    """
    settings = load_settings(environ, [] if env_file is None else [env_file])
    if provider_name(settings) == "env":
        return KeyRing.from_env(environ, env_file)
    for name in (ENCRYPTION_KEY, ENCRYPTION_KEYS):
        if nonblank_setting(settings, name) or nonblank_setting(settings, name + "_FILE"):
            raise ConfigurationError(
                f"{name} is set, but TENANTSTORE_KEY_PROVIDER=pkcs11 reads the data keys from "
                f"tenantstore_keys: after `python -m tenantstore.keys import`, remove {name} "
                "from the environment and the env files"
            )
    fernet = fernet_setting(settings)
    from .pkcs11 import Pkcs11Provider

    provider = await anyio.to_thread.run_sync(Pkcs11Provider.from_settings, settings)
    try:
        return await load_keyring(pool, provider, fernet=fernet)
    finally:
        provider.close()


def env_keys(settings: Mapping[str, str]) -> list[str]:
    """The plain keys `ENCRYPTION_KEY(S)` configure, primary first (for `keys import`)."""
    return [key.strip() for key, _ in configured_keys(settings)]
