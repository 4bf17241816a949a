"""The `pkcs11` key provider: a KEK in an HSM, reached through PKCS#11 (python-pkcs11).

The KEK is an AES key stored in the token, non-extractable and sensitive:
it never leaves the HSM. Wrapping happens inside the token with AES key
wrap (RFC 3394, `CKM_AES_KEY_WRAP`; `CKM_AES_KEY_WRAP_PAD` where only that is
offered): the data key enters the token as a short-lived session object and
comes out wrapped; unwrapping creates a session object from which the data
key is read, then destroys it.

Settings (explicit arguments win; `TENANTSTORE_KEY_PROVIDER=pkcs11` picks it):

- `TENANTSTORE_PKCS11_MODULE`: path of the PKCS#11 module (the vendor's
  `.so`; SoftHSM2's is `/usr/lib/softhsm/libsofthsm2.so` on Debian).
- `TENANTSTORE_PKCS11_TOKEN`: the token's label.
- `TENANTSTORE_PKCS11_PIN` or `TENANTSTORE_PKCS11_PIN_FILE`: the user PIN
  (the file must be owner-only, as key files are).
- `TENANTSTORE_PKCS11_KEK`: the KEK's label in the token.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from typing import Any

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.exceptions import (
    MultipleObjectsReturned,
    NoSuchKey,
    NoSuchToken,
    PinIncorrect,
    PinInvalid,
    PinLenRange,
    PinLocked,
    PKCS11Error,
    UserAlreadyLoggedIn,
)

from ..config import file_setting, load_settings, nonblank_setting
from ..errors import ConfigurationError, printable
from .providers import KeyProviderError

__all__ = ["KEK", "MODULE", "PIN", "PIN_FILE", "TOKEN", "Pkcs11Provider"]

MODULE = "TENANTSTORE_PKCS11_MODULE"
TOKEN = "TENANTSTORE_PKCS11_TOKEN"  # noqa: S105 - the name of a setting
PIN = "TENANTSTORE_PKCS11_PIN"
PIN_FILE = PIN + "_FILE"
KEK = "TENANTSTORE_PKCS11_KEK"

_MECHANISMS = (Mechanism.AES_KEY_WRAP, Mechanism.AES_KEY_WRAP_PAD)
_PIN_ERRORS = (PinIncorrect, PinInvalid, PinLenRange)


def _reason(exc: BaseException) -> str:
    """A PKCS#11 error as text: its class name only (`PinIncorrect`, `DeviceRemoved`)."""
    return type(exc).__name__


