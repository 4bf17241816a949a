"""The key ring: Fernet round trips, rotation, configuration and the token detector."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import string
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import cryptography.fernet
import pytest
from cryptography.fernet import Fernet
from hypothesis import given
from hypothesis import strategies as st

from tenantstore import (
    ConfigurationError,
    DecryptionError,
    EmptySettingError,
    EncryptionError,
    EncryptionKeyMissingError,
    InvalidEncryptionKeyError,
    KeyRing,
    TenantStoreError,
)
from tenantstore.encryption import (
    decrypt_api_key,
    encrypt_api_key,
    generate_encryption_key,
    is_encrypted,
    key_id,
)

DECRYPTION_MESSAGE = "Invalid encrypted data or wrong encryption key"

# Fixed keys so hypothesis examples and the secret-leak checks are reproducible.
KEY = "AZUpefU1A9gAFD8DbPlHPYnNg-_50MaKr6ObYFI6YRY="
OTHER_KEY = "c2nBHyyXMWAfKx9QDXKR-gOJf3BuH_297mIiATgOp34="
PLAINTEXT = "AIzaSyKnownPlaintextSecretValue0123456789"

# pyca/cryptography's tests/fernet/generate.json vector.
VECTOR_SECRET = "cw_0x689RpI-jtRR7oE8h_eQsKImvJapLeSbXpwF4e4="
VECTOR_NOW = 499162800  # 1985-10-26T01:20:00-07:00
VECTOR_IV = bytes(range(16))
VECTOR_SRC = "hello"
VECTOR_TOKEN = (
    "gAAAAAAdwJ6wAAECAwQFBgcICQoLDA0ODy021cpGVWKZ_eEwCGM4BLLF_5CV9dOPmrhuVUPgJobwOz7J"
    "cbmrR64jVmpU4IwqDA=="
)

URLSAFE = string.ascii_letters + string.digits + "-_"
FERNET_OVERHEAD = 1 + 8 + 16 + 32


def raw_token(token: str) -> bytes:
    return base64.urlsafe_b64decode(token)


# -- round trips -------------------------------------------------------------


def test_encrypt_then_decrypt_returns_the_plaintext(keyring: KeyRing) -> None:
    token = keyring.encrypt(PLAINTEXT)
    assert token != PLAINTEXT
    assert keyring.decrypt(token) == PLAINTEXT


def test_encrypt_makes_a_fresh_token_each_time(keyring: KeyRing) -> None:
    assert keyring.encrypt(PLAINTEXT) != keyring.encrypt(PLAINTEXT)


@given(st.text())
def test_round_trip_holds_for_any_text(text: str) -> None:
    keyring = KeyRing(KEY)
    assert keyring.decrypt(keyring.encrypt(text)) == text


def test_batches_round_trip_and_pass_none_and_empty_through(keyring: KeyRing) -> None:
    values = [None, "", "a", PLAINTEXT, None]
    tokens = keyring.encrypt_batch(values)
    assert tokens[0] is None
    assert tokens[1] == ""
    assert tokens[4] is None
    assert all(is_encrypted(t) for t in tokens[2:4])
    assert keyring.decrypt_batch(tokens) == values


async def test_async_batches_round_trip_and_pass_none_and_empty_through(
    keyring: KeyRing,
) -> None:
    values = [None, "", "a", PLAINTEXT]
    tokens = await keyring.encrypt_many(values)
    assert tokens[:2] == [None, ""]
    assert all(is_encrypted(t) for t in tokens[2:])
    assert await keyring.decrypt_many(tokens) == values


def test_decrypt_batch_raises_on_any_bad_token(keyring: KeyRing) -> None:
    with pytest.raises(DecryptionError):
        keyring.decrypt_batch([keyring.encrypt("ok"), "garbage"])


async def test_decrypt_many_raises_on_any_bad_token(keyring: KeyRing) -> None:
    with pytest.raises(DecryptionError):
        await keyring.decrypt_many([keyring.encrypt("ok"), "garbage"])


def test_try_decrypt_batch_gives_none_for_each_undecryptable_token(keyring: KeyRing) -> None:
    other = KeyRing(OTHER_KEY)
    tokens = [keyring.encrypt("a"), "garbage", other.encrypt("b"), keyring.encrypt("c")]
    assert keyring.try_decrypt_batch(tokens) == ["a", None, None, "c"]


# -- async methods run in a worker thread ------------------------------------


@pytest.fixture
def batch_threads(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Record the thread each KeyRing batch method runs in."""
    seen: dict[str, int] = {}

    def spy(name: str) -> Callable[..., list[str | None]]:
        original = getattr(KeyRing, name)

        def wrapper(self: KeyRing, values: list[str | None]) -> list[str | None]:
            seen[name] = threading.get_ident()
            result: list[str | None] = original(self, values)
            return result

        return wrapper

    for name in ("encrypt_batch", "decrypt_batch"):
        monkeypatch.setattr(KeyRing, name, spy(name))
    return seen


