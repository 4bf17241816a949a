"""The secrets batch runner: encrypt, decrypt, rotate, verify against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import pytest
from cryptography.fernet import Fernet

from tenantstore import KeyRing, MigrationError
from tenantstore.encryption import is_encrypted
from tenantstore.migrate import (
    decrypt_secrets,
    encrypt_secrets,
    migration_status,
    rotate_secrets,
    upgrade,
    verify_secrets,
)
from tenantstore.migrate.__main__ import main


def api_key(i: int) -> str:
    return f"AIzaSy{i:033d}"


@pytest.fixture
async def table(pool: asyncpg.Pool, keyring: KeyRing) -> asyncpg.Pool:
    """The schema without the last data step, so tests choose what is in the table."""
    await upgrade(pool, keyring, target=3)
    return pool


async def fill(pool: asyncpg.Pool, values: list[str | None], prefix: str = "t") -> list[str]:
    ids = [f"{prefix}{i:07d}" for i in range(len(values))]
    await pool.execute(
        "INSERT INTO tenants (tenant_id, name, gemini_api_key) "
        "SELECT id, 'name', v FROM unnest($1::text[], $2::text[]) AS u(id, v)",
        ids,
        values,
    )
    return ids


async def contents(pool: asyncpg.Pool) -> dict[str, str | None]:
    rows = await pool.fetch("SELECT tenant_id, gemini_api_key FROM tenants ORDER BY 1")
    return {r[0]: r[1] for r in rows}


async def test_encrypt_then_rerun_is_idempotent(table: asyncpg.Pool, keyring: KeyRing) -> None:
    values: list[str | None] = [api_key(i) for i in range(25)] + [None, ""]
    ids = await fill(table, values)
    calls: list[tuple[int, int]] = []
    report = await encrypt_secrets(
        table, keyring, batch_size=7, progress=lambda d, t: calls.append((d, t))
    )
    assert report.summary() == "Migration complete: 25 keys encrypted, 0 already encrypted"
    assert calls[0] == (0, 25) and calls[-1] == (25, 25) and len(calls) == 5
    stored = await contents(table)
    assert stored[ids[25]] is None and stored[ids[26]] == ""
    for tenant_id, value in zip(ids[:25], values[:25], strict=True):
        assert is_encrypted(stored[tenant_id]) and keyring.decrypt(stored[tenant_id]) == value  # type: ignore[arg-type]
    again = await encrypt_secrets(table, keyring, batch_size=7)
    assert again.summary() == "Migration complete: 0 keys encrypted, 25 already encrypted"
    assert await contents(table) == stored


async def test_decrypt_is_the_rollback(table: asyncpg.Pool, keyring: KeyRing) -> None:
    values: list[str | None] = [api_key(i) for i in range(10)]
    await fill(table, values)
    await encrypt_secrets(table, keyring, batch_size=4)
    await fill(table, ["plain-already"], prefix="p")
    report = await decrypt_secrets(table, keyring, batch_size=4)
    assert report.summary() == "Migration complete: 10 keys decrypted, 1 already plaintext"
    stored = await contents(table)
    assert sorted(v for v in stored.values() if v) == sorted([*values, "plain-already"])  # type: ignore[type-var]


async def test_rotate_moves_every_token_to_the_new_key(
    table: asyncpg.Pool, key: str, old_key: str
) -> None:
    old_ring = KeyRing(old_key)
    values = [api_key(i) for i in range(30)]
    await fill(table, old_ring.encrypt_batch(values[:20]) + KeyRing(key).encrypt_batch(values[20:]))
    await fill(table, ["legacy-plain"], prefix="p")
    report = await rotate_secrets(table, KeyRing(key, [old_key]), batch_size=8)
    assert report.summary() == "Rotation complete: 20 keys rotated, 10 already current"
    assert report.plaintext == 1
    new_only = KeyRing(key)
    stored = await contents(table)
    decrypted = [new_only.decrypt(v) for k, v in stored.items() if not k.startswith("p")]  # type: ignore[arg-type]
    assert sorted(decrypted) == sorted(values)
    again = await rotate_secrets(table, KeyRing(key, [old_key]))
    assert again.summary() == "Rotation complete: 0 keys rotated, 30 already current"


async def test_verify_counts_every_kind_and_lists_undecryptable(
    table: asyncpg.Pool, key: str, old_key: str
) -> None:
    ring = KeyRing(key, [old_key])
    await fill(table, KeyRing(key).encrypt_batch(["a", "b", "c"]), prefix="cur")
    await fill(table, KeyRing(old_key).encrypt_batch(["d", "e"]), prefix="old")
    await fill(table, ["plain"], prefix="pla")
    foreign = Fernet(Fernet.generate_key()).encrypt(b"secret-x").decode()
    await fill(table, [foreign], prefix="bad")
    before = await contents(table)
    report = await verify_secrets(table, ring, batch_size=2)
    assert (report.current, report.previous, report.plaintext) == (3, 2, 1)
    assert report.failed_tenant_ids == ["bad0000000"]
    assert report.summary() == (
        "Verification complete: 3 current key, 2 previous key, 1 plaintext, 1 undecryptable"
    )
    assert await contents(table) == before


async def test_undecryptable_tokens_are_left_untouched_logged_and_reported(
    table: asyncpg.Pool, keyring: KeyRing, caplog: pytest.LogCaptureFixture
) -> None:
    foreign = Fernet(Fernet.generate_key()).encrypt(b"secret-x").decode()
    ids = await fill(table, [*keyring.encrypt_batch(["a", "b"]), foreign, "garbage-but-plain"])
    with caplog.at_level(logging.INFO, logger="tenantstore"):
        report = await decrypt_secrets(table, keyring)
    assert report.failed_tenant_ids == [ids[2]]
    assert report.summary() == "Migration complete: 2 keys decrypted, 1 already plaintext, 1 failed"
    assert (await contents(table))[ids[2]] == foreign
    assert f"Failed to decrypt Gemini API key for tenant {ids[2]}" in caplog.text
    assert "secret-x" not in caplog.text and foreign not in caplog.text


def interfere(
    monkeypatch: pytest.MonkeyPatch, pool: asyncpg.Pool, tenant_id: str, values: list[str]
) -> None:
    """Make the application write `values[i]` to `tenant_id` just before the i-th batch write.

    Fault injection on the real connection: the write then runs for real and
    its compare-and-swap finds the row changed.
    """
    queue = list(values)
    original_fetch = asyncpg.connection.Connection.fetch

    async def fetch(self: asyncpg.Connection, query: str, *args: object, **kw: object) -> object:
        # Every compare-and-swap write of the page finds the row changed again.
        if query.startswith('UPDATE "public"."tenants" AS t') and queue:
            await pool.execute(
                "UPDATE tenants SET gemini_api_key = $2 WHERE tenant_id = $1",
                tenant_id,
                queue.pop(0),
            )
        return await original_fetch(self, query, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(asyncpg.connection.Connection, "fetch", fetch)


async def test_a_concurrent_application_write_is_never_overwritten(
    table: asyncpg.Pool, keyring: KeyRing, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = await fill(table, [api_key(i) for i in range(10)])
    app_token = keyring.encrypt("written-by-the-app")
    interfere(monkeypatch, table, ids[3], [app_token])
    report = await encrypt_secrets(table, keyring)
    assert (report.changed, report.skipped, report.changed_concurrently) == (9, 1, 0)
    stored = await contents(table)
    assert stored[ids[3]] == app_token
    assert keyring.decrypt(stored[ids[4]]) == api_key(4)  # type: ignore[arg-type]


async def test_plaintext_written_during_the_run_is_encrypted_in_the_same_run(
    table: asyncpg.Pool, keyring: KeyRing, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An old application version writing plaintext mid-run: the row is read again and done."""
    ids = await fill(table, [api_key(i) for i in range(10)])
    interfere(monkeypatch, table, ids[3], ["AIza-new-from-old-app"])
    report = await encrypt_secrets(table, keyring)
    assert (report.changed, report.changed_concurrently) == (10, 0)
    assert keyring.decrypt((await contents(table))[ids[3]]) == "AIza-new-from-old-app"  # type: ignore[arg-type]


