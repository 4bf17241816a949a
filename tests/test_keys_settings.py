"""Key settings: `ENCRYPTION_KEYS`, the `*_FILE` variants and `TENANTSTORE_FERNET`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from tenantstore import KeyRing
from tenantstore.config import EmptySecretFileError, UnsafeSecretFileError
from tenantstore.encryption import key_id
from tenantstore.errors import (
    ConfigurationError,
    EmptySettingError,
    EncryptionKeyMissingError,
    InvalidEncryptionKeyError,
)


def _keys(n: int) -> list[str]:
    return [Fernet.generate_key().decode() for _ in range(n)]


def _secret_file(path: Path, content: str, mode: int = 0o600) -> Path:
    path.write_text(content)
    path.chmod(mode)
    return path


# -- ENCRYPTION_KEYS ------------------------------------------------------------------


def test_encryption_keys_lists_every_key_primary_first() -> None:
    keys = _keys(4)
    ring = KeyRing.from_env({"ENCRYPTION_KEYS": ", ".join(keys)}, env_file=None)
    assert ring.key_ids == tuple(key_id(k) for k in keys)
    assert ring.primary_key_id == key_id(keys[0])
    for i, k in enumerate(keys):
        assert ring.decrypt_with_key_index(KeyRing(k).encrypt("x")) == ("x", i)


def test_encryption_keys_with_one_key_is_a_ring_of_one() -> None:
    (k,) = _keys(1)
    ring = KeyRing.from_env({"ENCRYPTION_KEYS": k}, env_file=None)
    assert ring.key_ids == (key_id(k),) and ring.previous_count == 0


@pytest.mark.parametrize("other", ["ENCRYPTION_KEY", "OLD_ENCRYPTION_KEY", "ENCRYPTION_KEY_FILE"])
def test_encryption_keys_with_the_single_key_settings_is_an_error_naming_both(
    other: str, tmp_path: Path
) -> None:
    a, b = _keys(2)
    value = str(_secret_file(tmp_path / "k", b)) if other.endswith("_FILE") else b
    with pytest.raises(ConfigurationError) as info:
        KeyRing.from_env({"ENCRYPTION_KEYS": a, other: value}, env_file=None)
    message = str(info.value)
    assert "ENCRYPTION_KEYS" in message and other in message
    assert a not in message and b not in message


def test_encryption_keys_in_the_environment_and_encryption_key_in_the_file_conflict() -> None:
    a, b = _keys(2)
    _secret_file(Path(".env.secrets"), f"ENCRYPTION_KEY={b}\n")
    with pytest.raises(ConfigurationError, match="ENCRYPTION_KEYS and ENCRYPTION_KEY"):
        KeyRing.from_env({"ENCRYPTION_KEYS": a})


@pytest.mark.parametrize(
    ("value", "setting"),
    [("", "ENCRYPTION_KEYS"), (" , ", "ENCRYPTION_KEYS"), ("{k},,{k}", "ENCRYPTION_KEYS[1]")],
)
def test_blank_encryption_keys_or_entry_is_an_empty_setting_error(value: str, setting: str) -> None:
    (k,) = _keys(1)
    with pytest.raises(EmptySettingError) as info:
        KeyRing.from_env({"ENCRYPTION_KEYS": value.format(k=k)}, env_file=None)
    assert info.value.setting == setting


def test_a_malformed_entry_of_encryption_keys_is_named_by_index_not_shown() -> None:
    (k,) = _keys(1)
    bad = k[:-2] + "!="
    with pytest.raises(InvalidEncryptionKeyError) as info:
        KeyRing.from_env({"ENCRYPTION_KEYS": f"{k},{bad}"}, env_file=None)
    assert info.value.setting == "ENCRYPTION_KEYS[1]"
    assert bad not in str(info.value) and k not in str(info.value)


def test_the_two_variable_form_keeps_working_with_several_old_keys() -> None:
    keys = _keys(3)
    ring = KeyRing.from_env(
        {"ENCRYPTION_KEY": keys[0], "OLD_ENCRYPTION_KEY": ",".join(keys[1:])}, env_file=None
    )
    assert ring.key_ids == tuple(key_id(k) for k in keys)


def test_no_key_setting_at_all_is_still_the_missing_key_error() -> None:
    with pytest.raises(EncryptionKeyMissingError):
        KeyRing.from_env({}, env_file=None)


# -- *_FILE -----------------------------------------------------------------------------


@pytest.mark.parametrize("setting", ["ENCRYPTION_KEY", "ENCRYPTION_KEYS"])
def test_a_key_file_setting_reads_the_stripped_file(setting: str, tmp_path: Path) -> None:
    (k,) = _keys(1)
    path = _secret_file(tmp_path / "key", f"\n  {k}\n\n")
    ring = KeyRing.from_env({f"{setting}_FILE": str(path)}, env_file=None)
    assert ring.key_ids == (key_id(k),)


def test_keys_file_holds_a_comma_separated_list(tmp_path: Path) -> None:
    keys = _keys(3)
    path = _secret_file(tmp_path / "keys", ",\n".join(keys) + "\n")
    ring = KeyRing.from_env({"ENCRYPTION_KEYS_FILE": str(path)}, env_file=None)
    assert ring.key_ids == tuple(key_id(k) for k in keys)


def test_old_key_file_gives_the_previous_keys(tmp_path: Path) -> None:
    a, b, c = _keys(3)
    primary = _secret_file(tmp_path / "a", a)
    old = _secret_file(tmp_path / "old", f"{b},{c}")
    ring = KeyRing.from_env(
        {"ENCRYPTION_KEY_FILE": str(primary), "OLD_ENCRYPTION_KEY_FILE": str(old)}, env_file=None
    )
    assert ring.key_ids == (key_id(a), key_id(b), key_id(c))


def test_a_file_setting_can_come_from_the_env_secrets_file(tmp_path: Path) -> None:
    (k,) = _keys(1)
    path = _secret_file(tmp_path / "key", k)
    _secret_file(Path(".env.secrets"), f"ENCRYPTION_KEY_FILE={path}\n")
    assert KeyRing.from_env({}).primary_key_id == key_id(k)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o602, 0o644, 0o660, 0o666, 0o610])
def test_a_key_file_open_to_group_or_others_is_refused_with_the_chmod_fix(
    mode: int, tmp_path: Path
) -> None:
    (k,) = _keys(1)
    path = _secret_file(tmp_path / "key", k, mode)
    with pytest.raises(UnsafeSecretFileError) as info:
        KeyRing.from_env({"ENCRYPTION_KEY_FILE": str(path)}, env_file=None)
    message = str(info.value)
    assert f"chmod 600 {path}" in message
    assert "ENCRYPTION_KEY_FILE" in message
    assert k not in message


@pytest.mark.parametrize("mode", [0o400, 0o600, 0o700])
def test_an_owner_only_key_file_is_accepted(mode: int, tmp_path: Path) -> None:
    (k,) = _keys(1)
    path = _secret_file(tmp_path / "key", k, mode)
    assert KeyRing.from_env({"ENCRYPTION_KEY_FILE": str(path)}, env_file=None).key_ids == (
        key_id(k),
    )


def test_a_symlink_to_a_private_file_is_followed_as_kubernetes_mounts_are(tmp_path: Path) -> None:
    """Kubernetes mounts `key -> ..data/key`; the target's mode is what counts."""
    (k,) = _keys(1)
    target = _secret_file(tmp_path / "data_key", k, 0o400)
    link = tmp_path / "key"
    link.symlink_to(target)
    assert KeyRing.from_env({"ENCRYPTION_KEY_FILE": str(link)}, env_file=None).key_ids == (
        key_id(k),
    )
    target.chmod(0o644)
    with pytest.raises(UnsafeSecretFileError, match="chmod 600"):
        KeyRing.from_env({"ENCRYPTION_KEY_FILE": str(link)}, env_file=None)