async def test_encrypt_many_and_decrypt_many_run_off_the_event_loop_thread(
    keyring: KeyRing, batch_threads: dict[str, int]
) -> None:
    loop_thread = threading.get_ident()
    assert asyncio.get_running_loop().is_running()
    tokens = await keyring.encrypt_many(["a", "b"])
    assert await keyring.decrypt_many(tokens) == ["a", "b"]
    assert set(batch_threads) == {"encrypt_batch", "decrypt_batch"}
    assert batch_threads["encrypt_batch"] != loop_thread
    assert batch_threads["decrypt_batch"] != loop_thread


# -- module functions ----------------------------------------------------------


@pytest.mark.parametrize("value", [None, ""])
def test_module_functions_pass_none_and_empty_through(
    monkeypatch: pytest.MonkeyPatch, key: str, value: str | None
) -> None:
    monkeypatch.setenv("ENCRYPTION_KEY", key)
    assert encrypt_api_key(value) == value
    assert type(encrypt_api_key(value)) is type(value)
    assert decrypt_api_key(value) == value
    assert type(decrypt_api_key(value)) is type(value)


def test_module_functions_round_trip_with_the_environment_key(
    monkeypatch: pytest.MonkeyPatch, key: str
) -> None:
    monkeypatch.setenv("ENCRYPTION_KEY", key)
    token = encrypt_api_key(PLAINTEXT)
    assert token is not None
    assert is_encrypted(token)
    assert KeyRing(key).decrypt(token) == PLAINTEXT
    assert decrypt_api_key(token) == PLAINTEXT


def test_module_encrypt_fails_closed_without_a_key() -> None:
    with pytest.raises(EncryptionKeyMissingError):
        encrypt_api_key(PLAINTEXT)


def test_module_decrypt_with_another_key_raises_decryption_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ENCRYPTION_KEY", KEY)
    with pytest.raises(DecryptionError, match=f"^{DECRYPTION_MESSAGE}$"):
        decrypt_api_key(KeyRing(OTHER_KEY).encrypt(PLAINTEXT))


# -- invalid tokens ------------------------------------------------------------


def _tampered(token: str) -> str:
    middle = len(token) // 2
    replacement = "A" if token[middle] != "A" else "B"
    return token[:middle] + replacement + token[middle + 1 :]


@pytest.mark.parametrize(
    "make_token",
    [
        pytest.param(lambda ring: "not a token", id="plain-text"),
        pytest.param(lambda ring: "", id="empty"),
        pytest.param(lambda ring: PLAINTEXT, id="api-key"),
        pytest.param(lambda ring: ring.encrypt(PLAINTEXT)[:-8], id="truncated"),
        pytest.param(lambda ring: _tampered(ring.encrypt(PLAINTEXT)), id="tampered"),
        pytest.param(lambda ring: "gAAAAAé" * 20, id="non-ascii"),
        pytest.param(
            lambda ring: Fernet(KEY).encrypt(b"\xff\xfe").decode(), id="plaintext-not-utf8"
        ),
    ],
)
def test_invalid_data_raises_decryption_error_with_the_fixed_message(
    make_token: Callable[[KeyRing], str],
) -> None:
    keyring = KeyRing(KEY)
    token = make_token(keyring)
    with pytest.raises(DecryptionError) as info:
        keyring.decrypt(token)
    assert str(info.value) == DECRYPTION_MESSAGE
    with pytest.raises(DecryptionError) as info:
        keyring.key_index(token)
    assert str(info.value) == DECRYPTION_MESSAGE


def test_wrong_key_raises_decryption_error_with_the_fixed_message() -> None:
    token = KeyRing(OTHER_KEY).encrypt(PLAINTEXT)
    with pytest.raises(DecryptionError) as info:
        KeyRing(KEY).decrypt(token)
    assert str(info.value) == DECRYPTION_MESSAGE
    assert isinstance(info.value, TenantStoreError)


