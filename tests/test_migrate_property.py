"""Property: whatever mix of values a table holds, each runner operation leaves each cell right.

Random rows of four secret columns, each cell one of: NULL, empty, plaintext, a
token under the primary key, a token under the old key, a corrupt token (the
right shape, a wrong HMAC). After `encrypt`, `rotate` or `decrypt` every cell
holds exactly what it should, and every failure is listed by key and column.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import Iterator

import asyncpg
import pytest
from conftest import with_database
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tenantstore import KeyRing, MigrationError
from tenantstore.encryption import is_encrypted, stored_token
from tenantstore.migrate import decrypt_secrets, encrypt_secrets, rotate_secrets, upgrade
from tenantstore.migrate.secrets import WRONG_KEY_EVIDENCE
from tenantstore.models import TENANTS

PRIMARY = KeyRing("AZUpefU1A9gAFD8DbPlHPYnNg-_50MaKr6ObYFI6YRY=")
OLD = KeyRing("c2nBHyyXMWAfKx9QDXKR-gOJf3BuH_297mIiATgOp34=")
RING = KeyRing("AZUpefU1A9gAFD8DbPlHPYnNg-_50MaKr6ObYFI6YRY=",
               ["c2nBHyyXMWAfKx9QDXKR-gOJf3BuH_297mIiATgOp34="])  # fmt: skip
KINDS = ("null", "empty", "plain", "primary", "old", "corrupt", "padded")
COLUMNS = TENANTS.secrets


def make(kind: str, plaintext: str) -> str | None:
    if kind == "null":
        return None
    if kind == "empty":
        return ""
    if kind == "plain":
        return plaintext
    if kind == "primary":
        return PRIMARY.encrypt(plaintext)
    if kind == "padded":
        return " " + PRIMARY.encrypt(plaintext) + "\n"
    token = OLD.encrypt(plaintext)
    if kind == "old":
        return token
    raw = bytearray(base64.urlsafe_b64decode(token))
    raw[-1] ^= 0x01  # the right shape, a wrong HMAC: no key decrypts it
    return base64.urlsafe_b64encode(bytes(raw)).decode()


@pytest.fixture(scope="module")
def property_database(server_url: str) -> Iterator[str]:
    """One database for every example; each example empties the table first."""
    name = f"ts_prop_{uuid.uuid4().hex[:12]}"

    async def create() -> None:
        admin = await asyncpg.connect(server_url)
        await admin.execute(f'CREATE DATABASE "{name}"')
        await admin.close()
        url = with_database(server_url, name)
        pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
        assert pool is not None
        await upgrade(pool, RING, target=3)
        await pool.close()

    async def drop() -> None:
        admin = await asyncpg.connect(server_url)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()

    asyncio.run(create())
    try:
        yield with_database(server_url, name)
    finally:
        asyncio.run(drop())


async def run_example(
    url: str, operation: str, rows: list[tuple[str, ...]], batch_size: int
) -> None:
    pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
    assert pool is not None
    try:
        await pool.execute("TRUNCATE tenants")
        originals: dict[tuple[str, str], str | None] = {}
        values: dict[tuple[str, str], str | None] = {}
        for r, kinds in enumerate(rows):
            tenant_id = f"t{r:03d}"
            for column, kind in zip(COLUMNS, kinds, strict=True):
                plaintext = f"{column}-{r}-secret"
                originals[tenant_id, column] = plaintext
                values[tenant_id, column] = make(kind, plaintext)
            await pool.execute(
                "INSERT INTO tenants (tenant_id, name, gemini_api_key, oauth_access_token, "
                "oauth_refresh_token, webhook_signing_secret) VALUES ($1, 'n', $2, $3, $4, $5)",
                tenant_id, *(values[tenant_id, c] for c in COLUMNS),
            )  # fmt: skip
        run = {"encrypt": encrypt_secrets, "rotate": rotate_secrets, "decrypt": decrypt_secrets}
        first_page = [kinds for kinds in rows if set(kinds) - {"null", "empty"}][:batch_size]
        tokens = [
            k for kinds in first_page for k in kinds if k in ("primary", "old", "corrupt", "padded")
        ]
        if (
            operation != "encrypt"
            and len(tokens) >= WRONG_KEY_EVIDENCE
            and set(tokens) == {"corrupt"}
        ):
            with pytest.raises(MigrationError, match="wrong encryption key"):
                await run[operation](pool, RING, batch_size=batch_size)
            after = await pool.fetch("SELECT * FROM tenants ORDER BY tenant_id")
            assert [[row[c] for c in COLUMNS] for row in after] == [
                [values[f"t{r:03d}", c] for c in COLUMNS] for r in range(len(rows))
            ]
            return
        report = await run[operation](pool, RING, batch_size=batch_size)
        stored = {
            (row[0], column): row[column]
            for row in await pool.fetch("SELECT * FROM tenants")
            for column in COLUMNS
        }
        expected_failures = set()
        for (tenant_id, column), before in values.items():
            after = stored[tenant_id, column]
            kind = rows[int(tenant_id[1:])][COLUMNS.index(column)]
            plaintext = originals[tenant_id, column]
            where = (tenant_id, column, kind, operation)
            if kind in ("null", "empty"):
                assert after == before, where
            elif kind == "corrupt":
                assert after == before, where  # never touched: not ours to fix
                if operation != "encrypt":
                    expected_failures.add((tenant_id, column, "undecryptable"))
            elif operation == "encrypt" or (operation == "rotate" and kind != "old"):
                if kind == "plain" and operation == "encrypt":
                    assert is_encrypted(after) and PRIMARY.decrypt(after) == plaintext, where  # type: ignore[arg-type]
                else:
                    assert after == before, where  # a token is never encrypted twice
            elif operation == "rotate":  # a token under the old key
                assert PRIMARY.decrypt(after) == plaintext, where  # type: ignore[arg-type]
            else:  # decrypt
                assert after == plaintext, where
                assert stored_token(after) is None, where
        got = {(f.key, f.column, f.reason) for f in report.failures}
        assert got == expected_failures
        assert report.rows == sum(
            any(values[f"t{r:03d}", c] for c in COLUMNS) for r in range(len(rows))
        )
    finally:
        await pool.close()


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    operation=st.sampled_from(["encrypt", "rotate", "decrypt"]),
    rows=st.lists(st.tuples(*(st.sampled_from(KINDS) for _ in COLUMNS)), min_size=1, max_size=25),
    batch_size=st.integers(min_value=1, max_value=9),
)
def test_every_cell_ends_as_it_should(
    property_database: str, operation: str, rows: list[tuple[str, ...]], batch_size: int
) -> None:
    asyncio.run(run_example(property_database, operation, rows, batch_size))