def test_a_variable_and_its_file_variant_together_are_an_error(tmp_path: Path) -> None:
    a, b = _keys(2)
    path = _secret_file(tmp_path / "key", b)
    with pytest.raises(ConfigurationError) as info:
        KeyRing.from_env({"ENCRYPTION_KEY": a, "ENCRYPTION_KEY_FILE": str(path)}, env_file=None)
    message = str(info.value)
    assert "ENCRYPTION_KEY and ENCRYPTION_KEY_FILE" in message
    assert a not in message and b not in message


def test_a_blank_file_setting_is_an_empty_setting_error() -> None:
    with pytest.raises(EmptySettingError) as info:
        KeyRing.from_env({"ENCRYPTION_KEY_FILE": "  "}, env_file=None)
    assert info.value.setting == "ENCRYPTION_KEY_FILE"


def test_an_empty_key_file_is_an_empty_setting_error_naming_file_and_setting(
    tmp_path: Path,
) -> None:
    path = _secret_file(tmp_path / "key", "\n \n")
    with pytest.raises(EmptySecretFileError) as info:
        KeyRing.from_env({"ENCRYPTION_KEY_FILE": str(path)}, env_file=None)
    assert isinstance(info.value, EmptySettingError)
    assert info.value.setting == "ENCRYPTION_KEY_FILE"
    assert str(path) in str(info.value)