# -- previous keys and rotation ----------------------------------------------


def test_previous_key_decrypts_and_rotate_moves_the_token_to_the_primary(
    key: str, old_key: str
) -> None:
    old_token = KeyRing(old_key).encrypt(PLAINTEXT)
    keyring = KeyRing(key, [old_key])
    assert keyring.decrypt(old_token) == PLAINTEXT
    assert keyring.key_index(old_token) == 1
    assert keyring.needs_rotation(old_token) is True

    new_token = keyring.rotate(old_token)
    assert new_token != old_token
    assert keyring.key_index(new_token) == 0
    assert keyring.needs_rotation(new_token) is False
    assert KeyRing(key).decrypt(new_token) == PLAINTEXT
    with pytest.raises(DecryptionError):
        KeyRing(old_key).decrypt(new_token)


def test_key_index_counts_previous_keys_in_order(key: str, old_key: str) -> None:
    oldest = generate_encryption_key()
    keyring = KeyRing(key, [old_key, oldest])
    assert keyring.previous_count == 2
    assert keyring.key_index(keyring.encrypt("x")) == 0
    assert keyring.key_index(KeyRing(old_key).encrypt("x")) == 1
    assert keyring.key_index(KeyRing(oldest).encrypt("x")) == 2
    assert keyring.decrypt_with_key_index(KeyRing(oldest).encrypt("x")) == ("x", 2)


def test_a_single_previous_key_may_be_given_as_a_string(key: str, old_key: str) -> None:
    keyring = KeyRing(key, old_key)
    assert keyring.previous_count == 1
    assert keyring.decrypt(KeyRing(old_key).encrypt("x")) == "x"


def test_rotate_and_needs_rotation_reject_a_token_no_key_decrypts(key: str) -> None:
    foreign = KeyRing(OTHER_KEY).encrypt("x")
    keyring = KeyRing(key)
    with pytest.raises(DecryptionError):
        keyring.rotate(foreign)
    with pytest.raises(DecryptionError):
        keyring.needs_rotation(foreign)


def test_new_tokens_are_made_with_the_primary_not_a_previous_key(key: str, old_key: str) -> None:
    token = KeyRing(key, [old_key]).encrypt("x")
    assert KeyRing(key).decrypt(token) == "x"
    with pytest.raises(DecryptionError):
        KeyRing(old_key).decrypt(token)


# -- from_env --------------------------------------------------------------------


def test_from_env_without_encryption_key_raises_missing_error() -> None:
    with pytest.raises(EncryptionKeyMissingError) as info:
        KeyRing.from_env()
    assert "ENCRYPTION_KEY environment variable not set" in str(info.value)
    assert info.value.setting == "ENCRYPTION_KEY"


