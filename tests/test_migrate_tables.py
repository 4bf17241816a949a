"""The batch runner over several secret columns and over the application's own tables."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from cryptography.fernet import Fernet

from tenantstore import EncryptedTable, KeyRing, TableDefinitionError
from tenantstore.encryption import is_encrypted, stored_token
from tenantstore.migrate import (
    decrypt_secrets,
    encrypt_secrets,
    rotate_secrets,
    upgrade,
    verify_secrets,
)
from tenantstore.migrate.__main__ import main
from tenantstore.models import TENANTS

SECRETS = TENANTS.secrets

ODD_SCHEMA = "Odd Schema"
ODD = EncryptedTable("Order", schema=ODD_SCHEMA, key="Key Col", secrets=["order", 'we"ird'])
ODD_ARGS = ["--table", '"Odd Schema"."Order"', "--key", "Key Col", "--column", "order",
            "--column", 'we"ird']  # fmt: skip


def value(i: int, column: int) -> str:
    return f"secret-{column}-{i:07d}"


@pytest.fixture
async def tenants(pool: asyncpg.Pool, keyring: KeyRing) -> asyncpg.Pool:
    """tenants with its four secret columns, no rows (0004's data step not yet run)."""
    await upgrade(pool, keyring, target=3)
    return pool


async def fill_tenants(pool: asyncpg.Pool, rows: int, *, missing_every: int = 4) -> None:
    """Four secrets a row, three of four present on most rows (one NULL every few)."""
    await pool.execute(
        """
        INSERT INTO tenants (tenant_id, name, gemini_api_key, oauth_access_token,
                             oauth_refresh_token, webhook_signing_secret)
        SELECT 't' || lpad(i::text, 7, '0'), 'n',
               'secret-0-' || lpad(i::text, 7, '0'),
               CASE WHEN i % $2 = 1 THEN NULL ELSE 'secret-1-' || lpad(i::text, 7, '0') END,
               'secret-2-' || lpad(i::text, 7, '0'),
               CASE WHEN i % $2 = 3 THEN NULL ELSE 'secret-3-' || lpad(i::text, 7, '0') END
        FROM generate_series(0, $1 - 1) AS i
        """,
        rows,
        missing_every,
    )


async def tenant_values(pool: asyncpg.Pool) -> dict[str, tuple[Any, ...]]:
    rows = await pool.fetch(
        f"SELECT tenant_id, {', '.join(SECRETS)} FROM tenants ORDER BY tenant_id"
    )
    return {r[0]: tuple(r[1:]) for r in rows}


def plain(ring: KeyRing, stored: str | None) -> str | None:
    return None if stored is None else ring.decrypt(stored)


async def test_one_pass_encrypts_every_column_and_counts_each(
    tenants: asyncpg.Pool, keyring: KeyRing
) -> None:
    await fill_tenants(tenants, 40)
    report = await encrypt_secrets(tenants, keyring, batch_size=7)
    assert report.rows == 40
    assert {c: n.changed for c, n in report.columns.items()} == {
        "gemini_api_key": 40,
        "oauth_access_token": 30,
        "oauth_refresh_token": 40,
        "webhook_signing_secret": 30,
    }
    assert report.changed == 140 and report.skipped == 0
    stored = await tenant_values(tenants)
    for tenant_id, values in stored.items():
        i = int(tenant_id[1:])
        for column, token in enumerate(values):
            if token is not None:
                assert is_encrypted(token) and keyring.decrypt(token) == value(i, column)
    verify = await verify_secrets(tenants, keyring)
    assert verify.current == 140 and verify.keys == {keyring.primary_key_id: 140}
    assert verify.columns["oauth_access_token"].keys == {keyring.primary_key_id: 30}


async def test_column_option_restricts_a_run(tenants: asyncpg.Pool, keyring: KeyRing) -> None:
    await fill_tenants(tenants, 10)
    report = await encrypt_secrets(tenants, keyring, columns=["oauth_refresh_token"])
    assert list(report.columns) == ["oauth_refresh_token"] and report.changed == 10
    stored = await tenant_values(tenants)
    assert all(is_encrypted(v[2]) and not is_encrypted(v[0]) for v in stored.values())
    with pytest.raises(TableDefinitionError, match="not a secret column of tenants"):
        await encrypt_secrets(tenants, keyring, columns=["name"])


async def test_a_column_the_application_changed_keeps_its_value_and_the_others_are_done(
    tenants: asyncpg.Pool, keyring: KeyRing, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Compare-and-swap per column: one changed column does not hold the row's others back."""
    await fill_tenants(tenants, 10, missing_every=100)
    app_token = keyring.encrypt("whsec-from-the-app")
    original_fetch = asyncpg.connection.Connection.fetch
    fired = False

    async def fetch(self: asyncpg.Connection, query: str, *args: object, **kw: object) -> object:
        nonlocal fired
        if query.startswith("UPDATE") and not fired:
            fired = True
            await tenants.execute(
                "UPDATE tenants SET webhook_signing_secret = $1 WHERE tenant_id = 't0000004'",
                app_token,
            )
        return await original_fetch(self, query, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(asyncpg.connection.Connection, "fetch", fetch)
    report = await encrypt_secrets(tenants, keyring)
    assert fired
    webhook = report.columns["webhook_signing_secret"]
    # Rows 1 and 3 have no access token / webhook secret (see fill_tenants).
    assert (webhook.changed, webhook.skipped, webhook.changed_concurrently) == (8, 1, 0)
    assert report.changed == 37 and report.rows == 10
    row = (await tenant_values(tenants))["t0000004"]
    assert row[3] == app_token
    assert [plain(keyring, v) for v in row[:3]] == [value(4, c) for c in range(3)]


# -- tables of the application's own -------------------------------------------------


@pytest.fixture
async def odd(pool: asyncpg.Pool) -> asyncpg.Pool:
    """An application table whose names all need quoting, in a schema that is not public."""
    await pool.execute(
        f"""
        CREATE SCHEMA "{ODD_SCHEMA}";
        CREATE TABLE "{ODD_SCHEMA}"."Order" (
            "Key Col" text PRIMARY KEY, "order" text, "we""ird" varchar, other text
        );
        INSERT INTO "{ODD_SCHEMA}"."Order"
        SELECT 'k' || lpad(i::text, 6, '0'),
               CASE WHEN i % 5 = 0 THEN NULL ELSE 'ord-' || i END,
               CASE WHEN i % 7 = 0 THEN '' ELSE 'wei-' || i END,
               'untouched-' || i
        FROM generate_series(1, 300) AS i;
        """
    )
    return pool


async def odd_values(pool: asyncpg.Pool) -> list[tuple[Any, ...]]:
    rows = await pool.fetch(
        f'SELECT "Key Col", "order", "we""ird", other FROM "{ODD_SCHEMA}"."Order" ORDER BY 1'
    )
    return [tuple(r) for r in rows]


async def test_every_operation_runs_on_an_application_table_with_odd_names(
    odd: asyncpg.Pool, key: str, old_key: str
) -> None:
    before = await odd_values(odd)
    old = KeyRing(old_key)
    report = await encrypt_secrets(odd, old, table=ODD, batch_size=32)
    assert report.table == '"Odd Schema"."Order"'
    assert (report.columns["order"].changed, report.columns['we"ird'].changed) == (240, 258)
    ring = KeyRing(key, [old_key])
    assert (await rotate_secrets(odd, ring, table=ODD, batch_size=50)).changed == 498
    verify = await verify_secrets(odd, ring, table=ODD)
    assert verify.current == 498 and verify.keys == {ring.primary_key_id: 498}
    encrypted = await odd_values(odd)
    for (k, o, w, other), (k2, o2, w2, other2) in zip(before, encrypted, strict=True):
        assert (k, other) == (k2, other2)
        assert (o2 is None) == (o is None) and (o is None or ring.decrypt(o2) == o)
        assert w2 == "" if w == "" else ring.decrypt(w2) == w
    await decrypt_secrets(odd, ring, table=ODD)
    assert await odd_values(odd) == before


async def test_integer_and_uuid_keys_page_and_write(pool: asyncpg.Pool, keyring: KeyRing) -> None:
    await pool.execute(
        """
        CREATE TABLE ints (id bigint PRIMARY KEY, token text);
        INSERT INTO ints SELECT i, 's' || i FROM generate_series(-50, 149) AS i;
        CREATE TABLE uuids (id uuid PRIMARY KEY, token text);
        """
    )
    await pool.executemany(
        "INSERT INTO uuids VALUES ($1, $2)", [(uuid.uuid4(), f"u{i}") for i in range(120)]
    )
    for name in ("ints", "uuids"):
        table = EncryptedTable(name, key="id", secrets=["token"])
        report = await encrypt_secrets(pool, keyring, table=table, batch_size=17, shard=(0, 1))
        assert report.changed == report.rows == (200 if name == "ints" else 120)
        tokens = [r[0] for r in await pool.fetch(f"SELECT token FROM {name}")]
        assert all(is_encrypted(t) for t in tokens)


async def test_the_cli_runs_on_a_table_given_by_options(
    odd: asyncpg.Pool, database_url: str, key: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.setenv("ENCRYPTION_KEY", key)
    args = [*ODD_ARGS, "--database-url", database_url]
    assert await asyncio.to_thread(main, ["encrypt", *args]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "Migration complete: 498 keys encrypted, 0 already encrypted"
    assert "  order: 240 encrypted, 0 already done" in out
    assert await asyncio.to_thread(main, ["verify", "--json", *args]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["table"] == '"Odd Schema"."Order"' and report["current"] == 498
    assert report["columns"]['we"ird']["current"] == 258
    assert await asyncio.to_thread(main, ["status", *args]) == 0
    assert 'Secrets in "Odd Schema"."Order": 498 current key' in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--table", "nope", "--key", "id", "--column", "c"], "table nope does not exist"),
        (["--table", '"Odd Schema"."Order"', "--key", "Key Col", "--column", "nope"],
         "has no column nope"),
        (["--table", '"Odd Schema"."Order"', "--key", "order", "--column", "other"],
         "allows NULL"),
        (["--table", '"Odd Schema"."Order"', "--key", "Key Col", "--key", "order",
          "--column", "other"], "composite keys"),
        (["--table", '"Odd Schema"."Order"', "--key", "Key Col", "--column", "order",
          "--column", "order"], "given twice"),
        (["--table", '"Odd Schema"."Order"', "--column", "order"], "--table needs --key"),
        (["--key", "id"], "--key needs --table"),
        (["--column", "nope"], "not a secret column of tenants"),
    ],
)  # fmt: skip
async def test_bad_table_options_exit_2_naming_the_problem_and_change_nothing(
    odd: asyncpg.Pool, database_url: str, key: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], args: list[str], message: str,
) -> None:  # fmt: skip
    await odd.execute(f'CREATE TABLE "{ODD_SCHEMA}".typed (id int PRIMARY KEY, n int)')
    monkeypatch.setenv("ENCRYPTION_KEY", key)
    before = await odd_values(odd)
    for command in ("encrypt", "verify"):
        assert await asyncio.to_thread(main, [command, *args, "--database-url", database_url]) == 2
        assert message in capsys.readouterr().err
    assert await odd_values(odd) == before
    assert await odd.fetchval("SELECT to_regclass('tenantstore_secret_runs')") is None


async def test_a_secret_column_that_is_not_text_exits_2(
    odd: asyncpg.Pool, database_url: str, key: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    await odd.execute(f'CREATE TABLE "{ODD_SCHEMA}".typed (id int PRIMARY KEY, n int)')
    monkeypatch.setenv("ENCRYPTION_KEY", key)
    args = ["--table", '"Odd Schema".typed', "--key", "id", "--column", "n"]
    assert await asyncio.to_thread(main, ["encrypt", *args, "--database-url", database_url]) == 2
    assert "is int4: secret columns must be text or varchar" in capsys.readouterr().err


def spawn(args: list[str], url: str, key: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tenantstore.migrate", *args, "--database-url", url],
        env={**os.environ, "ENCRYPTION_KEY": key},
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
async def test_two_sharded_runners_split_an_application_table(
    odd: asyncpg.Pool, database_url: str, key: str, tmp_path: Path
) -> None:
    await odd.execute(
        f"""INSERT INTO "{ODD_SCHEMA}"."Order"
        SELECT 'm' || i, 'ord-m' || i, 'wei-m' || i, 'o' FROM generate_series(1, 20000) AS i"""
    )
    before = await odd_values(odd)
    runners = [
        spawn(["encrypt", "--json", "--shard", f"{i}/2", "--batch-size", "500", *ODD_ARGS],
              database_url, key, tmp_path)
        for i in range(2)
    ]  # fmt: skip
    outputs = [await asyncio.to_thread(r.communicate, timeout=180) for r in runners]
    assert [r.returncode for r in runners] == [0, 0], [err for _, err in outputs]
    reports = [json.loads(out) for out, _ in outputs]
    assert sum(r["changed"] for r in reports) == 2 * 20000 + 498
    assert all(r["skipped"] == 0 and r["rows"] > 5000 for r in reports)
    ring = KeyRing(key)
    after = await odd_values(odd)
    for (k, o, w, _), (_, o2, w2, _) in zip(before, after, strict=True):
        assert o is None or ring.decrypt(o2) == o, k
        assert w == w2 == "" or ring.decrypt(w2) == w, k


@pytest.mark.slow
async def test_kill_9_during_a_four_column_encrypt_then_rerun(
    tenants: asyncpg.Pool, database_url: str, key: str, tmp_path: Path
) -> None:
    await fill_tenants(tenants, 40_000)
    original = await tenant_values(tenants)
    runner = spawn(["encrypt", "--batch-size", "500"], database_url, key, tmp_path)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done = await tenants.fetchval(
            "SELECT count(*) FROM tenants WHERE gemini_api_key NOT LIKE 'secret-%'"
        )
        if done >= 3000:
            break
        await asyncio.sleep(0.02)
    runner.send_signal(signal.SIGKILL)
    await asyncio.to_thread(runner.wait)
    while await tenants.fetchval(  # noqa: ASYNC110 - the last statement may still commit
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'tenantstore-migrate'"
    ):
        await asyncio.sleep(0.02)
    ring = KeyRing(key)
    midway = await tenant_values(tenants)
    done = sum(v[0] != original[k][0] for k, v in midway.items())
    assert 0 < done < len(original), "the kill should land mid-run"
    for tenant_id, values in midway.items():  # each value original or one token of it
        for stored, first in zip(values, original[tenant_id], strict=True):
            assert stored == first or ring.decrypt(stored) == first
    rerun = spawn(["encrypt", "--quiet"], database_url, key, tmp_path)
    _, err = await asyncio.to_thread(rerun.communicate, timeout=180)
    assert rerun.returncode == 0, err
    final = await tenant_values(tenants)
    assert {k: tuple(plain(ring, v) for v in vs) for k, vs in final.items()} == original


async def test_a_writer_changing_one_column_while_another_is_encrypted_loses_nothing(
    tenants: asyncpg.Pool, keyring: KeyRing
) -> None:
    """The runner does oauth_refresh_token only; the application rewrites webhook secrets."""
    await fill_tenants(tenants, 3000, missing_every=100)
    written: dict[str, str] = {}
    stop = asyncio.Event()

    async def writer() -> None:
        i = 0
        while not stop.is_set():
            tenant_id = f"t{(i * 7919) % 3000:07d}"
            token = keyring.encrypt(f"app-{i}")
            await tenants.execute(
                "UPDATE tenants SET webhook_signing_secret = $2, oauth_refresh_token = "
                "CASE WHEN $3 THEN 'fresh-' || tenant_id ELSE oauth_refresh_token END "
                "WHERE tenant_id = $1",
                tenant_id, token, i % 3 == 0,
            )  # fmt: skip
            written[tenant_id] = token
            i += 1
            await asyncio.sleep(0)

    task = asyncio.ensure_future(writer())
    report = await encrypt_secrets(
        tenants, keyring, columns=["oauth_refresh_token"], batch_size=100
    )
    stop.set()
    await task
    assert report.rows == 3000 and report.changed_concurrently == 0
    final = await tenant_values(tenants)
    for tenant_id, token in written.items():
        assert final[tenant_id][3] == token  # the application's write stands
    for tenant_id, values in final.items():
        # Encrypted, or plaintext the application wrote after the runner passed the row.
        refresh = values[2] if values[2] == f"fresh-{tenant_id}" else keyring.decrypt(values[2])
        assert refresh in (value(int(tenant_id[1:]), 2), f"fresh-{tenant_id}")


async def test_plaintext_left_by_decrypt_is_never_taken_for_a_token(
    tenants: asyncpg.Pool, keyring: KeyRing
) -> None:
    """A secret that is itself a Fernet token stays encrypted on decrypt, listed by key/column."""
    inner = Fernet(Fernet.generate_key()).encrypt(b"a token from another system").decode()
    await tenants.execute(
        "INSERT INTO tenants (tenant_id, name, oauth_access_token, gemini_api_key) "
        "VALUES ('x', 'X', $1, $2)",
        keyring.encrypt(inner),
        keyring.encrypt("plain-key"),
    )
    report = await decrypt_secrets(tenants, keyring)
    assert [(f.key, f.column, f.reason) for f in report.failures] == [
        ("x", "oauth_access_token", "token-like")
    ]
    row = (await tenant_values(tenants))["x"]
    assert row[0] == "plain-key" and keyring.decrypt(row[1]) == inner
    assert stored_token(row[1]) == row[1]
