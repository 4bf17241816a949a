"""python -m tenantstore.audit: tail, query, sessions, prune; the table's append-only guard;
migration 0006's down step."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from tenantstore import ConfigurationError, DestructiveMigrationError, KeyRing
from tenantstore.audit import AuditEvent
from tenantstore.audit.__main__ import main, parse_when
from tenantstore.audit.pg import PostgresSink
from tenantstore.migrate import downgrade, upgrade

NOW = datetime.now(UTC)


def event(key: str, hours_ago: float, actor: str | None, operation: str = "read") -> AuditEvent:
    return AuditEvent(
        operation,  # type: ignore[arg-type]
        "tenants",
        "gemini_api_key",
        key,
        "kid",
        "ok",
        actor=actor,
        at=NOW - timedelta(hours=hours_ago),
    )


LOGGED = [
    event("acme", 3, "user:1"),
    event("globex", 2.5, "user:2", "write"),
    event("acme", 2, "user:2", "clear"),
    event("evil\nkey", 1, None),
    event("acme", 0.5, "user:1"),
]


@pytest.fixture
async def logged(pool: asyncpg.Pool, keyring: KeyRing) -> asyncpg.Pool:
    """A migrated database holding LOGGED, written by one closed sink."""
    await upgrade(pool, keyring)
    sink = PostgresSink(pool)
    await sink.emit(LOGGED)
    await sink.aclose()
    return pool


async def run(args: list[str], url: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = await asyncio.to_thread(main, [*args, "--database-url", url])
    out, err = capsys.readouterr()
    return code, out if code == 0 else err


def keys(out: str) -> list[str]:
    return [json.loads(line)["key"] for line in out.splitlines()]


async def test_tail_prints_the_latest_events_oldest_first_one_escaped_line_each(
    logged: asyncpg.Pool, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = await run(["tail", "-n", "2"], database_url, capsys)
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 2
    assert " read tenants.gemini_api_key key=evil\\nkey key_id=kid outcome=ok" in lines[0]
    assert lines[0].endswith(" seq=4") and "actor=- " in lines[0]
    assert "key=acme" in lines[1] and "actor=user:1" in lines[1]
    code, out = await run(["tail", "--json"], database_url, capsys)
    assert keys(out) == [e.key for e in LOGGED]
    assert json.loads(out.splitlines()[0])["at"] == LOGGED[0].at.isoformat()


async def test_query_filters_by_tenant_time_actor_and_operation(
    logged: asyncpg.Pool, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async def query(*args: str) -> list[str]:
        code, out = await run(["query", "--json", *args], database_url, capsys)
        assert code == 0, out
        return keys(out)

    assert await query() == [e.key for e in LOGGED]
    assert await query("--tenant", "acme") == ["acme"] * 3
    assert await query("--tenant", "acme", "--since", "150m") == ["acme", "acme"]
    until = (NOW - timedelta(hours=1.5)).isoformat()
    assert await query("--until", until) == ["acme", "globex", "acme"]
    assert await query("--actor", "user:2") == ["globex", "acme"]
    assert await query("--operation", "write") == ["globex"]
    assert await query("--limit", "2") == ["acme", "globex"]
    assert await query("--tenant", "nobody") == []


def test_when_takes_durations_and_iso_times_in_utc() -> None:
    now = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    assert parse_when("90s", now) == now - timedelta(seconds=90)
    assert parse_when("15m", now) == now - timedelta(minutes=15)
    assert parse_when("1h", now) == now - timedelta(hours=1)
    assert parse_when("7d", now) == now - timedelta(days=7)
    assert parse_when("2w", now) == now - timedelta(weeks=2)
    assert parse_when("2024-04-30T10:00:00Z") == datetime(2024, 4, 30, 10, tzinfo=UTC)
    assert parse_when("2024-04-30 10:00") == datetime(2024, 4, 30, 10, tzinfo=UTC)
    for bad in ("yesterday", "1y", "-1h", ""):
        with pytest.raises(ConfigurationError):
            parse_when(bad, now)


def test_usage_errors_exit_2_before_connecting(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for args in (["query", "--since", "yesterday"], ["prune"], ["sideways"]):
        with pytest.raises(SystemExit) as info:
            main(args)
        assert info.value.code == 2
    assert "neither a duration" in capsys.readouterr().err
    assert main(["tail", "-n", "-1"]) == 2
    assert main(["query", "--limit", "-5"]) == 2


async def test_sessions_lists_unclean_ones_with_their_unaccounted_events(
    logged: asyncpg.Pool, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    await logged.execute(
        "INSERT INTO tenantstore_audit_sessions (process, issued, written, dropped) "
        "VALUES ('h:1:killed', 12, 5, 0)"
    )
    code, out = await run(["sessions", "--json"], database_url, capsys)
    assert code == 0
    (listed,) = [json.loads(line) for line in out.splitlines()]
    assert (listed["process"], listed["unaccounted"], listed["closed_at"]) == (
        "h:1:killed",
        7,
        None,
    )
    code, out = await run(["sessions", "--all"], database_url, capsys)
    assert code == 0 and len(out.splitlines()) == 2  # the clean sink's session too


async def test_prune_refuses_without_yes_then_deletes_only_older_events(
    logged: asyncpg.Pool, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = await run(["prune", "--before", "90m"], database_url, capsys)
    assert code == 2 and "deletes 3 events" in err and "--yes" in err
    assert await logged.fetchval("SELECT count(*) FROM tenantstore_audit") == 5
    code, out = await run(["prune", "--before", "90m", "--yes"], database_url, capsys)
    assert code == 0 and out.startswith("Deleted 3 events older than ")
    remaining = await logged.fetch("SELECT row_key FROM tenantstore_audit ORDER BY id")
    assert [r[0] for r in remaining] == ["evil\nkey", "acme"]


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE tenantstore_audit SET actor = 'someone else'",
        "DELETE FROM tenantstore_audit",
        "TRUNCATE tenantstore_audit",
        "DELETE FROM tenantstore_audit_sessions",
    ],
)
async def test_the_audit_table_refuses_changes_other_than_prune(
    logged: asyncpg.Pool, statement: str
) -> None:
    with pytest.raises(asyncpg.RestrictViolationError, match="append-only"):
        await logged.execute(statement)
    assert await logged.fetchval("SELECT count(*) FROM tenantstore_audit") == 5


async def test_without_the_migration_the_command_exits_1_and_says_to_run_it(
    pool: asyncpg.Pool, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = await run(["tail"], database_url, capsys)
    assert code == 1 and "python -m tenantstore.migrate up" in err


async def test_down_refuses_to_drop_the_audit_log_while_it_holds_events(
    logged: asyncpg.Pool, keyring: KeyRing
) -> None:
    await downgrade(logged, keyring, steps=1)  # 0007, the live cache's trigger
    with pytest.raises(DestructiveMigrationError, match="tenantstore_audit, which holds 5 rows"):
        await downgrade(logged, keyring)
    await downgrade(logged, keyring, confirm=True)
    assert await logged.fetchval("SELECT to_regclass('tenantstore_audit')") is None
    assert await logged.fetchval("SELECT to_regclass('tenantstore_audit_sessions')") is None


INSERT = (
    "INSERT INTO tenantstore_audit (at, operation, table_name, row_key, outcome, process, seq) "
    "VALUES (now(), 'read', 'tenants', $1, 'ok', 'h:1:x', 1) RETURNING id"
)


@pytest.mark.slow
async def test_tail_follow_prints_new_events_and_a_batch_that_commits_late(
    logged: asyncpg.Pool, database_url: str
) -> None:
    follow = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tenantstore.audit", "tail", "-f", "-n", "1", "--json",
        "--interval", "0.05", "--grace", "600", "--database-url", database_url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=dict(os.environ),
    )  # fmt: skip
    assert follow.stdout is not None

    async def next_key() -> str:
        assert follow.stdout is not None
        line = await asyncio.wait_for(follow.stdout.readline(), 60)
        return str(json.loads(line)["key"])

    late = await asyncpg.connect(database_url)
    try:
        assert await next_key() == "acme"  # the latest event, then new ones
        tx = late.transaction()
        await tx.start()
        late_id = await late.fetchval(INSERT, "late")  # an id taken, not yet committed
        early_id = await logged.fetchval(INSERT, "early")
        assert early_id > late_id
        assert await next_key() == "early"
        await tx.commit()
        assert await next_key() == "late"  # found in the gap below "early"
        await logged.fetchval(INSERT, "after")
        assert await next_key() == "after"
    finally:
        await late.close()
        follow.send_signal(signal.SIGINT)
        _, err = await follow.communicate()
    assert follow.returncode == 130, err.decode()