class Pkcs11Provider:
    """A KEK in a PKCS#11 token: opens a session, logs in and finds the KEK.

    Args:
        module: path of the PKCS#11 module.
        token: the token's label.
        pin: the user PIN (used to log in, not kept).
        kek: the KEK's label: an AES key with CKA_WRAP and CKA_UNWRAP, and
            neither extractable nor readable (CKA_SENSITIVE).

    Raises:
        KeyProviderError: the module does not load, the token is absent or
            does not answer, the PIN is refused or locked, the KEK is absent,
            ambiguous, extractable, not sensitive or may not wrap, or the token
            offers no AES key wrap; nothing is left open then.
    """

    kek_id: str

    def __init__(self, *, module: str, token: str, pin: str, kek: str) -> None:
        if not os.path.isfile(module):
            raise KeyProviderError(
                f"the PKCS#11 module {printable(module)} ({MODULE}) does not exist"
            )
        try:
            lib = pkcs11.lib(module)
        except PKCS11Error as exc:
            raise KeyProviderError(
                f"cannot load or initialise the PKCS#11 module {printable(module)} ({MODULE}): "
                f"{_reason(exc)}; check that the HSM is reachable and its client configured"
            ) from None
        where = f"token {printable(token)!r}"
        try:
            found = lib.get_token(token_label=token)
        except NoSuchToken:
            raise KeyProviderError(f"no {where} ({TOKEN}) in {printable(module)}") from None
        except MultipleObjectsReturned:
            raise KeyProviderError(f"several tokens are labelled {printable(token)!r}") from None
        except PKCS11Error as exc:
            raise KeyProviderError(f"cannot reach {where}: {_reason(exc)}") from None
        try:
            try:
                session = found.open(user_pin=pin)
            except UserAlreadyLoggedIn:
                # Login state is per process and token: another provider of this
                # process is logged in, and a new session shares its login.
                session = found.open()
        except _PIN_ERRORS:
            raise KeyProviderError(f"{where} refused the PIN ({PIN} or {PIN_FILE})") from None
        except PinLocked:
            raise KeyProviderError(f"the user PIN of {where} is locked") from None
        except PKCS11Error as exc:
            raise KeyProviderError(f"cannot open a session on {where}: {_reason(exc)}") from None
        try:
            mechanisms = found.slot.get_mechanisms()
            self._bind(session, token, kek, threading.Lock(), owner=True, mechanisms=mechanisms)
        except BaseException:
            session.close()
            raise

    def _bind(
        self,
        session: Any,
        token: str,
        kek: str,
        lock: threading.Lock,
        *,
        owner: bool,
        mechanisms: Any,
    ) -> None:
        where = f"token {printable(token)!r}"
        try:
            key = session.get_key(
                object_class=ObjectClass.SECRET_KEY, key_type=KeyType.AES, label=kek
            )
        except NoSuchKey:
            raise KeyProviderError(
                f"no AES key labelled {printable(kek)!r} ({KEK}) in {where}"
            ) from None
        except MultipleObjectsReturned:
            raise KeyProviderError(
                f"several keys are labelled {printable(kek)!r} in {where}"
            ) from None
        except PKCS11Error as exc:
            raise KeyProviderError(f"cannot look up the KEK in {where}: {_reason(exc)}") from None
        name = f"KEK {printable(kek)!r} in {where}"
        if key[Attribute.EXTRACTABLE] or not key[Attribute.SENSITIVE]:
            raise KeyProviderError(
                f"{name} is extractable or not sensitive: a KEK must never leave the HSM "
                "(create it with CKA_EXTRACTABLE=false, CKA_SENSITIVE=true)"
            )
        if not key[Attribute.WRAP] or not key[Attribute.UNWRAP]:
            raise KeyProviderError(f"{name} may not wrap and unwrap keys (CKA_WRAP, CKA_UNWRAP)")
        chosen = next((m for m in _MECHANISMS if m in mechanisms), None)
        if chosen is None:
            raise KeyProviderError(
                f"{where} offers neither CKM_AES_KEY_WRAP nor CKM_AES_KEY_WRAP_PAD"
            )
        self._session = session
        self._key = key
        self._lock = lock
        self._owner = owner
        self._mechanisms = mechanisms
        self._mechanism = chosen
        self._token = token
        self._closed = False
        self.kek_id = f"pkcs11:token={token};key={kek}"

    @classmethod
    def from_settings(
        cls,
        settings: Mapping[str, str],
        *,
        module: str | None = None,
        token: str | None = None,
        pin: str | None = None,
        kek: str | None = None,
    ) -> Pkcs11Provider:
        """Open the provider the settings describe; explicit arguments win.

        Raises:
            ConfigurationError: a setting is missing (the message names it), blank,
                or both `TENANTSTORE_PKCS11_PIN` and its `_FILE` are set.
            KeyProviderError: as the constructor.
        """
        module = module or nonblank_setting(settings, MODULE)
        token = token or nonblank_setting(settings, TOKEN)
        kek = kek or nonblank_setting(settings, KEK)
        if pin is None:
            found = file_setting(settings, PIN)
            pin = None if found is None else found[0]
        needed = "needed by TENANTSTORE_KEY_PROVIDER=pkcs11"
        if not module:
            raise ConfigurationError(f"{MODULE} is not set ({needed})")
        if not token:
            raise ConfigurationError(f"{TOKEN} is not set ({needed})")
        if not pin:
            raise ConfigurationError(f"neither {PIN} nor {PIN_FILE} is set ({needed})")
        if not kek:
            raise ConfigurationError(f"{KEK} is not set ({needed})")
        return cls(module=module, token=token, pin=pin, kek=kek)

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        env_file: str | os.PathLike[str] | None = ".env.secrets",
        **explicit: str | None,
    ) -> Pkcs11Provider:
        """`from_settings` over the environment (`os.environ`) and `env_file`."""
        settings = load_settings(environ, [] if env_file is None else [env_file])
        return cls.from_settings(settings, **explicit)

    def __repr__(self) -> str:
        return f"<Pkcs11Provider {self.kek_id}>"

    def with_kek(self, kek: str) -> Pkcs11Provider:
        """Another KEK of the same token, on the same session (for `keys rewrap`).

        Raises:
            KeyProviderError: as the constructor, for the KEK.
        """
        other = object.__new__(Pkcs11Provider)
        other._bind(
            self._session, self._token, kek, self._lock, owner=False, mechanisms=self._mechanisms
        )
        return other

    def wrap(self, data_key: bytes) -> bytes:
        """Wrap `data_key` inside the token under the KEK.

        Raises:
            KeyProviderError: the token refused or does not answer.
        """
        self._check_open()
        with self._lock:
            try:
                temporary = self._session.create_object(
                    {
                        Attribute.CLASS: ObjectClass.SECRET_KEY,
                        Attribute.KEY_TYPE: KeyType.GENERIC_SECRET,
                        Attribute.VALUE: data_key,
                        Attribute.TOKEN: False,
                        Attribute.EXTRACTABLE: True,
                        Attribute.SENSITIVE: False,
                    }
                )
                try:
                    wrapped: bytes = self._key.wrap_key(temporary, mechanism=self._mechanism)
                finally:
                    temporary.destroy()
            except PKCS11Error as exc:
                raise KeyProviderError(
                    f"{self.kek_id} did not wrap the key: {_reason(exc)}"
                ) from None
        return wrapped

    def unwrap(self, wrapped: bytes) -> bytes:
        """Unwrap `wrapped` inside the token and read the data key out.

        Raises:
            KeyProviderError: the KEK did not wrap this blob, or the token refused
                or does not answer.
        """
        self._check_open()
        with self._lock:
            try:
                temporary = self._key.unwrap_key(
                    ObjectClass.SECRET_KEY,
                    KeyType.GENERIC_SECRET,
                    wrapped,
                    mechanism=self._mechanism,
                    store=False,
                    template={Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True},
                )
                try:
                    data_key: bytes = temporary[Attribute.VALUE]
                finally:
                    temporary.destroy()
            except PKCS11Error as exc:
                raise KeyProviderError(f"{self.kek_id} did not unwrap it: {_reason(exc)}") from None
        return data_key

    def close(self) -> None:
        """Close the session (once; a provider from `with_kek` leaves it to its owner)."""
        if self._closed:
            return
        self._closed = True
        if self._owner:
            with self._lock:
                try:
                    self._session.close()
                except PKCS11Error:
                    pass  # the token went away: nothing left to release

    def _check_open(self) -> None:
        if self._closed:
            raise KeyProviderError(f"{self.kek_id}: the provider is closed")
