"""`python -m tenantstore.migrate` as an operator meets it: real subprocesses, a pty, signals.

What each run prints (and what it never prints), exit codes, `status` being
read-only, a wrong key, Ctrl-C, `--help`, and the progress bar on a terminal.
"""

from __future__ import annotations

import asyncio
import json
import os
import pty
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import pytest
from cryptography.fernet import Fernet

from tenantstore import KeyRing
from tenantstore.encryption import is_encrypted
from tenantstore.migrate import load_migrations, upgrade
from tenantstore.migrate.__main__ import _parser, main


def api_key(i: int) -> str:
    return f"AIzaSy{i:033d}"


def run_cli(
    args: list[str], url: str, env: dict[str, str], cwd: Path
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tenantstore.migrate", *args, "--database-url", url],
        env={**os.environ, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def spawn(args: list[str], url: str, env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tenantstore.migrate", *args, "--database-url", url],
        env={**os.environ, **env},
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
async def table(pool: asyncpg.Pool, keyring: KeyRing) -> asyncpg.Pool:
    """The schema up to 0003, so tests choose what is in the table."""
    await upgrade(pool, keyring, target=3)
    return pool


async def fill(pool: asyncpg.Pool, ids: list[str], values: list[str | None]) -> None:
    await pool.execute(
        "INSERT INTO tenants (tenant_id, name, gemini_api_key) "
        "SELECT id, 'name', v FROM unnest($1::text[], $2::text[]) AS u(id, v)",
        ids,
        values,
    )


async def snapshot(pool: asyncpg.Pool) -> list[tuple[object, ...]]:
    return [tuple(r) for r in await pool.fetch("SELECT * FROM tenants ORDER BY tenant_id")]


# -- log injection ---------------------------------------------------------------------

FORGED_ID = "x\nINFO Verification complete: 999 current key\r\x1b[2KERROR spoofed"


async def test_verify_output_cannot_be_forged_by_a_tenant_id(
    database_url: str, table: asyncpg.Pool, key: str, tmp_path: Path
) -> None:
    """A legacy row whose id holds a newline, a carriage return and an ANSI escape, with
    an undecryptable token: `verify` and `status` print it escaped on one line, so no
    output line starts with the forged `INFO Verification complete: 999`."""
    foreign = Fernet(Fernet.generate_key()).encrypt(b"lost").decode()
    await fill(table, [FORGED_ID, "ok"], [foreign, KeyRing(key).encrypt("fine")])
    env = {"ENCRYPTION_KEY": key}
    verify = await asyncio.to_thread(run_cli, ["verify"], database_url, env, tmp_path)
    status = await asyncio.to_thread(run_cli, ["status"], database_url, env, tmp_path)
    as_json = await asyncio.to_thread(run_cli, ["verify", "--json"], database_url, env, tmp_path)
    assert verify.returncode == 1 and status.returncode == 0, verify.stderr + status.stderr
    for result in (verify, status):
        output = result.stdout + result.stderr
        assert "\r" not in output and "\x1b" not in output
        for line in output.splitlines():
            assert not re.match(r"(INFO |ERROR )?Verification complete: 999", line), line
            assert not line.startswith("ERROR spoofed")
    assert any(
        "Failed to decrypt" in line and "x\\nINFO Verification complete" in line
        for line in verify.stderr.splitlines()
    ), verify.stderr
    assert "x\\nINFO" in status.stdout
    assert json.loads(as_json.stdout)["failed_tenant_ids"] == [FORGED_ID]  # exact, in JSON


# -- a wrong key -------------------------------------------------------------------------


@pytest.fixture
async def wrong_key_table(table: asyncpg.Pool) -> tuple[asyncpg.Pool, list[str]]:
    """5000 rows, two secrets each, encrypted under a key the runs will not be given."""
    other = KeyRing(Fernet.generate_key().decode())
    ids = [f"t{i:05d}" for i in range(5000)]
    tokens = other.encrypt_batch([api_key(i) for i in range(5000)])
    await fill(table, ids, tokens)  # type: ignore[arg-type]
    await table.execute("UPDATE tenants SET oauth_access_token = gemini_api_key")
    return table, ids


@pytest.mark.slow
async def test_wrong_key_verify_says_so_early_and_does_not_flood(
    database_url: str, wrong_key_table: tuple[asyncpg.Pool, list[str]], key: str, tmp_path: Path
) -> None:
    """With a key that decrypts nothing, `verify` says once, before any failure line,
    that the key looks wrong; logs at most 10 failures one by one and one count line;
    exits 1; and `--json` still lists every failure by key and column."""
    _pool, ids = wrong_key_table
    env = {"ENCRYPTION_KEY": key}
    result = await asyncio.to_thread(run_cli, ["verify"], database_url, env, tmp_path)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    hint = [
        i
        for i, line in enumerate(lines)
        if "Invalid encrypted data or wrong encryption key" in line
    ]
    failed = [i for i, line in enumerate(lines) if "Failed to decrypt" in line]
    more = [line for line in lines if "more secrets failed" in line]
    assert len(hint) == 1 and failed and hint[0] < failed[0], result.stderr
    assert len(failed) <= 10, len(failed)
    assert len(more) == 1 and f"{10_000 - len(failed)} more" in more[0], more
    assert len(lines) < 40, "stderr is flooded"
    assert "10000 undecryptable" in result.stdout

    as_json = await asyncio.to_thread(run_cli, ["verify", "--json"], database_url, env, tmp_path)
    report = json.loads(as_json.stdout)
    assert report["failed"] == 10_000
    listed = {(f["key"], f["column"]) for f in report["failures"]}
    assert listed == {(i, c) for i in ids for c in ("gemini_api_key", "oauth_access_token")}


@pytest.mark.parametrize("operation", ["decrypt", "rotate"])
@pytest.mark.slow
async def test_wrong_key_decrypt_and_rotate_stop_at_the_first_page_changing_nothing(
    database_url: str, wrong_key_table: tuple[asyncpg.Pool, list[str]], key: str,
    old_key: str, tmp_path: Path, operation: str,
) -> None:  # fmt: skip
    """`decrypt` and `rotate` with keys that decrypt none of the first page stop there:
    exit 1, one error saying the key looks wrong, no row changed; `status` then shows
    the run as failed, not as interrupted with advice that a rerun would finish it."""
    pool, _ = wrong_key_table
    before = await snapshot(pool)
    env = {"ENCRYPTION_KEY": key, "OLD_ENCRYPTION_KEY": old_key}
    args = [operation, "--batch-size", "500"]
    result = await asyncio.to_thread(run_cli, args, database_url, env, tmp_path)
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "nothing changed" in errors[0]
    assert "Invalid encrypted data or wrong encryption key" in errors[0]
    assert result.stderr.count("Failed to decrypt") <= 10
    assert "Traceback" not in result.stderr
    assert await snapshot(pool) == before
    status = await asyncio.to_thread(run_cli, ["status"], database_url, env, tmp_path)
    last = [line for line in status.stdout.splitlines() if line.startswith(f"Last {operation}")]
    assert len(last) == 1 and f"Last {operation} of tenants: failed" in last[0], status.stdout
    assert "INTERRUPTED" not in last[0] and "to finish" not in last[0]


# -- status is read-only -------------------------------------------------------------------


async def relations(pool: asyncpg.Pool) -> list[str]:
    rows = await pool.fetch(
        "SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace ORDER BY 1"
    )
    return [r[0] for r in rows]


async def test_status_on_a_fresh_database_creates_nothing(
    database_url: str, pool: asyncpg.Pool, key: str, tmp_path: Path
) -> None:
    """`status` on an empty database, with and without a key, creates no table."""
    for env in ({"ENCRYPTION_KEY": key}, {}):
        result = await asyncio.to_thread(run_cli, ["status"], database_url, env, tmp_path)
        assert result.returncode == 0, result.stderr
        assert "Schema version: 0" in result.stdout
    assert await relations(pool) == []


async def test_status_records_nothing_and_keeps_the_last_verify(
    database_url: str, pool: asyncpg.Pool, key: str, tmp_path: Path
) -> None:
    """Repeated `status` calls add no run to `tenantstore_secret_runs`; its
    "Last verify" line keeps showing the last real `verify`."""
    env = {"ENCRYPTION_KEY": key}
    await upgrade(pool, KeyRing(key))
    await fill(pool, [f"t{i:04d}" for i in range(1000)], KeyRing(key).encrypt_batch(["k"] * 1000))  # type: ignore[arg-type]
    verify = await asyncio.to_thread(run_cli, ["verify"], database_url, env, tmp_path)
    assert verify.returncode == 0, verify.stderr
    runs = await pool.fetchval("SELECT count(*) FROM tenantstore_secret_runs")
    last_verify = []
    for _ in range(3):
        status = await asyncio.to_thread(run_cli, ["status"], database_url, env, tmp_path)
        assert status.returncode == 0, status.stderr
        assert "1000 current key" in status.stdout
        last_verify += [
            line for line in status.stdout.splitlines() if line.startswith("Last verify")
        ]
    assert await pool.fetchval("SELECT count(*) FROM tenantstore_secret_runs") == runs
    assert len(last_verify) == 3 and len(set(last_verify)) == 1, last_verify
    assert "completed" in last_verify[0] and "1000 rows done" in last_verify[0]


async def test_status_after_down_to_zero_says_the_table_is_gone(
    database_url: str, pool: asyncpg.Pool, key: str, tmp_path: Path
) -> None:
    """After `down N --yes` to version 0, with the key set, `status` says the table does not exist,
    not that ENCRYPTION_KEY is missing."""
    env = {"ENCRYPTION_KEY": key}
    assert (await asyncio.to_thread(run_cli, ["up"], database_url, env, tmp_path)).returncode == 0
    every = str(len(load_migrations()))
    down = await asyncio.to_thread(run_cli, ["down", every, "--yes"], database_url, env, tmp_path)
    assert down.returncode == 0, down.stderr
    status = await asyncio.to_thread(run_cli, ["status"], database_url, env, tmp_path)
    assert status.returncode == 0, status.stderr
    assert "Schema version: 0" in status.stdout
    counted = [line for line in status.stdout.splitlines() if line.startswith("Secrets in")]
    assert len(counted) == 1 and "does not exist" in counted[0], status.stdout
    assert "ENCRYPTION_KEY" not in status.stdout + status.stderr
    without_key = await asyncio.to_thread(run_cli, ["status"], database_url, {}, tmp_path)
    assert "ENCRYPTION_KEY not set" in without_key.stdout  # and that reason only without one


async def test_status_json_is_versioned_with_per_column_counts(
    database_url: str, pool: asyncpg.Pool, key: str, tmp_path: Path
) -> None:
    """`status --json` carries `"schema": 1` and the counts of every secret column."""
    await upgrade(pool, KeyRing(key))
    await fill(pool, ["a", "b"], [KeyRing(key).encrypt("k"), "legacy-plain"])
    env = {"ENCRYPTION_KEY": key}
    result = await asyncio.to_thread(run_cli, ["status", "--json"], database_url, env, tmp_path)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["schema"] == 1 and data["version"] == load_migrations()[-1].version
    columns = data["counts"]["columns"]
    assert set(columns) == {
        "gemini_api_key", "oauth_access_token", "oauth_refresh_token", "webhook_signing_secret"
    }  # fmt: skip
    assert columns["gemini_api_key"]["current"] == 1 and columns["gemini_api_key"]["plaintext"] == 1
    assert columns["oauth_access_token"]["current"] == 0


# -- Ctrl-C ---------------------------------------------------------------------------------


@pytest.mark.slow
async def test_ctrl_c_mid_run_exits_130_with_one_line_and_a_rerun_completes(
    database_url: str, table: asyncpg.Pool, key: str, tmp_path: Path
) -> None:
    """SIGINT during `encrypt`: exit 130, one `interrupted:` line saying how to resume,
    no traceback; every value is its plaintext or one token of it; a rerun finishes."""
    values = [api_key(i) for i in range(100_000)]
    ids = [f"t{i:06d}" for i in range(len(values))]
    await fill(table, ids, values)  # type: ignore[arg-type]
    runner = spawn(
        ["encrypt", "--batch-size", "100"], database_url, {"ENCRYPTION_KEY": key}, tmp_path
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done = await table.fetchval(
            "SELECT count(*) FROM tenants WHERE gemini_api_key NOT LIKE 'AIza%'"
        )
        if done >= 2000:
            break
        await asyncio.sleep(0.02)
    runner.send_signal(signal.SIGINT)
    _out, err = await asyncio.to_thread(runner.communicate, timeout=60)
    assert runner.returncode == 130, err
    interrupted = [line for line in err.splitlines() if line.startswith("interrupted:")]
    assert len(interrupted) == 1 and "run the same command again" in interrupted[0], err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "Exception ignored" not in err and "Task was destroyed" not in err, err
    ring = KeyRing(key)
    rows = {r[0]: r[1] for r in await table.fetch("SELECT tenant_id, gemini_api_key FROM tenants")}
    encrypted = sum(is_encrypted(v) for v in rows.values())
    assert 0 < encrypted < len(values), "the interrupt should land mid-run"
    for tenant_id, value in rows.items():
        original = values[int(tenant_id[1:])]
        assert value == original or ring.decrypt(value) == original
    rerun = await asyncio.to_thread(
        run_cli, ["encrypt", "--quiet"], database_url, {"ENCRYPTION_KEY": key}, tmp_path
    )
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stdout.strip().splitlines()[-1] == (
        f"Migration complete: {len(values) - encrypted} keys encrypted, "
        f"{encrypted} already encrypted"
    )


# -- --help ------------------------------------------------------------------------------------

SUBCOMMANDS = ["up", "down", "status", "encrypt", "decrypt", "rotate", "verify"]


def option_help(
    command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> dict[str, str]:
    """`--help` of a subcommand as {option or positional: its help text, unwrapped}."""
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    entries: dict[str, str] = {}
    names: list[str] = []
    for line in capsys.readouterr().out.splitlines():
        entry = re.match(r"  (\S.*?)(?: {2,}(\S.*))?$", line)
        if entry and not line.startswith("   "):
            names = [part.split(" ")[0] for part in entry[1].split(", ")]
            for name in names:
                entries[name] = entry[2] or ""
        elif names and line.startswith("    ") and line.strip():
            for name in names:  # help wrapped under a long invocation
                entries[name] = f"{entries[name]} {line.strip()}".strip()
        else:
            names = []
    return entries


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_of_every_subcommand_explains_every_option_and_its_default(
    command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each option of each subcommand has help text and shows its default
    (`--batch-size` 2000, `--shard` 0/1, `--retry-for` 60 seconds, ...)."""
    subparser = next(
        action.choices[command]
        for action in _parser()._actions
        if isinstance(action.choices, dict) and command in action.choices
    )
    expected = [
        action.option_strings[-1] if action.option_strings else action.metavar
        for action in subparser._actions
        if "--help" not in action.option_strings
    ]
    shown = option_help(command, monkeypatch, capsys)
    for name in expected:
        assert name in shown, (name, shown)
        text = shown[name]
        assert re.search(r"\w{3,}.*\(default: [^)]+\)", text), (name, text)
    if "--batch-size" in shown:
        assert "(default: 2000)" in shown["--batch-size"]
        assert "(default: 0/1)" in shown["--shard"]
        assert re.search(r"\(default: 60(\.0)?\)", shown["--retry-for"])


# -- down: the plaintext warning only where secrets are decrypted ---------------------------


async def test_down_warns_about_plaintext_only_for_steps_that_decrypt(
    database_url: str, pool: asyncpg.Pool, key: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """`down` of 0004 and of 0002 (which decrypt) warns that secrets will be stored in
    plaintext; `down` of 0003 and of 0001 (which decrypt nothing) does not."""
    monkeypatch.setenv("ENCRYPTION_KEY", key)
    await upgrade(pool, KeyRing(key), target=4)
    await pool.execute(
        "INSERT INTO tenants (tenant_id, name, gemini_api_key) VALUES ('a', 'A', $1)",
        KeyRing(key).encrypt("k"),
    )
    capsys.readouterr()
    warned = {}
    for step in ("0004", "0003", "0002", "0001"):
        args = ["down", "--yes", "--database-url", database_url]
        assert await asyncio.to_thread(main, args) == 0, step
        err = capsys.readouterr().err
        assert f"Reverting {step}" in err
        warned[step] = "PLAINTEXT" in err.upper() and "plaintext" in err.lower()
    assert warned == {"0004": True, "0003": False, "0002": True, "0001": False}


# -- progress on a terminal ---------------------------------------------------------------

CSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")


def screen(raw: bytes) -> list[str]:
    """What a terminal shows after `raw`: carriage returns overwrite, newlines advance."""
    lines: list[list[str]] = [[]]
    column = 0
    for char in CSI.sub(b"", raw).decode(errors="replace"):
        if char == "\r":
            column = 0
        elif char == "\n":
            lines.append([])
            column = 0
        else:
            line = lines[-1]
            line.extend(" " * (column - len(line) + 1))
            line[column] = char
            column += 1
    return ["".join(line).rstrip() for line in lines]


async def run_on_pty(
    args: list[str], url: str, env: dict[str, str], cwd: Path
) -> tuple[int, bytes]:
    """Run the CLI with stdout and stderr on one pseudo-terminal; its code and all it wrote."""
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(  # noqa: ASYNC220 - starting it does not block; waiting is threaded
        [sys.executable, "-m", "tenantstore.migrate", *args, "--database-url", url],
        env={**os.environ, **env},
        cwd=cwd,
        stdout=terminal,
        stderr=terminal,
    )
    os.close(terminal)

    def read_all() -> bytes:
        chunks = []
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    raw = await asyncio.to_thread(read_all)
    code = await asyncio.to_thread(proc.wait, 60)
    os.close(controller)
    return code, raw


BAR = re.compile(r"\d+%\|")


def frames(raw: bytes, label: str) -> list[str]:
    """Every bar frame drawn for `label`, in order."""
    text = CSI.sub(b"", raw).decode(errors="replace")
    return [part for part in re.split(r"[\r\n]", text) if part.startswith(f"{label}:")]


def assert_no_mixed_lines(lines: list[str]) -> None:
    for line in lines:
        if BAR.search(line):
            assert not re.search(r"(INFO|WARNING|ERROR) ", line), f"a log line in the bar: {line!r}"
        if re.search(r"(INFO|WARNING|ERROR) ", line):
            assert re.match(r"(INFO|WARNING|ERROR) ", line), f"a log line mid-line: {line!r}"


async def test_bar_on_a_terminal_has_a_total_and_ends_before_the_summary(
    database_url: str, table: asyncpg.Pool, key: str, tmp_path: Path
) -> None:
    """On a terminal: the bar shows its total from the first frame, and the summary
    (log line and stdout) comes after the bar is closed, with no frame after it."""
    await fill(table, [f"t{i:04d}" for i in range(300)], [api_key(i) for i in range(300)])
    code, raw = await run_on_pty(
        ["encrypt", "--batch-size", "50"], database_url, {"ENCRYPTION_KEY": key}, tmp_path
    )
    assert code == 0, raw
    drawn = frames(raw, "encrypt")
    assert drawn and all("/300" in frame for frame in drawn), drawn[:3]
    summary = b"Migration complete: 300 keys encrypted, 0 already encrypted"
    end = raw.rindex(summary)
    assert not frames(raw[end:], "encrypt") and b"rows/s" not in raw[end:]
    lines = [line for line in screen(raw) if line]
    assert lines[-1] == summary.decode(), lines[-3:]
    bars = [i for i, line in enumerate(lines) if BAR.search(line)]
    logged = [i for i, line in enumerate(lines) if line.startswith("INFO Migration complete")]
    assert bars and "300/300" in lines[bars[-1]], lines
    assert len(logged) == 1 and bars[-1] < logged[0] < len(lines) - 1, lines
    assert_no_mixed_lines(lines)


async def test_log_lines_during_a_bar_land_on_lines_of_their_own(
    database_url: str, table: asyncpg.Pool, key: str, tmp_path: Path
) -> None:
    """Failures logged while the bar is drawn (verify) and the steps `up` logs between
    its data steps' bars each get a whole line: never inside a bar's line."""
    ring = KeyRing(key)
    values = ring.encrypt_batch([api_key(i) for i in range(300)])
    for i in (60, 150, 240):
        values[i] = Fernet(Fernet.generate_key()).encrypt(b"lost").decode()
    await fill(table, [f"t{i:04d}" for i in range(300)], values)  # type: ignore[arg-type]
    env = {"ENCRYPTION_KEY": key}
    code, raw = await run_on_pty(["verify", "--batch-size", "30"], database_url, env, tmp_path)
    assert code == 1, raw
    lines = [line for line in screen(raw) if line]
    failures = [line for line in lines if "Failed to decrypt" in line]
    assert len(failures) == 3 and all(line.startswith("ERROR ") for line in failures), lines
    assert_no_mixed_lines(lines)
    assert lines[-1].startswith("Verification complete: 297 current key")

    await table.execute("DELETE FROM tenantstore_migrations WHERE version = 2")
    await table.execute("UPDATE tenants SET gemini_api_key = 'legacy-' || tenant_id")
    code, raw = await run_on_pty(["up", "--batch-size", "30"], database_url, env, tmp_path)
    assert code == 0, raw
    lines = [line for line in screen(raw) if line]
    assert any(line.startswith("INFO Applying 0002") for line in lines), lines
    assert_no_mixed_lines(lines)
    assert frames(raw, "up") and all("/300" in frame for frame in frames(raw, "up"))