async def test_a_row_that_keeps_changing_fails_the_data_step_unrecorded(
    pool: asyncpg.Pool, keyring: KeyRing, monkeypatch: pytest.MonkeyPatch
) -> None:
    await upgrade(pool, keyring, target=1)
    ids = await fill(pool, [api_key(i) for i in range(10)])
    interfere(monkeypatch, pool, ids[3], [f"AIza-churn-{i}" for i in range(10)])
    with pytest.raises(MigrationError, match="kept changing"):
        await upgrade(pool, keyring)
    assert (await migration_status(pool)).pending[0] == "0002_encrypt_gemini_api_keys"
    monkeypatch.undo()
    report = await upgrade(pool, keyring)
    assert report.applied[0] == "0002_encrypt_gemini_api_keys"


async def test_decrypt_leaves_a_secret_postgresql_cannot_store_encrypted(
    table: asyncpg.Pool, keyring: KeyRing, caplog: pytest.LogCaptureFixture
) -> None:
    ids = await fill(table, keyring.encrypt_batch(["fine-1", "bad\x00nul", "fine-2"]))
    with caplog.at_level(logging.ERROR, logger="tenantstore"):
        report = await decrypt_secrets(table, keyring)
    assert report.failed_tenant_ids == [ids[1]] and report.changed == 2
    stored = await contents(table)
    assert stored[ids[0]] == "fine-1" and keyring.decrypt(stored[ids[1]]) == "bad\x00nul"  # type: ignore[arg-type]
    assert "NUL character" in caplog.text and "bad" not in caplog.text


