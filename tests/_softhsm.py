"""A real SoftHSM2 token for the envelope-mode tests (imported by tests/test_keys_*.py).

The token lives in a temporary directory named by `SOFTHSM2_CONF`, which the
PKCS#11 module reads once per process when it initialises: so the token and
its KEKs are made once per test session, and every test uses them on a
database of its own. A machine without SoftHSM2 fails these tests (never
skips them): `.ci/run` installs the Debian package `softhsm2`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pkcs11
import pytest
from pkcs11 import Attribute, KeyType

from tenantstore.keys.pkcs11 import Pkcs11Provider

TOKEN = "tenantstore-test"
PIN = "7153-user-pin"
SO_PIN = "9921-so-pin"
KEK_A = "kek-a"
KEK_B = "kek-b"
KEK_EXTRACTABLE = "kek-extractable"

MODULE_PATHS = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/lib/pkcs11/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/opt/homebrew/lib/softhsm/libsofthsm2.so",
)


def find_module() -> str | None:
    """SoftHSM2's PKCS#11 module: Debian's path first, then other common ones."""
    return next((path for path in MODULE_PATHS if os.path.isfile(path)), None)


@dataclass(frozen=True)
class SoftHsm:
    """The session's token: module path, token label, PIN and conf file."""

    module: str
    token: str
    pin: str
    conf: str

    def provider(self, kek: str = KEK_A) -> Pkcs11Provider:
        return Pkcs11Provider(module=self.module, token=self.token, pin=self.pin, kek=kek)

    def environ(self, kek: str = KEK_A) -> dict[str, str]:
        """The settings of `TENANTSTORE_KEY_PROVIDER=pkcs11` for this token."""
        return {
            "TENANTSTORE_KEY_PROVIDER": "pkcs11",
            "TENANTSTORE_PKCS11_MODULE": self.module,
            "TENANTSTORE_PKCS11_TOKEN": self.token,
            "TENANTSTORE_PKCS11_PIN": self.pin,
            "TENANTSTORE_PKCS11_KEK": kek,
        }


@pytest.fixture(scope="session")
def softhsm() -> Iterator[SoftHsm]:
    """A SoftHSM2 token with two KEKs (non-extractable, sensitive AES-256) and a bad one."""
    util = shutil.which("softhsm2-util")
    module = find_module()
    if util is None or module is None:
        pytest.fail(
            "SoftHSM2 is not installed (softhsm2-util or libsofthsm2.so is missing): install "
            "the Debian package softhsm2 (`apt-get install softhsm2`; .ci/run does this)"
        )
    root = Path(tempfile.mkdtemp(prefix="tenantstore-softhsm-"))
    (root / "tokens").mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    previous = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)  # read by the module and by CLI subprocesses
    try:
        subprocess.run(
            [util, "--init-token", "--free", "--label", TOKEN, "--pin", PIN, "--so-pin", SO_PIN],
            check=True,
            capture_output=True,
            timeout=60,
        )
        token = pkcs11.lib(module).get_token(token_label=TOKEN)
        with token.open(rw=True, user_pin=PIN) as session:
            for label, safe in ((KEK_A, True), (KEK_B, True), (KEK_EXTRACTABLE, False)):
                session.generate_key(
                    KeyType.AES,
                    256,
                    label=label,
                    store=True,
                    template={
                        Attribute.TOKEN: True,
                        Attribute.EXTRACTABLE: not safe,
                        Attribute.SENSITIVE: safe,
                        Attribute.WRAP: True,
                        Attribute.UNWRAP: True,
                    },
                )
        yield SoftHsm(module, TOKEN, PIN, str(conf))
    finally:
        if previous is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = previous
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def kek_a(softhsm: SoftHsm) -> Iterator[Pkcs11Provider]:
    """A provider on KEK A, closed after the test."""
    provider = softhsm.provider(KEK_A)
    try:
        yield provider
    finally:
        provider.close()


@pytest.fixture
def kek_b(softhsm: SoftHsm) -> Iterator[Pkcs11Provider]:
    """A provider on KEK B, closed after the test."""
    provider = softhsm.provider(KEK_B)
    try:
        yield provider
    finally:
        provider.close()
