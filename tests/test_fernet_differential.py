"""Differential tests: tenantstore's batch Fernet against pyca's `Fernet`, on random input.

Random keys, plaintexts (any bytes, invalid UTF-8 included), timestamps (the
whole 64-bit range), batches, and tokens corrupted (a flipped bit anywhere),
truncated or extended: both must give exactly the same result for every
token, key index included. Kept to a few seconds per run.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from tenantstore import KeyRing
from tenantstore._fernet import FernetKey, decrypt_tokens, encrypt_values

FAST = settings(max_examples=120, deadline=None)

raw_keys = st.binary(min_size=32, max_size=32)
plaintexts = st.binary(max_size=80)
timestamps = st.integers(min_value=0, max_value=2**64 - 1)


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode()


def pyca_result(keys: list[str], token: str) -> tuple[str, int] | None:
    """What pyca says: the first key whose `Fernet.decrypt` succeeds, plaintext as UTF-8."""
    for index, key in enumerate(keys):
        try:
            data = Fernet(key).decrypt(token)
        except (InvalidToken, ValueError):
            continue
        try:
            return data.decode("utf-8"), index
        except UnicodeDecodeError:
            return None
    return None


@FAST
@given(raw_keys, plaintexts, timestamps, st.binary(min_size=32, max_size=32))
def test_a_batch_token_is_the_token_pyca_makes_with_the_same_iv(
    raw: bytes, plaintext: bytes, now: int, randomness: bytes
) -> None:
    key = b64(raw)
    [token] = encrypt_values(FernetKey(key), [plaintext], current_time=now, randomness=randomness)
    encryptor = Cipher(algorithms.AES(raw[16:]), modes.ECB()).encryptor()  # noqa: S305 - one block
    iv = encryptor.update(
        bytes(a ^ b for a, b in zip(randomness[:16], randomness[16:], strict=True))
    )
    assert token.encode() == Fernet(key)._encrypt_from_parts(plaintext, now, iv)
    assert Fernet(key).decrypt(token) == plaintext
    assert Fernet(key).extract_timestamp(token) == now


@FAST
@given(raw_keys, st.lists(plaintexts, min_size=1, max_size=6), timestamps)
def test_pyca_decrypts_every_token_of_a_batch_and_the_batch_decrypts_pyca_tokens(
    raw: bytes, values: list[bytes], now: int
) -> None:
    import os

    key = b64(raw)
    tokens = encrypt_values(
        FernetKey(key), values, current_time=now, randomness=os.urandom(16 * (len(values) + 1))
    )
    assert [Fernet(key).decrypt(t) for t in tokens] == values
    assert {Fernet(key).extract_timestamp(t) for t in tokens} == {now}
    theirs = [Fernet(key).encrypt_at_time(v, now).decode() for v in values]
    assert decrypt_tokens([FernetKey(key)], theirs) == [pyca_result([key], t) for t in theirs]


mutations = st.one_of(
    st.tuples(st.just("flip"), st.integers(min_value=0), st.integers(min_value=0, max_value=7)),
    st.tuples(st.just("cut_raw"), st.integers(min_value=0), st.just(0)),
    st.tuples(st.just("cut_text"), st.integers(min_value=0), st.just(0)),
    st.tuples(st.just("append"), st.integers(min_value=1, max_value=40), st.just(0)),
    st.tuples(st.just("resign"), st.integers(min_value=0), st.integers(min_value=0, max_value=7)),
    st.tuples(st.just("none"), st.just(0), st.just(0)),
)


def mutate(token: str, mutation: tuple[str, int, int], extra: bytes, key: str) -> str:
    kind, at, bit = mutation
    raw = bytearray(base64.urlsafe_b64decode(token))
    if kind == "resign":
        # A bit flipped in the time, IV or ciphertext, then signed again with
        # the key: the HMAC passes, so padding and UTF-8 checks decide.
        body = raw[:-32]
        body[1 + at % (len(body) - 1)] ^= 1 << bit
        signing = base64.urlsafe_b64decode(key)[:16]
        return b64(bytes(body) + hmac.new(signing, bytes(body), hashlib.sha256).digest())
    if kind == "flip":
        raw[at % len(raw)] ^= 1 << bit
    elif kind == "cut_raw":
        raw = raw[: at % len(raw)]
    elif kind == "cut_text":
        return token[: at % len(token)]
    elif kind == "append":
        raw += extra[:at]
    return b64(bytes(raw))


@FAST
@given(
    st.lists(raw_keys, min_size=1, max_size=4, unique=True),
    st.integers(min_value=-1, max_value=3),
    plaintexts,
    timestamps,
    mutations,
    st.binary(min_size=40, max_size=40),
)
def test_both_agree_on_corrupted_truncated_and_foreign_tokens_key_index_included(
    raws: list[bytes], maker: int, plaintext: bytes, now: int, mutation: tuple[str, int, int],
    extra: bytes,
) -> None:  # fmt: skip
    keys = [b64(raw) for raw in raws]
    # maker -1 (or past the list): a key outside the ring made the token.
    made_by = keys[maker] if 0 <= maker < len(keys) else Fernet.generate_key().decode()
    token = Fernet(made_by).encrypt_at_time(plaintext, now).decode()
    token = mutate(token, mutation, extra, made_by)
    expected = pyca_result(keys, token)
    assert decrypt_tokens([FernetKey(k) for k in keys], [token]) == [expected]
    assert KeyRing(keys[0], keys[1:], fernet="pyca").decrypt_batch_with_key_index([token]) == [
        expected
    ]
    assert KeyRing(keys[0], keys[1:]).decrypt_batch_with_key_index([token]) == [expected]


@FAST
@given(raw_keys, st.text(max_size=200))
def test_both_agree_on_arbitrary_text_taken_for_a_token(raw: bytes, text: str) -> None:
    key = b64(raw)
    try:
        expected = pyca_result([key], text)
    except (binascii.Error, TypeError):  # pragma: no cover - pyca_result catches these
        expected = None
    assert decrypt_tokens([FernetKey(key)], [text]) == [expected]
    assert KeyRing(key, fernet="pyca").try_decrypt_batch([text]) == [
        None if expected is None else expected[0]
    ]


@FAST
@given(raw_keys, plaintexts, timestamps, st.integers(min_value=0), st.integers(0, 7))
def test_both_agree_when_a_flipped_token_is_signed_again_so_padding_decides(
    raw: bytes, plaintext: bytes, now: int, at: int, bit: int
) -> None:
    """The HMAC passes; a flip in the IV or ciphertext leaves bad padding or bad UTF-8."""
    key = b64(raw)
    token = mutate(
        Fernet(key).encrypt_at_time(plaintext, now).decode(), ("resign", at, bit), b"", key
    )
    expected = pyca_result([key], token)
    assert decrypt_tokens([FernetKey(key)], [token]) == [expected]
    assert KeyRing(key, fernet="pyca").decrypt_batch_with_key_index([token]) == [expected]
