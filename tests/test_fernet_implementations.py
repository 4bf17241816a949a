"""A representative set of key ring behaviours, run on both Fernet implementations.

`KeyRing(..., fernet="pyca")` (or `TENANTSTORE_FERNET=pyca`) must behave
exactly as the default batch implementation: same tokens for pyca's
`Fernet`, same results, same key index, same errors, and the repository
works on either.
"""

from __future__ import annotations

import base64

import asyncpg
import pytest
from cryptography.fernet import Fernet
from hypothesis import given, settings
from hypothesis import strategies as st

from tenantstore import DecryptionError, EncryptionError, KeyRing, TenantRepository
from tenantstore.encryption import FERNET_IMPLEMENTATIONS, FernetImplementation, is_encrypted
from tenantstore.migrate import upgrade

KEY = "AZUpefU1A9gAFD8DbPlHPYnNg-_50MaKr6ObYFI6YRY="
OLD_KEY = "c2nBHyyXMWAfKx9QDXKR-gOJf3BuH_297mIiATgOp34="
OTHER_KEY = "cw_0x689RpI-jtRR7oE8h_eQsKImvJapLeSbXpwF4e4="


@pytest.fixture(params=FERNET_IMPLEMENTATIONS)
def fernet(request: pytest.FixtureRequest) -> FernetImplementation:
    """Each implementation: `batch` (tenantstore's) and `pyca` (cryptography.fernet)."""
    implementation: FernetImplementation = request.param
    return implementation


@pytest.fixture
def ring(fernet: FernetImplementation) -> KeyRing:
    """KEY as primary, OLD_KEY as previous, on the implementation under test."""
    return KeyRing(KEY, [OLD_KEY], fernet=fernet)


def tampered(token: str) -> str:
    raw = bytearray(base64.urlsafe_b64decode(token))
    raw[30] ^= 1
    return base64.urlsafe_b64encode(bytes(raw)).decode()


def test_the_ring_says_which_implementation_it_runs(ring: KeyRing, fernet: str) -> None:
    assert ring.fernet == fernet


@settings(max_examples=50, deadline=None)
@given(st.text(), st.sampled_from(FERNET_IMPLEMENTATIONS))
def test_round_trip_holds_for_any_text(text: str, fernet: FernetImplementation) -> None:
    ring = KeyRing(KEY, fernet=fernet)
    assert ring.decrypt(ring.encrypt(text)) == text


def test_tokens_interoperate_with_plain_fernet_both_ways(ring: KeyRing) -> None:
    assert Fernet(KEY).decrypt(ring.encrypt("x")) == b"x"
    assert ring.decrypt(Fernet(KEY).encrypt(b"y").decode()) == "y"
    assert ring.encrypt_at_time("z", 499162800).startswith("gAAAAAAdwJ6w")


def test_batches_round_trip_and_pass_none_and_empty_through(ring: KeyRing) -> None:
    values = [None, "", "a", "AIzaSyPlaintext", None]
    tokens = ring.encrypt_batch(values)
    assert tokens[:2] == [None, ""] and tokens[4] is None
    assert all(is_encrypted(t) for t in tokens[2:4])
    assert ring.decrypt_batch(tokens) == values


async def test_async_batches_round_trip(ring: KeyRing) -> None:
    values = [None, "", "a", "b"]
    assert await ring.decrypt_many(await ring.encrypt_many(values)) == values


def test_key_index_rotation_and_a_mixed_batch(ring: KeyRing) -> None:
    old = KeyRing(OLD_KEY).encrypt("old")
    good = ring.encrypt_batch([f"v{i}" for i in range(4)])
    foreign = KeyRing(OTHER_KEY).encrypt("foreign")
    assert ring.decrypt_with_key_index(old) == ("old", 1)
    assert ring.needs_rotation(old) and not ring.needs_rotation(good[0])
    assert ring.decrypt_with_key_index(ring.rotate(old)) == ("old", 0)
    mixed = [good[0], tampered(good[1]), old, foreign, "junk", good[2]]
    assert ring.try_decrypt_batch(mixed) == ["v0", None, "old", None, None, "v2"]
    assert ring.decrypt_batch_with_key_index([old, good[3], foreign]) == [
        ("old", 1),
        ("v3", 0),
        None,
    ]


def test_failures_raise_the_same_errors_with_the_same_messages(ring: KeyRing) -> None:
    with pytest.raises(DecryptionError, match=r"^Invalid encrypted data or wrong encryption key$"):
        ring.decrypt(KeyRing(OTHER_KEY).encrypt("x"))
    with pytest.raises(DecryptionError):
        ring.decrypt_batch([ring.encrypt("ok"), "garbage"])
    with pytest.raises(EncryptionError) as info:
        ring.encrypt("lone \ud800 surrogate")
    assert "\ud800" not in str(info.value) and info.value.__context__ is None
    with pytest.raises(TypeError):
        ring.decrypt(b"bytes")  # type: ignore[arg-type]


def test_a_token_with_valid_hmac_but_bad_padding_is_rejected(ring: KeyRing) -> None:
    """The spec's 'payload padding error' vector, under the ring's primary key."""
    vector = (
        "gAAAAAAdwJ6xAAECAwQFBgcICQoLDA0ODz4LEpdELGQAad7aNEHbf-JkLPIpuiYRLQ3RtXatOYREu2FWke6C"
        "nJNYIbkuKNqOhw=="
    )
    padded = KeyRing(OTHER_KEY, fernet=ring.fernet)
    assert padded.try_decrypt_batch([vector]) == [None]


async def test_the_repository_works_on_either_implementation(
    pool: asyncpg.Pool, ring: KeyRing
) -> None:
    await upgrade(pool, ring)
    repo = TenantRepository(pool, ring)
    await repo.create_tenant("acme", "Acme", gemini_api_key="AIza-one", oauth_access_token="tok")
    tenant = await repo.get_tenant("acme")
    assert tenant.gemini_api_key is not None
    assert tenant.gemini_api_key.get_secret_value() == "AIza-one"
    stored = await pool.fetchval("SELECT gemini_api_key FROM tenants WHERE tenant_id = 'acme'")
    assert Fernet(KEY).decrypt(stored) == b"AIza-one"
