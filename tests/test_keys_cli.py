"""`python -m tenantstore.keys list | check | retire | new-data-key | import | rewrap`,
and `migrate verify --retire`, through real processes: exit codes, and no key or PIN printed."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest
from _softhsm import KEK_A, KEK_B, SoftHsm
from cryptography.fernet import Fernet

from tenantstore import KeyRing
from tenantstore.encryption import key_id
from tenantstore.keys import list_known_keys, load_keyring, record_key_use
from tenantstore.keys.cli import _parser
from tenantstore.migrate import rotate_secrets, upgrade


def run(
    module: str, args: list[str], env: dict[str, str], cwd: Path
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=dict(os.environ) | env,  # conftest already removed every key setting
        timeout=120,
        check=False,
    )


async def keys_cli(
    args: list[str], env: dict[str, str], cwd: Path
) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(run, "tenantstore.keys", args, env, cwd)


@pytest.fixture
async def migrated(pool: asyncpg.Pool, keyring: KeyRing) -> asyncpg.Pool:
    await upgrade(pool, keyring)
    return pool


def test_every_command_and_option_has_help_text() -> None:
    parser = _parser()
    [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(commands.choices) == {
        "generate", "list", "check", "new-data-key", "import", "rewrap", "retire"
    }  # fmt: skip
    helps = {action.dest: action.help for action in commands._choices_actions}
    for name, sub in commands.choices.items():
        assert helps[name], name
        for action in sub._actions:
            assert action.help and action.help != argparse.SUPPRESS, (name, action.dest)


# -- env mode --------------------------------------------------------------------------


async def test_list_shows_configured_ids_and_what_the_database_knows(
    migrated: asyncpg.Pool, database_url: str, key: str, old_key: str, tmp_path: Path
) -> None:
    await record_key_use(migrated, key_id(old_key), primary=True)
    env = {"ENCRYPTION_KEYS": f"{key},{old_key}"}
    result = await keys_cli(["list", "--database-url", database_url], env, tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert f"  {key_id(key)}  primary   ENCRYPTION_KEYS[0]" in lines
    assert f"  {key_id(old_key)}  previous  ENCRYPTION_KEYS[1]" in lines
    assert any(re.match(rf"  {key_id(old_key)}  primary +first used \d{{4}}-", x) for x in lines)
    assert key not in result.stdout + result.stderr and old_key not in result.stdout


async def test_check_exits_0_when_all_is_well_1_on_a_missing_key_2_without_keys(
    migrated: asyncpg.Pool, database_url: str, key: str, old_key: str, tmp_path: Path
) -> None:
    env = {"ENCRYPTION_KEY": key}
    ok = await keys_cli(["check", "--database-url", database_url], env, tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines()[-1] == "keys ok"
    await record_key_use(migrated, key_id(old_key), primary=False)
    missing = await keys_cli(["check", "--database-url", database_url], env, tmp_path)
    assert missing.returncode == 1
    assert f"key {key_id(old_key)}  decrypt-only  NOT HELD" in missing.stdout
    assert "keys NOT ok" in missing.stdout
    none = await keys_cli(["check", "--database-url", database_url], {}, tmp_path)
    assert none.returncode == 2 and "ENCRYPTION_KEY" in none.stderr
    for result in (ok, missing):
        assert key not in result.stdout + result.stderr


async def test_retire_refuses_while_secrets_are_under_the_key_then_retires_it(
    migrated: asyncpg.Pool, database_url: str, key: str, old_key: str, tmp_path: Path
) -> None:
    await migrated.execute(
        "INSERT INTO tenants (tenant_id, name, gemini_api_key, oauth_access_token) "
        "VALUES ('t', 'T', $1, $2)",
        KeyRing(old_key).encrypt("g"),
        KeyRing(old_key).encrypt("o"),
    )
    env = {"ENCRYPTION_KEY": key, "OLD_ENCRYPTION_KEY": old_key}
    old_id = key_id(old_key)
    refused = await keys_cli(["retire", old_id, "--database-url", database_url], env, tmp_path)
    assert refused.returncode == 1
    assert f"2 secrets are still under key {old_id}" in refused.stderr
    assert "gemini_api_key 1, oauth_access_token 1" in refused.stderr
    verify = await asyncio.to_thread(
        run, "tenantstore.migrate",
        ["verify", "--retire", old_id, "--database-url", database_url], env, tmp_path,
    )  # fmt: skip
    assert verify.returncode == 1
    assert f"2 secrets are still under key {old_id}" in verify.stderr
    assert "gemini_api_key 1, oauth_access_token 1" in verify.stderr

    await rotate_secrets(migrated, KeyRing(key, [old_key]))
    verify = await asyncio.to_thread(
        run, "tenantstore.migrate",
        ["verify", "--retire", old_id, "--database-url", database_url], env, tmp_path,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stderr
    done = await keys_cli(["retire", old_id, "--database-url", database_url], env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert {k.key_id: k.state for k in await list_known_keys(migrated)}[old_id] == "retired"
    primary = await keys_cli(["retire", key_id(key), "--database-url", database_url], env, tmp_path)
    assert primary.returncode == 1 and "primary key" in primary.stderr
    malformed = await keys_cli(["retire", key, "--database-url", database_url], env, tmp_path)
    assert malformed.returncode == 2 and key not in malformed.stderr
    for result in (refused, done, primary, malformed):
        assert key not in result.stdout and old_key not in result.stdout + result.stderr


async def test_retire_refuses_an_id_that_names_no_key(
    migrated: asyncpg.Pool, database_url: str, key: str, tmp_path: Path
) -> None:
    """A typo counts 0 secrets under it: neither command may call that a success."""
    env = {"ENCRYPTION_KEY": key}
    typo = "0123456789ab"
    url = ["--database-url", database_url]
    retire = await keys_cli(["retire", typo, *url], env, tmp_path)
    assert retire.returncode == 1, retire.stdout + retire.stderr
    assert "neither configured nor recorded in tenantstore_keys" in retire.stderr
    verify = await asyncio.to_thread(
        run, "tenantstore.migrate", ["verify", "--retire", typo, *url], env, tmp_path
    )
    assert verify.returncode == 2, verify.stdout + verify.stderr
    assert "neither configured nor recorded in tenantstore_keys" in verify.stderr
    assert (
        await migrated.fetchval("SELECT count(*) FROM tenantstore_keys WHERE key_id = $1", typo)
        == 0
    )
    # A key the database recorded (since removed from the configuration) may still retire.
    gone = Fernet.generate_key().decode()
    await record_key_use(migrated, key_id(gone), primary=False)
    known = await asyncio.to_thread(
        run, "tenantstore.migrate", ["verify", "--retire", key_id(gone), *url], env, tmp_path
    )
    assert known.returncode == 0, known.stdout + known.stderr
    retired = await keys_cli(["retire", key_id(gone), *url], env, tmp_path)
    assert retired.returncode == 0, retired.stdout + retired.stderr


async def test_envelope_commands_in_env_mode_say_a_kek_is_needed(
    database_url: str, key: str, tmp_path: Path
) -> None:
    result = await keys_cli(
        ["new-data-key", "--database-url", database_url], {"ENCRYPTION_KEY": key}, tmp_path
    )
    assert result.returncode == 2
    assert "TENANTSTORE_KEY_PROVIDER=pkcs11" in result.stderr


# -- pkcs11 mode --------------------------------------------------------------------------


async def test_hsm_workflow_import_new_data_key_list_check_rewrap(
    migrated: asyncpg.Pool, database_url: str, softhsm: SoftHsm, key: str, tmp_path: Path
) -> None:
    token = KeyRing(key).encrypt("before the HSM")
    await migrated.execute(
        "INSERT INTO tenants (tenant_id, name, gemini_api_key) VALUES ('t', 'T', $1)", token
    )
    url = ["--database-url", database_url]
    hsm = softhsm.environ(KEK_A)
    imported = await keys_cli(["import", *url], hsm | {"ENCRYPTION_KEY": key}, tmp_path)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == f"{key_id(key)}  stored"

    new = await keys_cli(["new-data-key", *url], hsm, tmp_path)
    assert new.returncode == 0, new.stderr
    data_key_id = new.stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{12}", data_key_id)

    kek_a = f"pkcs11:token={softhsm.token};key={KEK_A}"
    listed = await keys_cli(["list", *url], hsm, tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert f"provider pkcs11: KEK {kek_a}" in listed.stdout
    assert re.search(rf"{data_key_id}  primary .* wrapped by {re.escape(kek_a)}", listed.stdout)
    assert re.search(rf"{key_id(key)}  decrypt-only .* wrapped by", listed.stdout)

    checked = await keys_cli(["check", *url], hsm, tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"key {data_key_id}  primary  held  wrapped by {kek_a}" in checked.stdout
    assert f"canary gemini_api_key: 1/1 decrypt ({key_id(key)} 1)" in checked.stdout

    moved = await keys_cli(["rewrap", "--to-kek", KEK_B, *url], hsm, tmp_path)
    assert moved.returncode == 0, moved.stderr
    assert moved.stdout.strip().startswith("Rewrap complete: 2 data keys moved")
    stale = await keys_cli(["check", *url], hsm, tmp_path)
    assert stale.returncode == 2 and "wrapped by" in stale.stderr
    again = await keys_cli(["check", *url], softhsm.environ(KEK_B), tmp_path)
    assert again.returncode == 0, again.stderr

    provider = softhsm.provider(KEK_B)
    try:
        ring = await load_keyring(migrated, provider)
    finally:
        provider.close()
    assert ring.decrypt(token) == "before the HSM"
    everything = "".join(r.stdout + r.stderr for r in (imported, new, listed, checked, moved))
    assert key not in everything and softhsm.pin not in everything


async def test_health_and_tenants_commands_load_the_ring_from_the_hsm(
    migrated: asyncpg.Pool, database_url: str, softhsm: SoftHsm, tmp_path: Path
) -> None:
    """In pkcs11 mode no key is in the environment: every command unwraps tenantstore_keys."""
    url = ["--database-url", database_url]
    hsm = softhsm.environ(KEK_A)
    new = await keys_cli(["new-data-key", *url], hsm, tmp_path)
    assert new.returncode == 0, new.stderr
    data_key = new.stdout.strip()
    await migrated.execute("INSERT INTO tenants (tenant_id, name) VALUES ('acme', 'Acme')")

    secret = "AIza-entered-under-the-hsm"
    written = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "tenantstore.tenants", "set-secret", "acme", "gemini_api_key", *url],
        input=secret + "\n", capture_output=True, text=True, cwd=tmp_path,
        env=dict(os.environ) | hsm, timeout=120, check=False,
    )  # fmt: skip
    assert written.returncode == 0, written.stderr
    assert (
        written.stdout.strip()
        == f"Set gemini_api_key for tenant acme (encrypted under key {data_key})"
    )
    shown = await asyncio.to_thread(
        run, "tenantstore.tenants", ["show", "acme", "--json", *url], hsm, tmp_path
    )
    assert shown.returncode == 0, shown.stderr
    assert "key unknown" not in shown.stdout and data_key in shown.stdout
    health = await asyncio.to_thread(
        run, "tenantstore.health", ["--json"], hsm | {"DATABASE_URL": database_url}, tmp_path
    )
    checks = json.loads(health.stdout)["checks"]
    assert checks["keys"]["status"] == "ok", checks
    assert checks["crypto"]["status"] == "ok", checks
    for result in (new, written, shown, health):
        assert secret not in result.stdout + result.stderr
        assert softhsm.pin not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"TENANTSTORE_PKCS11_PIN": "1111-wrong"}, "refused the PIN"),
        ({"TENANTSTORE_PKCS11_TOKEN": "nope"}, "no token 'nope'"),
        ({"TENANTSTORE_PKCS11_KEK": "nope"}, "no AES key labelled 'nope'"),
        ({"TENANTSTORE_PKCS11_MODULE": "/nonexistent/libhsm.so"}, "does not exist"),
        ({"SOFTHSM2_CONF": "/nonexistent/softhsm2.conf"}, "check that the HSM is reachable"),
    ],
)
async def test_bad_hsm_settings_exit_2_change_nothing_and_never_print_the_pin(
    migrated: asyncpg.Pool,
    database_url: str,
    softhsm: SoftHsm,
    tmp_path: Path,
    change: dict[str, str],
    expected: str,
) -> None:
    env = softhsm.environ() | change
    result = await keys_cli(["new-data-key", "--database-url", database_url], env, tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert expected in result.stderr
    assert softhsm.pin not in result.stderr + result.stdout
    assert "1111-wrong" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr
    assert await migrated.fetchval("SELECT count(*) FROM tenantstore_keys") == 0


async def test_import_without_plain_keys_is_a_configuration_error(
    database_url: str, softhsm: SoftHsm, tmp_path: Path
) -> None:
    fresh = Fernet.generate_key().decode()
    result = await keys_cli(["import", "--database-url", database_url], softhsm.environ(), tmp_path)
    assert result.returncode == 2 and "ENCRYPTION_KEY" in result.stderr
    assert fresh not in result.stderr
