"""Shared fixtures: a real PostgreSQL for the session, a fresh database per test.

The server is the embedded one from `pgserver` in a temporary directory, or
the one at `TENANTSTORE_TEST_DATABASE_URL` (its role needs CREATEDB).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

# The SoftHSM2 token of the envelope-mode tests: registered here, once, so the
# whole session shares one token (the PKCS#11 module reads its conf only once).
from _softhsm import kek_a, kek_b, softhsm  # noqa: F401
from cryptography.fernet import Fernet
from pgbouncer_fixture import bouncer_pool, bouncer_url, pgbouncer  # noqa: F401 (fixtures)

from tenantstore import KeyRing

_CLEARED_SETTINGS = (
    "DATABASE_URL",
    "ENCRYPTION_KEY",
    "OLD_ENCRYPTION_KEY",
    "ENCRYPTION_KEYS",
    "ENCRYPTION_KEY_FILE",
    "OLD_ENCRYPTION_KEY_FILE",
    "ENCRYPTION_KEYS_FILE",
    "TENANTSTORE_FERNET",
    "TENANTSTORE_KEY_PROVIDER",
    "TENANTSTORE_PKCS11_MODULE",
    "TENANTSTORE_PKCS11_TOKEN",
    "TENANTSTORE_PKCS11_PIN",
    "TENANTSTORE_PKCS11_PIN_FILE",
    "TENANTSTORE_PKCS11_KEK",
    "DATABASE_DIRECT_URL",
    "TENANTSTORE_PGBOUNCER",
)


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keep the developer's settings and dotenv files out of every test."""
    for name in _CLEARED_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


def with_database(url: str, database: str) -> str:
    """Return `url` pointing at another database on the same server."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + database))


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """URL of the session's PostgreSQL server (maintenance database)."""
    external = os.environ.get("TENANTSTORE_TEST_DATABASE_URL")
    if external:
        yield external
        return
    from pgserver import postgres_server

    # A directory of our own, not pytest's numbered tmp dirs: pytest prunes
    # old ones, which would pull the data directory from under a running server.
    root = Path(tempfile.mkdtemp(prefix="tenantstore-pg-"))
    server = postgres_server.get_server(root / "pgdata", cleanup_mode="delete")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def database_url(server_url: str) -> AsyncIterator[str]:
    """A fresh, empty database for this test; dropped afterwards."""
    name = f"ts_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield with_database(server_url, name)
    finally:
        admin = await asyncpg.connect(server_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """An asyncpg pool on the test's fresh database."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=10)
    assert pool is not None
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
def key() -> str:
    """A fresh primary key."""
    return Fernet.generate_key().decode()


@pytest.fixture
def old_key() -> str:
    """A fresh key playing the previous one."""
    return Fernet.generate_key().decode()


@pytest.fixture
def keyring(key: str) -> KeyRing:
    """A key ring with only the primary key."""
    return KeyRing(key)
