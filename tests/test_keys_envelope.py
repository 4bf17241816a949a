"""Envelope mode against a real SoftHSM2 token: the pkcs11 provider, data keys, rewrap."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import asyncpg
import pytest
from _softhsm import KEK_A, KEK_B, KEK_EXTRACTABLE, SoftHsm
from cryptography.fernet import Fernet
from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11.exceptions import AttributeSensitive

from tenantstore import ConfigurationError, KeyRing
from tenantstore.encryption import key_id
from tenantstore.keys import (
    KeyProvider,
    KeyProviderError,
    UnwrapError,
    check_keys,
    import_keys,
    keyring_from_env,
    list_known_keys,
    load_keyring,
    new_data_key,
    rewrap,
)
from tenantstore.keys.pkcs11 import Pkcs11Provider
from tenantstore.migrate import upgrade


@pytest.fixture
async def migrated(pool: asyncpg.Pool, keyring: KeyRing) -> asyncpg.Pool:
    await upgrade(pool, keyring)
    return pool


# -- the provider ---------------------------------------------------------------------


def test_the_kek_wraps_inside_the_token_and_never_leaves_it(
    kek_a: Pkcs11Provider, softhsm: SoftHsm
) -> None:
    data_key = os.urandom(32)
    wrapped = kek_a.wrap(data_key)
    assert len(wrapped) == 40 and data_key not in wrapped  # RFC 3394: 8 bytes of integrity
    assert kek_a.unwrap(wrapped) == data_key
    assert kek_a.kek_id == f"pkcs11:token={softhsm.token};key={KEK_A}"
    assert isinstance(kek_a, KeyProvider)
    assert repr(kek_a) == f"<Pkcs11Provider {kek_a.kek_id}>"
    kek = kek_a._key
    assert kek[Attribute.EXTRACTABLE] is False and kek[Attribute.SENSITIVE] is True
    with pytest.raises(AttributeSensitive):
        kek[Attribute.VALUE]


def test_another_kek_cannot_unwrap_and_garbage_does_not_unwrap(
    kek_a: Pkcs11Provider, kek_b: Pkcs11Provider
) -> None:
    wrapped = kek_a.wrap(os.urandom(32))
    with pytest.raises(KeyProviderError, match="did not unwrap"):
        kek_b.unwrap(wrapped)
    with pytest.raises(KeyProviderError, match="did not unwrap"):
        kek_a.unwrap(os.urandom(40))


def test_a_wrong_pin_is_refused_without_echoing_it(softhsm: SoftHsm) -> None:
    pin = "0000-wrong-pin"
    with pytest.raises(KeyProviderError) as info:
        Pkcs11Provider(module=softhsm.module, token=softhsm.token, pin=pin, kek=KEK_A)
    message = str(info.value)
    assert "refused the PIN" in message and softhsm.token in message
    assert pin not in message and softhsm.pin not in message


@pytest.mark.parametrize(
    ("token", "kek", "expected"),
    [
        ("absent-token", KEK_A, "no token 'absent-token'"),
        (None, "absent-kek", "no AES key labelled 'absent-kek'"),
        (None, KEK_EXTRACTABLE, "extractable or not sensitive"),
    ],
)
def test_an_absent_token_or_kek_and_an_extractable_kek_are_refused(
    softhsm: SoftHsm, token: str | None, kek: str, expected: str
) -> None:
    with pytest.raises(KeyProviderError, match=expected):
        Pkcs11Provider(
            module=softhsm.module, token=token or softhsm.token, pin=softhsm.pin, kek=kek
        )


def test_a_module_path_that_does_not_exist_is_refused(softhsm: SoftHsm, tmp_path: Path) -> None:
    missing = str(tmp_path / "libhsm.so")
    with pytest.raises(KeyProviderError, match=f"module {missing} .* does not exist"):
        Pkcs11Provider(module=missing, token=softhsm.token, pin=softhsm.pin, kek=KEK_A)
    not_a_module = tmp_path / "fake.so"
    not_a_module.write_text("not a shared object")
    with pytest.raises(KeyProviderError, match="cannot load or initialise the PKCS#11 module"):
        Pkcs11Provider(module=str(not_a_module), token=softhsm.token, pin=softhsm.pin, kek=KEK_A)


def test_settings_name_what_is_missing_and_explicit_arguments_win(softhsm: SoftHsm) -> None:
    settings = softhsm.environ()
    for name in ("TENANTSTORE_PKCS11_MODULE", "TENANTSTORE_PKCS11_TOKEN", "TENANTSTORE_PKCS11_KEK"):
        partial = {k: v for k, v in settings.items() if k != name}
        with pytest.raises(ConfigurationError, match=f"{name} is not set"):
            Pkcs11Provider.from_settings(partial)
    no_pin = {k: v for k, v in settings.items() if k != "TENANTSTORE_PKCS11_PIN"}
    with pytest.raises(ConfigurationError, match="neither TENANTSTORE_PKCS11_PIN nor"):
        Pkcs11Provider.from_settings(no_pin)
    provider = Pkcs11Provider.from_settings(settings | {"TENANTSTORE_PKCS11_KEK": "x"}, kek=KEK_B)
    try:
        assert provider.kek_id.endswith(f";key={KEK_B}")
    finally:
        provider.close()


def test_the_pin_can_come_from_an_owner_only_file(softhsm: SoftHsm, tmp_path: Path) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text(softhsm.pin + "\n")
    pin_file.chmod(0o600)
    settings = {k: v for k, v in softhsm.environ().items() if k != "TENANTSTORE_PKCS11_PIN"}
    settings["TENANTSTORE_PKCS11_PIN_FILE"] = str(pin_file)
    Pkcs11Provider.from_settings(settings).close()
    pin_file.chmod(0o640)
    with pytest.raises(ConfigurationError, match=f"chmod 600 {pin_file}"):
        Pkcs11Provider.from_settings(settings)


def test_a_closed_provider_refuses_work(softhsm: SoftHsm) -> None:
    provider = softhsm.provider()
    provider.close()
    provider.close()
    with pytest.raises(KeyProviderError, match="closed"):
        provider.wrap(os.urandom(32))


# -- data keys ----------------------------------------------------------------------


async def test_new_data_key_stores_it_wrapped_as_primary_and_returns_only_its_id(
    migrated: asyncpg.Pool, kek_a: Pkcs11Provider
) -> None:
    first = await new_data_key(migrated, kek_a)
    second = await new_data_key(migrated, kek_a)
    known = {k.key_id: k for k in await list_known_keys(migrated)}
    assert known[second].state == "primary" and known[first].state == "decrypt-only"
    assert known[first].wrapped and known[first].wrapped_by == kek_a.kek_id
    ring = await load_keyring(migrated, kek_a)
    assert ring.key_ids == (second, first)
    wrapped = await migrated.fetchval(
        "SELECT wrapped_key FROM tenantstore_keys WHERE key_id = $1", second
    )
    raw = kek_a.unwrap(wrapped)
    assert raw not in wrapped and key_id(base64.urlsafe_b64encode(raw).decode()) == second


async def test_load_keyring_leaves_retired_keys_out_and_decrypts_old_tokens(
    migrated: asyncpg.Pool, kek_a: Pkcs11Provider
) -> None:
    old = await new_data_key(migrated, kek_a)
    token = (await load_keyring(migrated, kek_a)).encrypt("secret")
    new = await new_data_key(migrated, kek_a)
    ring = await load_keyring(migrated, kek_a, fernet="pyca")
    assert ring.fernet == "pyca"
    assert ring.decrypt_with_key_index(token) == ("secret", 1)
    await migrated.execute("UPDATE tenantstore_keys SET state = 'retired' WHERE key_id = $1", old)
    assert (await load_keyring(migrated, kek_a)).key_ids == (new,)


async def test_load_keyring_without_data_keys_says_what_to_run(
    migrated: asyncpg.Pool, kek_a: Pkcs11Provider
) -> None:
    with pytest.raises(KeyProviderError, match="keys new-data-key"):
        await load_keyring(migrated, kek_a)


async def test_load_keyring_without_the_table_says_to_migrate(
    pool: asyncpg.Pool, kek_a: Pkcs11Provider
) -> None:
    with pytest.raises(ConfigurationError, match="migrate up"):
        await load_keyring(pool, kek_a)


async def test_a_key_wrapped_by_another_kek_is_named_with_its_kek(
    migrated: asyncpg.Pool, kek_a: Pkcs11Provider, kek_b: Pkcs11Provider
) -> None:
    kid = await new_data_key(migrated, kek_a)
    with pytest.raises(KeyProviderError) as info:
        await load_keyring(migrated, kek_b)
    assert kid in str(info.value) and kek_a.kek_id in str(info.value)


async def test_a_wrapped_key_that_does_not_unwrap_is_named_by_its_id(
    migrated: asyncpg.Pool, kek_a: Pkcs11Provider
) -> None:
    first = await new_data_key(migrated, kek_a)
    second = await new_data_key(migrated, kek_a)
    await migrated.execute(
        "UPDATE tenantstore_keys SET wrapped_key = $2 WHERE key_id = $1", first, os.urandom(40)
    )
    with pytest.raises(UnwrapError) as info:
        await load_keyring(migrated, kek_a)
    assert info.value.key_id == first and f"data key {first} does not unwrap" in str(info.value)
    # Two rows' wrapped keys swapped: each unwraps, to the other's key.
    good = kek_a.wrap(os.urandom(32))
    await migrated.execute(
        "UPDATE tenantstore_keys SET wrapped_key = $2 WHERE key_id = $1", first, good
    )
    with pytest.raises(UnwrapError, match="unwraps to another key"):
        await load_keyring(migrated, kek_a)
    assert second  # the primary itself was fine


async def test_import_wraps_plain_keys_so_their_tokens_stay_readable(
    migrated: asyncpg.Pool, kek_a: Pkcs11Provider
) -> None:
    plain = [Fernet.generate_key().decode() for _ in range(2)]
    tokens = [KeyRing(k).encrypt(f"s{i}") for i, k in enumerate(plain)]
    done = await import_keys(migrated, kek_a, plain)
    assert done == [(key_id(plain[0]), True), (key_id(plain[1]), True)]
    assert await import_keys(migrated, kek_a, plain[:1]) == [(key_id(plain[0]), False)]
    ring = await load_keyring(migrated, kek_a)
    assert ring.key_ids == (key_id(plain[0]), key_id(plain[1]))
    assert [ring.decrypt(t) for t in tokens] == ["s0", "s1"]


# -- rewrap -------------------------------------------------------------------------


class FailingAfter:
    """A target provider whose wraps fail after `n` successes: an interrupted rewrap."""

    def __init__(self, inner: Pkcs11Provider, n: int) -> None:
        self.inner = inner
        self.left = n
        self.kek_id = inner.kek_id

    def wrap(self, data_key: bytes) -> bytes:
        if self.left <= 0:
            raise KeyProviderError("the HSM went away")
        self.left -= 1
        return self.inner.wrap(data_key)

    def unwrap(self, wrapped: bytes) -> bytes:
        return self.inner.unwrap(wrapped)

    def close(self) -> None:
        pass


async def test_rewrap_moves_every_key_without_touching_a_secret_row_and_resumes(
    migrated: asyncpg.Pool, kek_a: Pkcs11Provider
) -> None:
    ids = [await new_data_key(migrated, kek_a) for _ in range(3)]
    await migrated.execute(
        "UPDATE tenantstore_keys SET state = 'retired' WHERE key_id = $1", ids[0]
    )
    ring = await load_keyring(migrated, kek_a)
    await migrated.execute(
        "INSERT INTO tenants (tenant_id, name, gemini_api_key) VALUES ('t', 'T', $1)",
        ring.encrypt("api-key"),
    )
    before = await migrated.fetchrow("SELECT xmin::text, * FROM tenants")
    kek_b = kek_a.with_kek(KEK_B)
    # The probe takes one wrap; the first key another; then the HSM "goes away".
    with pytest.raises(KeyProviderError, match="went away"):
        await rewrap(migrated, kek_a, FailingAfter(kek_b, 2))
    by = {k.key_id: k.wrapped_by for k in await list_known_keys(migrated)}
    assert sorted(by.values()) == sorted([kek_a.kek_id, kek_a.kek_id, kek_b.kek_id])
    report = await rewrap(migrated, kek_a, kek_b)
    assert (len(report.moved), report.already) == (2, 1)
    again = await rewrap(migrated, kek_a, kek_b)
    assert (again.moved, again.already) == ([], 3)
    assert {k.wrapped_by for k in await list_known_keys(migrated)} == {kek_b.kek_id}
    moved = await load_keyring(migrated, kek_b)
    assert moved.key_ids == ring.key_ids
    assert await migrated.fetchrow("SELECT xmin::text, * FROM tenants") == before
    with pytest.raises(KeyProviderError, match="wrapped by"):
        await load_keyring(migrated, kek_a)


async def test_rewrap_to_an_absent_kek_changes_nothing(
    migrated: asyncpg.Pool, kek_a: Pkcs11Provider
) -> None:
    await new_data_key(migrated, kek_a)
    before = await migrated.fetch("SELECT * FROM tenantstore_keys")
    with pytest.raises(KeyProviderError, match="no AES key labelled 'kek-z'"):
        kek_a.with_kek("kek-z")
    assert await migrated.fetch("SELECT * FROM tenantstore_keys") == before


# -- one call for the application ------------------------------------------------------


async def test_keyring_from_env_picks_the_mode_from_the_provider_setting(
    migrated: asyncpg.Pool, kek_a: Pkcs11Provider, softhsm: SoftHsm, key: str
) -> None:
    assert (await keyring_from_env(migrated, {"ENCRYPTION_KEY": key}, None)).key_ids == (
        key_id(key),
    )
    kid = await new_data_key(migrated, kek_a)
    ring = await keyring_from_env(migrated, softhsm.environ(), None)
    assert ring.key_ids == (kid,)
    report = await check_keys(migrated, ring)
    assert [(k.key_id, k.wrapped_by) for k in report.known or []] == [(kid, kek_a.kek_id)]
    assert any(f"wrapped by {kek_a.kek_id}" in line for line in report.lines())


async def test_keyring_from_env_in_pkcs11_mode_refuses_plain_keys_in_the_environment(
    migrated: asyncpg.Pool, softhsm: SoftHsm, key: str
) -> None:
    with pytest.raises(ConfigurationError, match="ENCRYPTION_KEY is set, but") as info:
        await keyring_from_env(migrated, softhsm.environ() | {"ENCRYPTION_KEY": key}, None)
    assert key not in str(info.value)


async def test_keyring_from_env_names_an_unknown_provider(migrated: asyncpg.Pool) -> None:
    with pytest.raises(ConfigurationError, match="must be one of env, pkcs11"):
        await keyring_from_env(migrated, {"TENANTSTORE_KEY_PROVIDER": "kms"}, None)


def test_unwrapped_session_objects_are_not_left_in_the_token(
    kek_a: Pkcs11Provider,
) -> None:
    for _ in range(3):
        kek_a.unwrap(kek_a.wrap(os.urandom(32)))
    session = kek_a._session
    left = list(session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY}))
    assert all(obj.key_type == KeyType.AES for obj in left)  # only the KEKs