@asynccontextmanager
async def victim(
    database_url: str, name: str
) -> AsyncIterator[tuple[asyncpg.Pool, asyncpg.Connection]]:
    """A pool whose backends carry application_name `name`, and an admin connection to kill them."""
    pool = await asyncpg.create_pool(
        database_url, min_size=1, max_size=2, server_settings={"application_name": name}
    )
    assert pool is not None
    admin = await asyncpg.connect(database_url)
    try:
        yield pool, admin
    finally:
        await admin.close()
        await pool.close()


def terminate(admin: asyncpg.Connection, name: str) -> Awaitable[str]:
    return admin.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name = $1 AND pid <> pg_backend_pid()",
        name,
    )


async def test_terminated_backend_is_retried_and_the_run_finishes(
    database_url: str, keyring: KeyRing
) -> None:
    async with victim(database_url, "victim") as (pool, admin):
        await upgrade(pool, keyring, target=3)
        values: list[str | None] = [api_key(i) for i in range(3000)]
        await fill(pool, values)
        killed = asyncio.Event()

        async def killer() -> None:
            await killed.wait()
            await terminate(admin, "victim")

        task = asyncio.ensure_future(killer())
        report = await encrypt_secrets(
            pool, keyring, batch_size=500, progress=lambda d, t: killed.set(), retry_delay=0.01
        )
        await task
        assert report.retries >= 1
        # A page whose write committed as the connection died is found done on retry.
        assert report.changed + report.skipped == 3000 and report.changed >= 2500
        stored = await contents(pool)
        assert sorted(keyring.decrypt(v) for v in stored.values()) == sorted(values)  # type: ignore[arg-type,type-var]


async def test_exhausted_retries_stop_with_a_clear_error_and_a_rerun_completes(
    database_url: str, keyring: KeyRing
) -> None:
    async with victim(database_url, "victim2") as (pool, admin):
        await upgrade(pool, keyring, target=3)
        await fill(pool, [api_key(i) for i in range(2000)])
        kills: list[asyncio.Future[str]] = []

        def progress(done: int, total: int) -> None:
            if not kills or kills[-1].done():  # one kill at a time on the admin connection
                kills.append(asyncio.ensure_future(terminate(admin, "victim2")))

        with pytest.raises(MigrationError, match="run the command again"):
            await encrypt_secrets(pool, keyring, batch_size=100, progress=progress, retry_for=0)
        await asyncio.gather(*kills)
        report = await encrypt_secrets(pool, keyring)
        assert report.changed + report.skipped == 2000
        assert all(is_encrypted(v) for v in (await contents(pool)).values())


async def test_other_coroutines_keep_running_during_a_run(
    table: asyncpg.Pool, keyring: KeyRing
) -> None:
    await fill(table, [api_key(i) for i in range(6000)])
    ticks = 0
    stop = False

    async def ticker() -> None:
        nonlocal ticks
        while not stop:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.ensure_future(ticker())
    batches: list[int] = []
    await encrypt_secrets(table, keyring, batch_size=500, progress=lambda d, t: batches.append(d))
    stop = True
    await task
    assert batches[0] == 0 and len(batches) == 13  # the count, then one call per page
    assert ticks >= len(batches)  # the loop was never held for a whole run


async def test_bad_options_are_rejected(table: asyncpg.Pool, keyring: KeyRing) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        await encrypt_secrets(table, keyring, batch_size=0)
    with pytest.raises(ValueError, match="shard"):
        await encrypt_secrets(table, keyring, shard=(2, 2))


async def test_shards_partition_the_table(table: asyncpg.Pool, keyring: KeyRing) -> None:
    await fill(table, [api_key(i) for i in range(300)])
    reports = [await encrypt_secrets(table, keyring, shard=(i, 3)) for i in range(3)]
    assert sum(r.changed for r in reports) == 300
    assert all(r.changed > 50 for r in reports)  # hash spread, no shard empty
    assert all(r.skipped == 0 for r in reports)  # no row seen by two shards