def test_from_env_refuses_a_blank_encryption_key_naming_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Blank is a mistake to fix (exit 2), never "not set" (which some commands tolerate)."""
    monkeypatch.setenv("ENCRYPTION_KEY", "   ")
    with pytest.raises(EmptySettingError, match="ENCRYPTION_KEY is set but empty") as info:
        KeyRing.from_env()
    assert not isinstance(info.value, EncryptionKeyMissingError)


def test_from_env_with_only_old_keys_still_raises_missing_error(
    monkeypatch: pytest.MonkeyPatch, old_key: str
) -> None:
    monkeypatch.setenv("OLD_ENCRYPTION_KEY", old_key)
    with pytest.raises(EncryptionKeyMissingError):
        KeyRing.from_env()


@pytest.mark.parametrize("old_count", [0, 1, 2])
def test_from_env_reads_comma_separated_old_keys(
    monkeypatch: pytest.MonkeyPatch, key: str, old_count: int
) -> None:
    olds = [generate_encryption_key() for _ in range(old_count)]
    monkeypatch.setenv("ENCRYPTION_KEY", key)
    if olds:
        monkeypatch.setenv("OLD_ENCRYPTION_KEY", " , ".join(olds))
    keyring = KeyRing.from_env()
    assert keyring.previous_count == old_count
    assert KeyRing(key).decrypt(keyring.encrypt("x")) == "x"
    for index, old in enumerate(olds, start=1):
        assert keyring.key_index(KeyRing(old).encrypt("x")) == index


def test_from_env_refuses_an_empty_old_encryption_key(
    monkeypatch: pytest.MonkeyPatch, key: str
) -> None:
    """`export OLD_ENCRYPTION_KEY="$ENCRYPTION_KEY"` with an empty shell variable."""
    monkeypatch.setenv("ENCRYPTION_KEY", key)
    monkeypatch.setenv("OLD_ENCRYPTION_KEY", "")
    with pytest.raises(EmptySettingError, match="OLD_ENCRYPTION_KEY is set but empty"):
        KeyRing.from_env()


@pytest.mark.parametrize(
    "value", [pytest.param(b"AIza", id="bytes"), pytest.param(bytearray(b"AIza"), id="bytearray"),
              pytest.param(None, id="none"), pytest.param(42, id="int")],
)  # fmt: skip
def test_non_str_values_are_rejected_with_type_error(value: object) -> None:
    """The documented types are str (and None for the seed functions); the rest is a TypeError."""
    ring = KeyRing(KEY)
    with pytest.raises(TypeError):
        ring.encrypt(value)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ring.decrypt(value)  # type: ignore[arg-type]
    if value is not None:
        with pytest.raises(TypeError):
            ring.encrypt_batch([value])  # type: ignore[list-item]
        with pytest.raises(TypeError):
            ring.decrypt_batch([value])  # type: ignore[list-item]


def test_key_ids_name_keys_stably_without_revealing_them(key: str, old_key: str) -> None:
    ring = KeyRing(key, [old_key])
    assert ring.key_ids == (key_id(key), key_id(old_key)) and ring.primary_key_id == key_id(key)
    assert len(key_id(key)) == 12 and all(c in "0123456789abcdef" for c in key_id(key))
    assert key_id(key) != key_id(old_key) and key_id(key) == KeyRing(key).primary_key_id
    assert key_id(key) not in key and key_id(key) in repr(ring) and key not in repr(ring)


def test_keyring_is_encrypted_is_the_structural_check(key: str) -> None:
    ring = KeyRing(key)
    assert KeyRing.is_encrypted(ring.encrypt("x")) and not ring.is_encrypted("AIza-plain")


def test_from_env_process_environment_wins_over_env_secrets_file(
    monkeypatch: pytest.MonkeyPatch, key: str, old_key: str
) -> None:
    Path(".env.secrets").write_text(f"ENCRYPTION_KEY={old_key}\n")
    monkeypatch.setenv("ENCRYPTION_KEY", key)
    keyring = KeyRing.from_env()
    assert KeyRing(key).decrypt(keyring.encrypt("x")) == "x"
    with pytest.raises(DecryptionError):
        KeyRing(old_key).decrypt(keyring.encrypt("x"))


def test_from_env_reads_the_env_secrets_file_alone(key: str, old_key: str) -> None:
    Path(".env.secrets").write_text(
        f"# keys\nexport ENCRYPTION_KEY={key}\nOLD_ENCRYPTION_KEY='{old_key}'\n"
    )
    keyring = KeyRing.from_env()
    assert keyring.previous_count == 1
    assert KeyRing(key).decrypt(keyring.encrypt("x")) == "x"
    assert keyring.key_index(KeyRing(old_key).encrypt("x")) == 1


def test_from_env_uses_the_explicit_mapping_not_os_environ(
    monkeypatch: pytest.MonkeyPatch, key: str, old_key: str
) -> None:
    monkeypatch.setenv("ENCRYPTION_KEY", old_key)
    keyring = KeyRing.from_env({"ENCRYPTION_KEY": key}, env_file=None)
    assert KeyRing(key).decrypt(keyring.encrypt("x")) == "x"


def test_from_env_with_env_file_none_ignores_env_secrets(key: str) -> None:
    Path(".env.secrets").write_text(f"ENCRYPTION_KEY={key}\n")
    with pytest.raises(EncryptionKeyMissingError):
        KeyRing.from_env(env_file=None)


# -- malformed keys ------------------------------------------------------------

MALFORMED_KEYS = [
    pytest.param(KEY[:-1], id="truncated"),
    pytest.param(KEY + "A", id="too-long"),
    pytest.param(KEY[:-2] + "!=", id="bad-character"),
    pytest.param(KEY.replace("_", "/").replace("-", "+"), id="standard-base64"),
    pytest.param(base64.urlsafe_b64encode(b"k" * 31).decode().ljust(44, "A"), id="31-bytes"),
    pytest.param("not-a-key", id="short"),
]


@pytest.mark.parametrize("bad", MALFORMED_KEYS)
def test_malformed_primary_key_names_encryption_key_not_the_key(bad: str) -> None:
    with pytest.raises(InvalidEncryptionKeyError) as info:
        KeyRing(bad)
    message = str(info.value)
    assert message.startswith("ENCRYPTION_KEY ")
    assert info.value.setting == "ENCRYPTION_KEY"
    assert bad not in message
    assert bad[:40] not in message


@pytest.mark.parametrize("bad", MALFORMED_KEYS)
def test_malformed_previous_key_names_its_index_not_the_key(bad: str) -> None:
    with pytest.raises(InvalidEncryptionKeyError) as info:
        KeyRing(OTHER_KEY, [generate_encryption_key(), bad])
    assert info.value.setting == "OLD_ENCRYPTION_KEY[1]"
    assert "OLD_ENCRYPTION_KEY[1]" in str(info.value)
    assert bad[:40] not in str(info.value)


def test_from_env_malformed_old_key_names_its_index(
    monkeypatch: pytest.MonkeyPatch, key: str
) -> None:
    monkeypatch.setenv("ENCRYPTION_KEY", key)
    monkeypatch.setenv("OLD_ENCRYPTION_KEY", f"{generate_encryption_key()},{KEY[:-1]}")
    with pytest.raises(InvalidEncryptionKeyError, match=r"^OLD_ENCRYPTION_KEY\[1\] "):
        KeyRing.from_env()


def test_from_env_malformed_primary_key_in_file_names_encryption_key() -> None:
    Path(".env.secrets").write_text(f"ENCRYPTION_KEY={KEY[:-1]}\n")
    with pytest.raises(InvalidEncryptionKeyError, match=r"^ENCRYPTION_KEY ") as info:
        KeyRing.from_env()
    assert KEY[:-1] not in str(info.value)


@pytest.mark.parametrize("bad", [None, b"bytes-key", 42])
def test_non_string_key_raises_invalid_key_error(bad: object) -> None:
    with pytest.raises(InvalidEncryptionKeyError):
        KeyRing(bad)  # type: ignore[arg-type]


def test_surrounding_whitespace_around_a_key_is_ignored(key: str) -> None:
    keyring = KeyRing(f"  {key}\n")
    assert KeyRing(key).decrypt(keyring.encrypt("x")) == "x"


def test_repr_hides_every_key(key: str, old_key: str) -> None:
    text = repr(KeyRing(key, [old_key]))
    assert key not in text
    assert old_key not in text
    assert key[:20] not in text
    assert "previous=1" in text


# -- no secret in any error text -------------------------------------------------


def _fernet_token(plaintext: bytes) -> str:
    return Fernet(KEY).encrypt(plaintext).decode()


def _write_secrets_file(text: str) -> Callable[[], object]:
    def run() -> object:
        Path(".env.secrets").write_text(text)
        return KeyRing.from_env()

    return run


def _write_secrets_bytes(text: str) -> Callable[[], object]:
    def run() -> object:
        Path(".env.secrets").write_bytes(text.encode("latin-1"))
        return KeyRing.from_env()

    return run


def _with_env(**values: str) -> Callable[[], object]:
    def run() -> object:
        return KeyRing.from_env(values, env_file=None)

    return run


ERROR_PATHS = [
    pytest.param(lambda: KeyRing(KEY[:-1]), id="primary-truncated"),
    pytest.param(lambda: KeyRing(KEY + "x"), id="primary-too-long"),
    pytest.param(lambda: KeyRing(KEY[:-2] + "!="), id="primary-bad-char"),
    pytest.param(lambda: KeyRing(OTHER_KEY, [KEY[:-1]]), id="previous-malformed"),
    pytest.param(_with_env(ENCRYPTION_KEY=KEY[:-1]), id="env-primary"),
    pytest.param(
        _with_env(ENCRYPTION_KEY=OTHER_KEY, OLD_ENCRYPTION_KEY=f"{OTHER_KEY},{KEY}x"),
        id="env-old",
    ),
    pytest.param(_with_env(OLD_ENCRYPTION_KEY=KEY), id="env-missing-primary"),
    pytest.param(_write_secrets_file(f"ENCRYPTION_KEY={KEY}x\n"), id="file-malformed-key"),
    pytest.param(_write_secrets_file(f"ENCRYPTION_KEY {KEY}\n"), id="file-malformed-line"),
    pytest.param(_write_secrets_file(f"ENCRYPTION_KEY: {KEY}\n"), id="file-colon-line"),
    pytest.param(_write_secrets_bytes(f"ENCRYPTION_KEY={KEY}\nA=\xff\n"), id="file-not-utf8"),
    pytest.param(lambda: KeyRing(OTHER_KEY).decrypt(_fernet_token(PLAINTEXT.encode())), id="wrong"),
    pytest.param(lambda: KeyRing(KEY).decrypt(PLAINTEXT), id="decrypt-plaintext"),
    pytest.param(lambda: KeyRing(KEY).decrypt(PLAINTEXT + "é"), id="decrypt-non-ascii"),
    pytest.param(
        lambda: KeyRing(KEY).decrypt(_fernet_token(PLAINTEXT.encode() + b"\xff")),
        id="decrypt-not-utf8",
    ),
    pytest.param(
        lambda: KeyRing(KEY).decrypt(_tampered(_fernet_token(PLAINTEXT.encode()))),
        id="decrypt-tampered",
    ),
    pytest.param(
        lambda: KeyRing(OTHER_KEY).key_index(_fernet_token(PLAINTEXT.encode())), id="key-index"
    ),
    pytest.param(lambda: KeyRing(OTHER_KEY).rotate(_fernet_token(PLAINTEXT.encode())), id="rotate"),
    pytest.param(
        lambda: KeyRing(OTHER_KEY).decrypt_batch([_fernet_token(PLAINTEXT.encode())]),
        id="decrypt-batch",
    ),
    pytest.param(lambda: KeyRing(KEY).encrypt(PLAINTEXT + "\ud800"), id="encrypt-surrogate"),
    pytest.param(
        lambda: KeyRing(KEY).encrypt_batch([PLAINTEXT, PLAINTEXT + "\ud800"]),
        id="encrypt-batch-surrogate",
    ),
    pytest.param(
        lambda: KeyRing(KEY).encrypt_at_time(PLAINTEXT + "\udfff", 0), id="encrypt-at-time"
    ),
]


def _error_texts(exc: BaseException) -> Iterator[str]:
    yield str(exc)
    yield repr(exc)
    seen = {id(exc)}
    chained = exc.__cause__ or exc.__context__
    while chained is not None and id(chained) not in seen:
        seen.add(id(chained))
        yield str(chained)
        chained = chained.__cause__ or chained.__context__


@pytest.mark.parametrize("trigger", ERROR_PATHS)
def test_no_key_or_plaintext_appears_in_any_error_text(trigger: Callable[[], object]) -> None:
    with pytest.raises(TenantStoreError) as info:
        trigger()
    for text in _error_texts(info.value):
        assert KEY[2:40] not in text
        assert PLAINTEXT[4:] not in text


def test_module_decrypt_error_shows_neither_key_nor_plaintext(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ENCRYPTION_KEY", OTHER_KEY)
    with pytest.raises(DecryptionError) as info:
        decrypt_api_key(_fernet_token(PLAINTEXT.encode()))
    for text in _error_texts(info.value):
        assert KEY[2:40] not in text
        assert OTHER_KEY[2:40] not in text
        assert PLAINTEXT[4:] not in text


def test_unencodable_plaintext_raises_encryption_error_without_echoing_it() -> None:
    for encrypt in (KeyRing(KEY).encrypt, lambda v: KeyRing(KEY).encrypt_batch(["ok", v])):
        with pytest.raises(EncryptionError) as info:
            encrypt(PLAINTEXT + "\ud800")
        assert isinstance(info.value, ValueError)
        for text in _error_texts(info.value):
            assert PLAINTEXT[4:] not in text


def test_non_utf8_env_secrets_file_raises_configuration_error() -> None:
    Path(".env.secrets").write_bytes(f"ENCRYPTION_KEY={KEY}\nNOTE=caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigurationError, match=r"\.env\.secrets"):
        KeyRing.from_env()


# -- is_encrypted ----------------------------------------------------------------


@given(st.text())
def test_every_token_from_encrypt_is_detected_as_encrypted(text: str) -> None:
    assert is_encrypted(KeyRing(KEY).encrypt(text))


@given(st.text(alphabet=URLSAFE, min_size=35, max_size=35))
def test_plain_api_keys_are_never_detected_as_encrypted(tail: str) -> None:
    assert not is_encrypted("AIza" + tail)


def _looks_like_fernet(value: str) -> bool:
    try:
        raw = base64.urlsafe_b64decode(value.encode("ascii"))
    except ValueError:
        return False
    body = len(raw) - FERNET_OVERHEAD
    return len(raw) > 0 and raw[0] == 0x80 and body >= 16 and body % 16 == 0


@given(st.text())
def test_arbitrary_text_is_only_taken_for_a_token_when_it_decodes_like_one(text: str) -> None:
    if is_encrypted(text):
        assert _looks_like_fernet(text)


@st.composite
def token_shaped_bytes(draw: st.DrawFn) -> bytes:
    """Bytes near Fernet's shape: some version byte, lengths on and just off the rule."""
    head = draw(st.sampled_from([b"\x80", b"\x81", b"\x00", b"\xff", b"\x08"]))
    blocks = draw(st.integers(min_value=0, max_value=8))
    skew = draw(st.sampled_from([0, 0, 0, 1, -1, 8, -16]))
    size = max(0, FERNET_OVERHEAD - 1 + 16 * blocks + skew)
    return head + draw(st.binary(min_size=size, max_size=size))