def test_a_missing_key_file_is_a_configuration_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "absent"
    with pytest.raises(ConfigurationError) as info:
        KeyRing.from_env({"ENCRYPTION_KEY_FILE": str(path)}, env_file=None)
    assert str(path) in str(info.value) and "No such file" in str(info.value)


def test_a_directory_is_not_a_key_file(tmp_path: Path) -> None:
    with pytest.raises(UnsafeSecretFileError, match="not a regular file"):
        KeyRing.from_env({"ENCRYPTION_KEY_FILE": str(tmp_path)}, env_file=None)


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(UnsafeSecretFileError, match="not a regular file"):
        KeyRing.from_env({"ENCRYPTION_KEY_FILE": str(fifo)}, env_file=None)


def test_a_malformed_key_in_a_file_names_the_setting_and_never_the_content(
    tmp_path: Path,
) -> None:
    path = _secret_file(tmp_path / "key", "not-a-fernet-key-but-a-secret")
    with pytest.raises(InvalidEncryptionKeyError) as info:
        KeyRing.from_env({"ENCRYPTION_KEY_FILE": str(path)}, env_file=None)
    assert "not-a-fernet-key" not in str(info.value)


def test_a_non_utf8_key_file_is_refused_without_echoing_it(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_bytes(b"\xff\xfesecret-bytes")
    path.chmod(0o600)
    with pytest.raises(ConfigurationError, match="not UTF-8") as info:
        KeyRing.from_env({"ENCRYPTION_KEY_FILE": str(path)}, env_file=None)
    assert "secret-bytes" not in str(info.value)
    assert info.value.__context__ is None


# -- TENANTSTORE_FERNET -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"), [(None, "batch"), ("batch", "batch"), ("pyca", "pyca")]
)
def test_tenantstore_fernet_picks_the_implementation(value: str | None, expected: str) -> None:
    (k,) = _keys(1)
    environ = {"ENCRYPTION_KEY": k} | ({} if value is None else {"TENANTSTORE_FERNET": value})
    ring = KeyRing.from_env(environ, env_file=None)
    assert ring.fernet == expected
    assert ring.decrypt(ring.encrypt("x")) == "x"


def test_an_unknown_fernet_implementation_is_a_configuration_error() -> None:
    (k,) = _keys(1)
    with pytest.raises(ConfigurationError, match="TENANTSTORE_FERNET must be batch or pyca"):
        KeyRing.from_env({"ENCRYPTION_KEY": k, "TENANTSTORE_FERNET": "openssl"}, env_file=None)
    with pytest.raises(EmptySettingError):
        KeyRing.from_env({"ENCRYPTION_KEY": k, "TENANTSTORE_FERNET": ""}, env_file=None)
    with pytest.raises(ConfigurationError, match="unknown Fernet implementation"):
        KeyRing(k, fernet="openssl")  # type: ignore[arg-type]


# -- through a process boundary ---------------------------------------------------------


def _migrate_verify(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """`python -m tenantstore.migrate verify`: loads the keys before it needs a database."""
    # os.environ is already free of key settings (conftest's clean_environ).
    return subprocess.run(
        [sys.executable, "-m", "tenantstore.migrate", "verify", "--database-url", "postgresql:"],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=dict(os.environ) | env,
        timeout=60,
        check=False,
    )


def test_cli_refuses_an_open_key_file_with_exit_2_and_the_fix(tmp_path: Path) -> None:
    (k,) = _keys(1)
    path = _secret_file(tmp_path / "key", k, 0o644)
    result = _migrate_verify({"ENCRYPTION_KEY_FILE": str(path)}, tmp_path)
    assert result.returncode == 2
    assert f"chmod 600 {path}" in result.stderr
    assert k not in result.stderr + result.stdout


def test_cli_refuses_encryption_keys_beside_encryption_key_naming_both(tmp_path: Path) -> None:
    a, b = _keys(2)
    result = _migrate_verify({"ENCRYPTION_KEYS": a, "ENCRYPTION_KEY": b}, tmp_path)
    assert result.returncode == 2
    assert "ENCRYPTION_KEYS" in result.stderr and "ENCRYPTION_KEY " in result.stderr
    assert a not in result.stderr + result.stdout and b not in result.stderr + result.stdout


def test_cli_lists_keys_read_from_a_keys_file(tmp_path: Path) -> None:
    keys = _keys(2)
    path = _secret_file(tmp_path / "keys", ",".join(keys))
    result = subprocess.run(
        [sys.executable, "-m", "tenantstore.keys", "list"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=dict(os.environ) | {"ENCRYPTION_KEYS_FILE": str(path)},
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert f"{key_id(keys[0])}  primary" in result.stdout
    assert f"{key_id(keys[1])}  previous" in result.stdout
    assert keys[0] not in result.stdout + result.stderr
