"""A real PgBouncer in transaction pooling mode in front of the test PostgreSQL.

`PgBouncer` starts the system's `pgbouncer` binary (Debian/Ubuntu package
`pgbouncer`) on 127.0.0.1 at a free port, with one wildcard database entry
that forwards every database name to the same-named database of the server
behind it, trust authentication, and small server pools (2 per database), so
that many clients share few server connections, as in production. The
benchmarks start it the same way (`benchmarks/pgbouncer.py` imports this
module).

PgBouncer refuses to run as root: as root it is started with `-u` as the
user pgserver runs PostgreSQL as (`pgserver`, which can reach the socket
directory inside its data directory), else `nobody`.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

import asyncpg
import pytest

from tenantstore import create_pool

__all__ = ["PgBouncer", "bouncer_pool", "bouncer_url", "pgbouncer", "pgbouncer_binary"]

APT_PACKAGE = "pgbouncer"
POOL_SIZE = 2
"""Server connections per database and user: small, so clients share them."""


def pgbouncer_binary() -> str:
    """The path of the `pgbouncer` executable.

    Raises:
        RuntimeError: it is not installed; the message names the package.
    """
    found = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/bin")
    if found is None:
        raise RuntimeError(
            "the pgbouncer binary is not installed: install the system package "
            f"'{APT_PACKAGE}' (apt-get install -y --no-install-recommends {APT_PACKAGE}; "
            ".ci/run does this when it is missing)"
        )
    return found


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _run_as() -> str | None:
    """The user to switch to with `-u` when we are root (PgBouncer refuses root)."""
    if os.geteuid() != 0:
        return None
    for name in ("pgserver", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    raise RuntimeError("running as root and neither user 'pgserver' nor 'nobody' exists")


def _backend(server_url: str) -> dict[str, str]:
    """host, port, user, password and dbname of the server PgBouncer forwards to."""
    parts = urlsplit(server_url)
    query = {name: values[-1] for name, values in parse_qs(parts.query).items()}
    host = query.get("host") or parts.hostname or "127.0.0.1"
    return {
        "host": host,
        "port": query.get("port") or str(parts.port or 5432),
        "user": query.get("user") or unquote(parts.username or "") or "postgres",
        "password": query.get("password") or unquote(parts.password or ""),
    }


class PgBouncer:
    """A running PgBouncer process in front of the server at `server_url`.

    Args:
        server_url: a URL of the PostgreSQL server (any database on it).
        pool_mode: PgBouncer's `pool_mode` (transaction, session, statement).
        pool_size: PgBouncer's `default_pool_size`.

    Use `start()` / `stop()`, or `with PgBouncer(url) as bouncer:`; `url(db)`
    gives a client URL of a database through it.
    """

    def __init__(
        self, server_url: str, *, pool_mode: str = "transaction", pool_size: int = POOL_SIZE
    ) -> None:
        self.backend = _backend(server_url)
        self.pool_mode = pool_mode
        self.pool_size = pool_size
        self.port = 0
        self.directory: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, database: str) -> str:
        """A URL of `database` through PgBouncer (as the backend's user, no password)."""
        return urlunsplit(
            ("postgresql", f"{self.backend['user']}@127.0.0.1:{self.port}", f"/{database}", "", "")
        )

    def _config(self, directory: Path) -> str:
        backend = self.backend
        target = f"host={backend['host']} port={backend['port']} user={backend['user']}"
        if backend["password"]:
            target += f" password={backend['password']}"
        return "\n".join(
            [
                "[databases]",
                f"* = {target}",
                "[pgbouncer]",
                "listen_addr = 127.0.0.1",
                f"listen_port = {self.port}",
                "unix_socket_dir =",
                "auth_type = trust",
                f"auth_file = {directory / 'users.txt'}",
                f"admin_users = {backend['user']}",
                f"pool_mode = {self.pool_mode}",
                f"default_pool_size = {self.pool_size}",
                "max_client_conn = 2000",
                "server_login_retry = 1",
                "log_connections = 0",
                "log_disconnections = 0",
                "",
            ]
        )

    def start(self, timeout: float = 15.0) -> PgBouncer:
        """Start PgBouncer and wait until it accepts connections.

        Raises:
            RuntimeError: the binary is missing, or it exited or did not listen
                in time (the message holds the end of its log).
        """
        binary = pgbouncer_binary()
        user = _run_as()
        directory = Path(tempfile.mkdtemp(prefix="tenantstore-pgbouncer-"))
        directory.chmod(0o755)  # the -u user reads the config and writes nothing here
        self.directory = directory
        for _attempt in range(3):  # another process may take the free port first
            self.port = _free_port()
            config = directory / "pgbouncer.ini"
            config.write_text(self._config(directory))
            (directory / "users.txt").write_text(f'"{self.backend["user"]}" ""\n')
            for path in (config, directory / "users.txt"):
                path.chmod(0o600 if self.backend["password"] else 0o644)
                if self.backend["password"] and user is not None:
                    os.chown(path, pwd.getpwnam(user).pw_uid, -1)
            argv = [binary, *(["-u", user] if user else []), str(config)]
            with (directory / "pgbouncer.log").open("ab") as log:
                self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
            if self._wait_listening(timeout):
                return self
            self.stop(remove=False)
        raise RuntimeError(f"pgbouncer did not start; its log ends with:\n{self.log_tail()}")

    def _wait_listening(self, timeout: float) -> bool:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return True
            except OSError:
                time.sleep(0.05)
        return False

    def log_tail(self, lines: int = 20) -> str:
        """The last `lines` lines of PgBouncer's log."""
        if self.directory is None or not (self.directory / "pgbouncer.log").exists():
            return ""
        text = (self.directory / "pgbouncer.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, *, remove: bool = True) -> None:
        """Stop PgBouncer (SIGTERM, then SIGKILL) and remove its directory."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if remove and self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def __enter__(self) -> PgBouncer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture(scope="session")
def pgbouncer(server_url: str) -> Iterator[PgBouncer]:
    """The session's PgBouncer (transaction mode, pools of 2) in front of the test server.

    Fails, never skips, when the binary is missing: these tests are the only
    proof that tenantstore works through PgBouncer.
    """
    try:
        bouncer = PgBouncer(server_url).start()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield bouncer
    finally:
        bouncer.stop()


@pytest.fixture
def bouncer_url(database_url: str, pgbouncer: PgBouncer) -> str:
    """This test's fresh database, reached through PgBouncer."""
    return pgbouncer.url(urlsplit(database_url).path.lstrip("/"))


@pytest.fixture
async def bouncer_pool(bouncer_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A tenantstore pool through PgBouncer (`pgbouncer=True`: no statement cache)."""
    pool = await create_pool(bouncer_url, min_size=1, max_size=10, pgbouncer=True)
    try:
        yield pool
    finally:
        await pool.close()