@given(token_shaped_bytes())
def test_is_encrypted_is_exactly_version_byte_and_fernet_length(raw: bytes) -> None:
    """Base64 of arbitrary bytes is a token iff it starts 0x80 and has a Fernet length."""
    body = len(raw) - FERNET_OVERHEAD
    expected = raw[0] == 0x80 and body >= 16 and body % 16 == 0
    assert is_encrypted(base64.urlsafe_b64encode(raw).decode()) is expected


@pytest.mark.parametrize(
    "value",
    [
        None,
        b"gAAAAA",
        42,
        "",
        "AIzaSyA-short",
        "gAAAAA" + "A" * 94,  # 100 chars of base64 but not a valid Fernet length
    ],
)
def test_non_tokens_are_not_encrypted(value: object) -> None:
    assert is_encrypted(value) is False


def test_a_token_with_standard_base64_characters_is_not_encrypted(keyring: KeyRing) -> None:
    token = next(t for t in (keyring.encrypt(str(i)) for i in range(1000)) if "-" in t or "_" in t)
    assert not is_encrypted(token.replace("-", "+").replace("_", "/"))


# -- interoperability with plain Fernet and a fixed vector -------------------------


def test_plain_fernet_decrypts_a_keyring_token(key: str) -> None:
    token = KeyRing(key).encrypt(PLAINTEXT)
    assert Fernet(key.encode()).decrypt(token.encode()) == PLAINTEXT.encode()


