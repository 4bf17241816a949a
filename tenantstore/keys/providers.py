"""Key providers: where the key-encryption key (KEK) of envelope mode lives.

In envelope mode the Fernet data keys are made by tenantstore, stored in
`tenantstore_keys` wrapped by a KEK, and unwrapped once at start-up. A
provider holds the KEK and does the wrapping; tenantstore never sees it.

- `env` (the default): no KEK. The keys are the plain keys of
  `ENCRYPTION_KEY(S)` as always; `provider_from_env` returns None.
- `pkcs11`: the KEK is a non-extractable AES key in an HSM reached through
  PKCS#11 (`tenantstore.keys.pkcs11.Pkcs11Provider`).

Your own provider (a cloud KMS, Vault transit) is any object with the four
members of `KeyProvider`; pass it to `load_keyring`, `new_data_key` and
`rewrap` (see the README's "Keys" section for a sketch).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

from ..config import load_settings, nonblank_setting
from ..errors import ConfigurationError, printable

__all__ = [
    "PROVIDERS",
    "TENANTSTORE_KEY_PROVIDER",
    "KeyProvider",
    "KeyProviderError",
    "UnwrapError",
    "provider_from_env",
    "provider_name",
]

TENANTSTORE_KEY_PROVIDER = "TENANTSTORE_KEY_PROVIDER"
PROVIDERS = ("env", "pkcs11")


class KeyProviderError(ConfigurationError):
    """A key provider is misconfigured or unreachable, or refused an operation.

    Raised before anything is changed: a wrong PIN, a token or KEK label that
    is absent, a module that does not load, an HSM that does not answer. The
    message names settings, labels and key ids, never a PIN or a key.
    """


class UnwrapError(KeyProviderError):
    """A wrapped data key did not unwrap (or unwrapped to another key).

    Attributes:
        key_id: the data key's id.
    """

    def __init__(self, key_id: str, reason: str) -> None:
        self.key_id = key_id
        super().__init__(f"data key {printable(key_id)} does not unwrap: {reason}")


@runtime_checkable
class KeyProvider(Protocol):
    """What tenantstore needs of a KEK: an id, wrap, unwrap, close.

    `wrap` and `unwrap` are synchronous and may block (an HSM, a network
    call): tenantstore calls them from a worker thread, a handful of times
    at start-up or in a `keys` command, never per request.
    """

    @property
    def kek_id(self) -> str:
        """Names the KEK and reveals nothing secret: `pkcs11:token=T;key=K`, a KMS key ARN."""
        ...

    def wrap(self, data_key: bytes) -> bytes:
        """Wrap (encrypt) a 32-byte data key under the KEK.

        Raises:
            KeyProviderError: the provider refused or could not be reached.
        """
        ...

    def unwrap(self, wrapped: bytes) -> bytes:
        """Unwrap what `wrap` returned, giving the data key back.

        Raises:
            KeyProviderError: the blob is not one this KEK wrapped, or the
                provider refused or could not be reached.
        """
        ...

    def close(self) -> None:
        """Release sessions and connections; the provider is not used afterwards."""
        ...


def provider_name(settings: Mapping[str, str]) -> str:
    """The provider `TENANTSTORE_KEY_PROVIDER` names: `env` (the default) or `pkcs11`.

    Raises:
        EmptySettingError: the setting is blank.
        ConfigurationError: it names no known provider.
    """
    name = nonblank_setting(settings, TENANTSTORE_KEY_PROVIDER) or "env"
    if name not in PROVIDERS:
        raise ConfigurationError(
            f"{TENANTSTORE_KEY_PROVIDER} must be one of {', '.join(PROVIDERS)}, "
            f"not {printable(name)!r}"
        )
    return name


def provider_from_env(
    environ: Mapping[str, str] | None = None,
    env_file: str | os.PathLike[str] | None = ".env.secrets",
) -> KeyProvider | None:
    """The provider the settings configure, opened; None for `env` (no KEK).

    Blocks while a PKCS#11 module loads and logs in: from async code, call it
    in a worker thread (`keyring_from_env` does).

    Raises:
        ConfigurationError: a provider setting is missing or malformed.
        KeyProviderError: the provider cannot be reached or refuses the settings.
    """
    settings = load_settings(environ, [] if env_file is None else [env_file])
    if provider_name(settings) == "env":
        return None
    from .pkcs11 import Pkcs11Provider

    return Pkcs11Provider.from_settings(settings)