# -- the command line, real subprocesses ----------------------------------------------


def spawn(args: list[str], url: str, env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tenantstore.migrate", *args, "--database-url", url],
        env={**os.environ, **env},
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def test_cli_summary_json_and_exit_code_for_undecryptable(
    database_url: str, table: asyncpg.Pool, key: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.setenv("ENCRYPTION_KEY", key)
    await fill(table, ["AIza-plain-1", "AIza-plain-2"])
    assert await asyncio.to_thread(main, ["encrypt", "--database-url", database_url]) == 0
    out = capsys.readouterr()
    assert out.out.strip().splitlines()[-1] == (
        "Migration complete: 2 keys encrypted, 0 already encrypted"
    )
    assert "AIza-plain" not in out.out + out.err and key not in out.out + out.err
    assert await asyncio.to_thread(main, ["verify", "--json", "--database-url", database_url]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["current"] == 2 and report["failed"] == 0
    foreign = Fernet(Fernet.generate_key()).encrypt(b"x").decode()
    await fill(table, [foreign], prefix="bad")
    assert await asyncio.to_thread(main, ["verify", "--database-url", database_url]) == 1
    assert "1 undecryptable" in capsys.readouterr().out
    assert await asyncio.to_thread(main, ["rotate", "--database-url", database_url]) == 1


@pytest.mark.slow
async def test_kill_9_mid_run_then_rerun_completes_without_damage(
    database_url: str, table: asyncpg.Pool, key: str, tmp_path: Path
) -> None:
    values = [api_key(i) for i in range(60_000)]
    await fill(table, values)  # type: ignore[arg-type]
    ring = KeyRing(key)
    runner = spawn(
        ["encrypt", "--batch-size", "500"], database_url, {"ENCRYPTION_KEY": key}, tmp_path
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done = await table.fetchval(
            "SELECT count(*) FROM tenants WHERE gemini_api_key NOT LIKE 'AIza%'"
        )
        if done >= 2000:
            break
        await asyncio.sleep(0.02)
    runner.send_signal(signal.SIGKILL)
    await asyncio.to_thread(runner.wait)
    assert runner.returncode == -signal.SIGKILL
    # A statement already sent still commits after the client died: wait for its backend.
    while await table.fetchval(  # noqa: ASYNC110 - polling the server, no event to wait on
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'tenantstore-migrate'"
    ):
        await asyncio.sleep(0.02)
    stored = await contents(table)
    encrypted = [v for v in stored.values() if is_encrypted(v)]
    assert 0 < len(encrypted) < len(values), "the kill should land mid-run"
    # Every value is either its original plaintext or one token of it: never lost or doubled.
    for tenant_id, value in stored.items():
        original = values[int(tenant_id[1:])]
        assert value == original or ring.decrypt(value) == original  # type: ignore[arg-type]
    status = await migration_status(table)
    assert [run["interrupted"] for run in status.runs if run["operation"] == "encrypt"] == [True]
    rerun = spawn(["encrypt", "--quiet"], database_url, {"ENCRYPTION_KEY": key}, tmp_path)
    out, err = await asyncio.to_thread(rerun.communicate, timeout=120)
    assert rerun.returncode == 0, err
    assert out.strip().splitlines()[-1] == (
        f"Migration complete: {len(values) - len(encrypted)} keys encrypted, "
        f"{len(encrypted)} already encrypted"
    )
    stored = await contents(table)
    assert [ring.decrypt(stored[f"t{i:07d}"]) for i in range(len(values))] == values  # type: ignore[arg-type]


async def run_together(
    commands: list[list[str]], url: str, key: str, cwd: Path
) -> list[dict[str, int]]:
    """Start runner processes at once; wait for all; return their JSON reports."""
    env = {"ENCRYPTION_KEY": key}
    runners = [spawn(["encrypt", "--json", *args], url, env, cwd) for args in commands]
    outputs = [await asyncio.to_thread(r.communicate, timeout=180) for r in runners]
    assert [r.returncode for r in runners] == [0] * len(runners), [err for _, err in outputs]
    return [json.loads(out) for out, _ in outputs]


@pytest.mark.slow
async def test_two_runner_processes_split_the_table_by_shard(
    database_url: str, table: asyncpg.Pool, key: str, tmp_path: Path
) -> None:
    values = [api_key(i) for i in range(20_000)]
    await fill(table, values)  # type: ignore[arg-type]
    shards = [["--shard", f"{i}/2", "--batch-size", "500"] for i in range(2)]
    reports = await run_together(shards, database_url, key, tmp_path)
    assert sum(r["changed"] for r in reports) == len(values)
    assert all(r["skipped"] == 0 and r["changed_concurrently"] == 0 for r in reports)
    ring = KeyRing(key)
    stored = await contents(table)
    assert [ring.decrypt(stored[f"t{i:07d}"]) for i in range(len(values))] == values  # type: ignore[arg-type]


@pytest.mark.slow
async def test_two_unsharded_runners_at_once_never_double_encrypt(
    database_url: str, table: asyncpg.Pool, key: str, tmp_path: Path
) -> None:
    values = [api_key(i) for i in range(20_000)]
    await fill(table, values)  # type: ignore[arg-type]
    same = [["--batch-size", "500"], ["--batch-size", "500"]]
    reports = await run_together(same, database_url, key, tmp_path)
    assert sum(r["changed"] for r in reports) == len(values)
    ring = KeyRing(key)
    stored = await contents(table)
    assert [ring.decrypt(stored[f"t{i:07d}"]) for i in range(len(values))] == values  # type: ignore[arg-type]


async def test_cli_progress_is_logged_when_not_on_a_terminal(
    database_url: str, table: asyncpg.Pool, key: str, tmp_path: Path
) -> None:
    await fill(table, [api_key(i) for i in range(100)])
    proc = spawn(["encrypt", "--batch-size", "10"], database_url, {"ENCRYPTION_KEY": key}, tmp_path)
    out, err = await asyncio.to_thread(proc.communicate, timeout=60)
    assert proc.returncode == 0, err
    assert "encrypt: 100/100 rows (100.0%)" in err  # the final progress line
    assert "\r" not in err  # no progress bar off a terminal
    quiet = spawn(["verify", "--quiet"], database_url, {"ENCRYPTION_KEY": key}, tmp_path)
    out, err = await asyncio.to_thread(quiet.communicate, timeout=60)
    assert (quiet.returncode == 0 and err.strip() == "") or "WARNING" in err
    assert (
        out.strip().splitlines()[-1]
        == "Verification complete: 100 current key, 0 previous key, 0 plaintext, 0 undecryptable"
    )


async def test_cli_draws_a_progress_bar_on_a_terminal(
    database_url: str, table: asyncpg.Pool, key: str, tmp_path: Path
) -> None:
    """On a terminal stderr gets a tqdm bar with rows done / total and a rate."""
    import pty

    await fill(table, [api_key(i) for i in range(300)])
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(  # noqa: ASYNC220 - starting it does not block; waiting is threaded
        [sys.executable, "-m", "tenantstore.migrate", "encrypt", "--batch-size", "50",
         "--database-url", database_url],
        env={**os.environ, "ENCRYPTION_KEY": key},
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=terminal,
        text=True,
    )  # fmt: skip
    os.close(terminal)
    out, _ = await asyncio.to_thread(proc.communicate, timeout=60)
    chunks = []
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(controller)
    screen = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0
    assert "300/300" in screen and "rows/s" in screen
    assert out.strip().splitlines()[-1] == (
        "Migration complete: 300 keys encrypted, 0 already encrypted"
    )


async def test_database_url_option_overrides_the_environment(
    database_url: str, table: asyncpg.Pool, key: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.setenv("ENCRYPTION_KEY", key)
    monkeypatch.setenv("DATABASE_URL", "postgresql://nobody@/nowhere?host=/nonexistent")
    assert await asyncio.to_thread(main, ["verify", "--database-url", database_url]) == 0
    assert await asyncio.to_thread(main, ["verify"]) == 1
    assert "nowhere" in capsys.readouterr().err


async def test_verify_require_current_fails_while_old_key_tokens_remain(
    database_url: str, table: asyncpg.Pool, key: str, old_key: str,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    await fill(table, KeyRing(old_key).encrypt_batch(["a", "b"]))
    monkeypatch.setenv("ENCRYPTION_KEY", key)
    monkeypatch.setenv("OLD_ENCRYPTION_KEY", old_key)
    args = ["verify", "--require-current", "--database-url", database_url]
    assert await asyncio.to_thread(main, ["verify", "--database-url", database_url]) == 0
    assert await asyncio.to_thread(main, args) == 1
    assert "2 previous-key" in capsys.readouterr().err
    assert await asyncio.to_thread(main, ["rotate", "--database-url", database_url]) == 0
    assert await asyncio.to_thread(main, args) == 0
