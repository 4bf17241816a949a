"""The Fernet specification's acceptance vectors, run on both implementations.

`tests/data/fernet/*.json` are the spec's files unchanged. tenantstore uses
no TTL (a stored secret does not expire), so the two invalid vectors that are
invalid only because of a TTL are checked as what they are: valid tokens that
pyca rejects with that TTL and that both implementations decrypt without one.
"""

from __future__ import annotations

import base64
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from tenantstore import KeyRing
from tenantstore._fernet import FernetKey, encrypt_values
from tenantstore.encryption import FERNET_IMPLEMENTATIONS

DATA = Path(__file__).parent / "data" / "fernet"
TTL_ONLY = {"far-future TS (unacceptable clock skew)", "expired TTL"}


def vectors(name: str) -> list[dict[str, Any]]:
    loaded: list[dict[str, Any]] = json.loads((DATA / f"{name}.json").read_text())
    return loaded


def seconds(now: str) -> int:
    return int(datetime.fromisoformat(now).timestamp())


@pytest.fixture(params=FERNET_IMPLEMENTATIONS)
def fernet(request: pytest.FixtureRequest) -> str:
    """Each Fernet implementation of KeyRing: `batch` and `pyca`."""
    implementation: str = request.param
    return implementation


def test_the_vector_files_are_present_and_not_empty() -> None:
    assert [len(vectors(n)) for n in ("generate", "verify", "invalid")] == [1, 1, 8]


@pytest.mark.parametrize("vector", vectors("generate"), ids=lambda v: v["src"])
def test_batch_encryption_generates_the_spec_token(vector: dict[str, Any]) -> None:
    """The batch IV is AES(S XOR R): choosing R = 0 and S = AES^-1(IV) pins the spec's IV."""
    key = FernetKey(vector["secret"])
    aes_key = base64.urlsafe_b64decode(vector["secret"])[16:]
    decryptor = Cipher(algorithms.AES(aes_key), modes.ECB()).decryptor()  # noqa: S305 - one block
    seed = decryptor.update(bytes(vector["iv"])) + decryptor.finalize()
    [token] = encrypt_values(
        key,
        [vector["src"].encode()],
        current_time=seconds(vector["now"]),
        randomness=bytes(16) + seed,
    )
    assert token == vector["token"]


@pytest.mark.parametrize("vector", vectors("generate") + vectors("verify"), ids=lambda v: v["src"])
def test_both_implementations_verify_the_spec_tokens(vector: dict[str, Any], fernet: str) -> None:
    ring = KeyRing(vector["secret"], fernet=fernet)  # type: ignore[arg-type]
    assert ring.decrypt_with_key_index(vector["token"]) == (vector["src"], 0)
    assert ring.decrypt_batch([vector["token"]]) == [vector["src"]]


@pytest.mark.parametrize("vector", vectors("invalid"), ids=lambda v: v["desc"])
def test_both_implementations_reject_the_spec_invalid_tokens(
    vector: dict[str, Any], fernet: str
) -> None:
    ring = KeyRing(vector["secret"], fernet=fernet)  # type: ignore[arg-type]
    pyca = Fernet(vector["secret"])
    with pytest.raises(InvalidToken):
        pyca.decrypt_at_time(vector["token"], vector["ttl_sec"], seconds(vector["now"]))
    if vector["desc"] in TTL_ONLY:
        # Invalid only under the vector's TTL, which tenantstore does not use.
        assert ring.try_decrypt_batch([vector["token"]]) == [pyca.decrypt(vector["token"]).decode()]
        return
    assert ring.try_decrypt_batch([vector["token"]]) == [None]
    assert ring.decrypt_batch_with_key_index([vector["token"]]) == [None]