def test_keyring_decrypts_a_plain_fernet_token(key: str) -> None:
    token = Fernet(key.encode()).encrypt(PLAINTEXT.encode()).decode()
    assert is_encrypted(token)
    assert KeyRing(key).decrypt(token) == PLAINTEXT


def test_keyring_decrypts_the_pyca_fernet_vector() -> None:
    assert is_encrypted(VECTOR_TOKEN)
    assert KeyRing(VECTOR_SECRET).decrypt(VECTOR_TOKEN) == VECTOR_SRC


def test_pinned_clock_token_carries_the_pinned_time_and_decrypts_with_fernet() -> None:
    token = KeyRing(VECTOR_SECRET).encrypt_at_time(VECTOR_SRC, VECTOR_NOW)
    raw = raw_token(token)
    assert raw[0] == 0x80
    assert raw[1:9] == VECTOR_NOW.to_bytes(8, "big")
    fernet = Fernet(VECTOR_SECRET)
    assert fernet.extract_timestamp(token.encode()) == VECTOR_NOW
    assert fernet.decrypt(token.encode()) == VECTOR_SRC.encode()


@given(st.lists(st.text(max_size=70), max_size=20))
def test_plain_fernet_decrypts_every_token_of_a_batch(values: list[str]) -> None:
    """Batch encryption makes standard tokens for every length, block boundaries included."""
    tokens = KeyRing(KEY).encrypt_batch(values)
    fernet = Fernet(KEY)
    assert len(tokens) == len(values)
    for value, token in zip(values, tokens, strict=True):
        if value:
            assert fernet.decrypt(token.encode()) == value.encode()
        else:
            assert token == value


