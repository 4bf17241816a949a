"""A real application process killed with SIGKILL: after aclose() nothing is lost; before it,
what was still buffered is counted in tenantstore_audit_sessions and reported by the CLI."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import asyncpg
import pytest

from tenantstore import KeyRing
from tenantstore.migrate import upgrade

# The application: emits events through AuditLog(PostgresSink), says where it
# is on stdout, waits for "go" on stdin where told, and never exits by itself.
APP = r"""
import asyncio, os, sys
import asyncpg
from tenantstore.audit import AuditEvent, AuditLog
from tenantstore.audit.pg import PostgresSink

def say(*words):
    print(*words, flush=True)

async def emit(log, count, prefix):
    for i in range(count):
        key = f"{prefix}{i:05d}"
        await log.emit([AuditEvent("read", "tenants", "gemini_api_key", key, "k", "ok")])

async def main(mode):
    pool = await asyncpg.create_pool(os.environ["DATABASE_URL"], min_size=1, max_size=2)
    if mode == "close":
        sink = PostgresSink(pool, batch=1000, interval=600)
        log = AuditLog(sink)
        say("process", sink.process)
        await emit(log, 5000, "c")
        await log.aclose()
        say("closed")
    else:
        sink = PostgresSink(pool, batch=5, interval=600)
        log = AuditLog(sink)
        say("process", sink.process)
        await emit(log, 5, "a")
        await sink.flush()
        say("flushed")
        await asyncio.to_thread(sys.stdin.readline)
        await emit(log, 7, "b")
        say("emitted")
    await asyncio.Event().wait()

asyncio.run(main(sys.argv[1]))
"""


@pytest.fixture
async def audited(pool: asyncpg.Pool, keyring: KeyRing) -> asyncpg.Pool:
    await upgrade(pool, keyring)
    return pool


async def start_app(mode: str, database_url: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        APP,
        mode,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "DATABASE_URL": database_url},
    )


async def line(app: asyncio.subprocess.Process) -> str:
    assert app.stdout is not None
    return (await asyncio.wait_for(app.stdout.readline(), 120)).decode().strip()


async def kill(app: asyncio.subprocess.Process) -> None:
    app.send_signal(signal.SIGKILL)
    assert await app.wait() == -signal.SIGKILL


@pytest.mark.slow
async def test_after_aclose_returned_a_kill_loses_no_event(
    audited: asyncpg.Pool, database_url: str
) -> None:
    app = await start_app("close", database_url)
    try:
        process = (await line(app)).split()[1]
        assert await line(app) == "closed"
    finally:
        await kill(app)
    keys = [r[0] for r in await audited.fetch(
        "SELECT row_key FROM tenantstore_audit WHERE process = $1 ORDER BY seq", process
    )]  # fmt: skip
    assert keys == [f"c{i:05d}" for i in range(5000)]
    session = await audited.fetchrow(
        "SELECT * FROM tenantstore_audit_sessions WHERE process = $1", process
    )
    assert session is not None and session["closed_at"] is not None
    assert (session["issued"], session["written"], session["dropped"]) == (5000, 5000, 0)


@pytest.mark.slow
async def test_a_kill_while_events_are_buffered_is_counted_and_reported(
    audited: asyncpg.Pool, database_url: str
) -> None:
    app = await start_app("held", database_url)
    lock = None
    try:
        process = (await line(app)).split()[1]
        assert await line(app) == "flushed"
        # Hold the writer back: its next COPY waits behind this lock.
        lock = await asyncpg.connect(database_url)
        await lock.execute("BEGIN; LOCK TABLE tenantstore_audit IN SHARE MODE")
        assert app.stdin is not None
        app.stdin.write(b"go\n")
        await app.stdin.drain()
        assert await line(app) == "emitted"
        # The sink counts the events as issued before it tries to COPY them.
        deadline = time.monotonic() + 60
        while (
            await audited.fetchval(
                "SELECT issued FROM tenantstore_audit_sessions WHERE process = $1", process
            )
            != 12
        ):
            assert time.monotonic() < deadline, "the sink never recorded its 12 events"
            await asyncio.sleep(0.02)
    finally:
        await kill(app)
        if lock is not None:
            await lock.execute("COMMIT")
            await lock.close()
    keys = [r[0] for r in await audited.fetch(
        "SELECT row_key FROM tenantstore_audit WHERE process = $1 ORDER BY seq", process
    )]  # fmt: skip
    assert keys == [f"a{i:05d}" for i in range(5)]
    session = await audited.fetchrow(
        "SELECT * FROM tenantstore_audit_sessions WHERE process = $1", process
    )
    assert session is not None and session["closed_at"] is None
    assert (session["issued"], session["written"], session["dropped"]) == (12, 5, 0)

    # The operator command reports it: a real process, then main() for the JSON.
    cli = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tenantstore.audit", "sessions", "--database-url", database_url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await cli.communicate()
    assert cli.returncode == 0, err.decode()
    (report,) = out.decode().splitlines()
    assert report.startswith(f"{process}: started ")
    assert "not closed" in report and "issued 12, written 5" in report
    assert "7 issued and not written" in report
