"""PostgreSQL restarts under a running `migrate encrypt`: a server of the test's own.

The session's server is shared by every test, so these tests start a second
one (pgserver's binaries, a data directory of their own) and restart or stop
it with `pg_ctl` while a real `python -m tenantstore.migrate` process runs.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit, urlunsplit

import asyncpg
import pytest

from tenantstore import KeyRing
from tenantstore.migrate import upgrade

pytestmark = pytest.mark.slow

ROWS = 60_000
SECRETS = ("gemini_api_key", "oauth_access_token", "oauth_refresh_token", "webhook_signing_secret")


@dataclass
class OwnServer:
    """A PostgreSQL of this module's own, and `pg_ctl` to take it down and up."""

    url: str
    pgdata: Path
    user: str | None

    def pg_ctl(self, *args: str) -> None:
        from pgserver._commands import POSTGRES_BIN_PATH

        subprocess.run(
            [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(self.pgdata), "-w", *args],
            check=True,
            user=self.user,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
        )

    def restart(self, mode: str) -> None:
        self.pg_ctl("-m", mode, "-l", str(self.pgdata / "log"), "restart")

    def stop(self, mode: str = "fast") -> None:
        self.pg_ctl("-m", mode, "stop")

    def start(self) -> None:
        socket_dir = parse_qs(urlsplit(self.url).query)["host"][0]
        self.pg_ctl(
            "-o", '-h ""', "-o", f"-k {socket_dir}", "-l", str(self.pgdata / "log"), "start"
        )  # fmt: skip


@pytest.fixture(scope="module")
def own_server() -> Iterator[OwnServer]:
    from pgserver import postgres_server

    root = Path(tempfile.mkdtemp(prefix="tenantstore-outage-"))
    server = postgres_server.get_server(root / "pgdata", cleanup_mode="delete")
    own = OwnServer(server.get_uri(), root / "pgdata", server.system_user)
    try:
        yield own
    finally:
        # pgserver only stops the postmaster it started; after a restart that is gone.
        try:
            own.stop("immediate")
        except subprocess.CalledProcessError:
            pass  # already stopped
        server.cleanup()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def outage_url(own_server: OwnServer, key: str) -> str:
    """A fresh database on the module's server: the schema, and ROWS rows of plaintext."""
    name = f"ts_outage_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(own_server.url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = urlunsplit(urlsplit(own_server.url)._replace(path="/" + name))
    pool = await asyncpg.create_pool(url, min_size=1, max_size=3)
    assert pool is not None
    try:
        await upgrade(pool, KeyRing(key), target=3)
        await pool.execute(
            f"INSERT INTO tenants (tenant_id, name, {', '.join(SECRETS)}) "
            "SELECT 't' || lpad(i::text, 6, '0'), 'n', "
            + ", ".join(f"'{column[:6]}-' || i" for column in SECRETS)
            + f" FROM generate_series(0, {ROWS - 1}) AS i"
        )
    finally:
        await pool.close()
    return url


def spawn(args: list[str], url: str, key: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tenantstore.migrate", *args, "--database-url", url],
        env={**os.environ, "ENCRYPTION_KEY": key},
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def wait_until_encrypting(url: str, at_least: int = 2000) -> None:
    """Return once the runner has written `at_least` rows."""
    conn = await asyncpg.connect(url)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            done = await conn.fetchval(
                "SELECT count(*) FROM tenants WHERE gemini_api_key LIKE 'gAAAA%'"
            )
            if done >= at_least:
                return
            await asyncio.sleep(0.02)
        raise AssertionError("the runner never got going")
    finally:
        await conn.close()


async def assert_encrypted_exactly_once(url: str, key: str) -> None:
    ring = KeyRing(key)
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(f"SELECT tenant_id, {', '.join(SECRETS)} FROM tenants")
    finally:
        await conn.close()
    assert len(rows) == ROWS
    for row in rows:
        i = int(row[0][1:])
        for c, column in enumerate(SECRETS):
            assert ring.decrypt(row[c + 1]) == f"{column[:6]}-{i}", (row[0], column)


def assert_calm(stderr: str) -> None:
    """The outage is the runner's to report: no traceback, no pool noise."""
    assert "Traceback" not in stderr, stderr
    assert "Failed to restore the pool connection floor" not in stderr, stderr


@pytest.mark.parametrize("outage", ["immediate", "fast-8s"])
async def test_encrypt_survives_a_postgresql_restart(
    own_server: OwnServer, outage_url: str, key: str, tmp_path: Path, outage: str
) -> None:
    """`pg_ctl restart -m immediate` (crash recovery), or a fast stop and 8 s of
    downtime, mid-run: the runner says it lost the connection and retries, then
    finishes with exit 0; every secret is encrypted exactly once."""
    runner = spawn(["encrypt", "--batch-size", "500"], outage_url, key, tmp_path)
    try:
        await wait_until_encrypting(outage_url)
        if outage == "immediate":
            await asyncio.to_thread(own_server.restart, "immediate")
        else:
            await asyncio.to_thread(own_server.stop, "fast")
            await asyncio.sleep(8)
            await asyncio.to_thread(own_server.start)
        out, err = await asyncio.to_thread(runner.communicate, timeout=120)
    finally:
        if runner.poll() is None:
            runner.kill()
    assert runner.returncode == 0, err
    assert "lost the database connection" in err, err
    assert_calm(err)
    assert out.strip().splitlines()[-1].startswith("Migration complete: "), out
    await assert_encrypted_exactly_once(outage_url, key)


async def test_a_longer_outage_than_retry_for_stops_cleanly_and_a_rerun_completes(
    own_server: OwnServer, outage_url: str, key: str, tmp_path: Path
) -> None:
    """`--retry-for 2` and a 10 s outage: exit 1 with a message saying how long it
    waited without the database and to run it again; the rerun completes."""
    runner = spawn(
        ["encrypt", "--batch-size", "500", "--retry-for", "2"], outage_url, key, tmp_path
    )
    try:
        await wait_until_encrypting(outage_url)
        await asyncio.to_thread(own_server.stop, "fast")
        try:
            _, err = await asyncio.to_thread(runner.communicate, timeout=10)
        finally:
            await asyncio.to_thread(own_server.start)
    finally:
        if runner.poll() is None:
            runner.kill()
    assert runner.returncode == 1, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    waited = re.search(r"after (\d+)s without the database", errors[0])
    assert waited and int(waited[1]) >= 2, errors[0]
    assert "run the command again" in errors[0]
    assert_calm(err)
    rerun = spawn(["encrypt", "--quiet"], outage_url, key, tmp_path)
    _out, err = await asyncio.to_thread(rerun.communicate, timeout=120)
    assert rerun.returncode == 0, err
    await assert_encrypted_exactly_once(outage_url, key)