@given(st.lists(st.binary(max_size=70).filter(bool), max_size=20))
def test_batch_decrypts_plain_fernet_tokens_of_every_length(values: list[bytes]) -> None:
    fernet = Fernet(KEY)
    texts = [v.decode("latin-1") for v in values]
    tokens = [fernet.encrypt(t.encode()).decode() for t in texts]
    assert KeyRing(KEY).decrypt_batch(tokens) == texts
    assert KeyRing(OTHER_KEY, [KEY]).try_decrypt_batch(tokens) == texts


def test_batch_tokens_have_distinct_ivs_even_for_equal_plaintexts(keyring: KeyRing) -> None:
    tokens = keyring.encrypt_batch(["same"] * 64)
    assert len(set(tokens)) == 64
    assert len({raw_token(t)[9:25] for t in tokens}) == 64
    assert len({raw_token(t)[25:-32] for t in tokens}) == 64


def test_one_bad_token_does_not_disturb_the_rest_of_a_batch(key: str, old_key: str) -> None:
    keyring = KeyRing(key, [old_key])
    good = keyring.encrypt_batch([f"value-{i}" for i in range(10)])
    old = KeyRing(old_key).encrypt("old")
    foreign = KeyRing(OTHER_KEY).encrypt("foreign")
    mixed = [good[0], _tampered(good[1]), old, foreign, "junk", *good[2:]]
    assert keyring.try_decrypt_batch(mixed) == [
        "value-0",
        None,
        "old",
        None,
        None,
        *[f"value-{i}" for i in range(2, 10)],
    ]
    assert keyring.decrypt_batch_with_key_index([old, good[3], foreign]) == [
        ("old", 1),
        ("value-3", 0),
        None,
    ]


def test_a_token_padded_wrongly_under_a_valid_hmac_is_rejected() -> None:
    """A token whose HMAC is valid but whose CBC padding is not must not decrypt.

    A fixed key: the junk block decrypts to random bytes, which under about one
    random key in 256 end in a valid padding byte.
    """
    key = KEY
    raw_key = base64.urlsafe_b64decode(key)
    body = b"\x80" + (0).to_bytes(8, "big") + bytes(16) + bytes(16)  # junk ciphertext block
    token = base64.urlsafe_b64encode(
        body + hmac.new(raw_key[:16], body, hashlib.sha256).digest()
    ).decode()
    with pytest.raises(cryptography.fernet.InvalidToken):
        Fernet(key).decrypt(token)
    with pytest.raises(DecryptionError):
        KeyRing(key).decrypt(token)
    assert KeyRing(key).try_decrypt_batch([token, KeyRing(key).encrypt("ok")]) == [None, "ok"]


# -- key generation ----------------------------------------------------------------


def test_generate_encryption_key_gives_44_urlsafe_chars_usable_by_keyring() -> None:
    key = generate_encryption_key()
    assert len(key) == 44
    assert set(key[:-1]) <= set(URLSAFE)
    assert key.endswith("=")
    assert len(base64.urlsafe_b64decode(key)) == 32
    keyring = KeyRing(key)
    assert keyring.decrypt(keyring.encrypt("x")) == "x"


def test_generate_encryption_key_gives_a_new_key_each_time() -> None:
    assert generate_encryption_key() != generate_encryption_key()


def test_keys_are_tried_most_used_first_without_changing_results() -> None:
    """With most tokens under an old key, that key is tried first: one HMAC, not four."""
    from tenantstore._fernet import FernetKey

    keys = [generate_encryption_key() for _ in range(4)]
    ring = KeyRing(keys[0], keys[1:])
    tokens = [KeyRing(keys[3]).encrypt(f"v{i}") for i in range(30)] + [ring.encrypt("new")]
    macs = 0
    original = FernetKey.mac

    def counting(self: FernetKey, data: bytes) -> bytes:
        nonlocal macs
        macs += 1
        return original(self, data)

    FernetKey.mac = counting  # type: ignore[method-assign]
    try:
        first = ring.decrypt_batch_with_key_index(tokens)
        cold = macs
        macs = 0
        second = ring.decrypt_batch_with_key_index(tokens)
    finally:
        FernetKey.mac = original  # type: ignore[method-assign]
    assert first == second == [(f"v{i}", 3) for i in range(30)] + [("new", 0)]
    assert cold == 31 + 30 * 3  # in the given order: every token against keys 0, 1, 2, 3
    assert macs == 31 + 1  # most-used first: key 3 takes its 30, key 0 the last one
