"""`tenantstore_keys` (migration 0005), `record_key_use` and `KeyUseRecorder`."""

from __future__ import annotations

import asyncio
import logging

import asyncpg
import pytest

from tenantstore import DatabaseError, DestructiveMigrationError, KeyRing
from tenantstore.keys import KeyUseRecorder, list_known_keys, record_key_use
from tenantstore.migrate import downgrade, upgrade

A, B, C = "aaaaaaaaaaaa", "bbbbbbbbbbbb", "cccccccccccc"


@pytest.fixture
async def migrated(pool: asyncpg.Pool, keyring: KeyRing) -> asyncpg.Pool:
    """The schema up to 0005 (the keys table), so one step down reverts it."""
    await upgrade(pool, keyring, target=5)
    return pool


async def states(pool: asyncpg.Pool) -> dict[str, str]:
    return {k.key_id: k.state for k in await list_known_keys(pool)}


# -- the table ----------------------------------------------------------------------


async def test_the_table_refuses_a_second_primary_a_bad_state_and_a_non_id(
    migrated: asyncpg.Pool,
) -> None:
    await migrated.execute("INSERT INTO tenantstore_keys (key_id, state) VALUES ($1, 'primary')", A)
    with pytest.raises(asyncpg.UniqueViolationError):
        await migrated.execute(
            "INSERT INTO tenantstore_keys (key_id, state) VALUES ($1, 'primary')", B
        )
    with pytest.raises(asyncpg.CheckViolationError):
        await migrated.execute("INSERT INTO tenantstore_keys (key_id, state) VALUES ($1, 'old')", B)
    key = KeyRing.__init__.__name__  # any text that is not 12 hex characters
    with pytest.raises(asyncpg.CheckViolationError):
        await migrated.execute("INSERT INTO tenantstore_keys (key_id) VALUES ($1)", key)
    with pytest.raises(asyncpg.CheckViolationError):  # wrapped key without its KEK
        await migrated.execute(
            "INSERT INTO tenantstore_keys (key_id, wrapped_key) VALUES ($1, '\\x00')", C
        )


async def test_down_drops_a_table_of_use_records_but_refuses_wrapped_keys_unless_confirmed(
    migrated: asyncpg.Pool, keyring: KeyRing
) -> None:
    await record_key_use(migrated, A, primary=True)
    await downgrade(migrated, keyring)
    assert await migrated.fetchval("SELECT to_regclass('tenantstore_keys')") is None
    await upgrade(migrated, keyring, target=5)
    await migrated.execute(
        "INSERT INTO tenantstore_keys (key_id, wrapped_key, wrapped_by, wrapped_at) "
        "VALUES ($1, '\\x0102', 'pkcs11:token=t;key=k', now())",
        B,
    )
    with pytest.raises(DestructiveMigrationError, match=r"tenantstore_keys\.wrapped_key"):
        await downgrade(migrated, keyring)
    assert await migrated.fetchval("SELECT count(*) FROM tenantstore_keys") == 1
    await downgrade(migrated, keyring, confirm=True)
    assert await migrated.fetchval("SELECT to_regclass('tenantstore_keys')") is None


# -- record_key_use -----------------------------------------------------------------


async def test_first_use_records_the_key_and_its_times(migrated: asyncpg.Pool) -> None:
    await record_key_use(migrated, A, primary=True)
    [known] = await list_known_keys(migrated)
    assert (known.key_id, known.state, known.wrapped) == (A, "primary", False)
    assert known.first_used_at is not None and known.first_used_at == known.last_used_at
    await asyncio.sleep(0.01)
    await record_key_use(migrated, A, primary=True)
    [again] = await list_known_keys(migrated)
    assert again.first_used_at == known.first_used_at
    assert again.last_used_at is not None and again.last_used_at > known.first_used_at


async def test_a_new_primary_demotes_the_previous_one_to_decrypt_only(
    migrated: asyncpg.Pool,
) -> None:
    await record_key_use(migrated, A, primary=True)
    await record_key_use(migrated, B, primary=True)
    assert await states(migrated) == {A: "decrypt-only", B: "primary"}
    await record_key_use(migrated, A, primary=True)  # a rollback of the deploy
    assert await states(migrated) == {A: "primary", B: "decrypt-only"}


async def test_a_decrypt_only_use_never_changes_the_primary(migrated: asyncpg.Pool) -> None:
    await record_key_use(migrated, A, primary=True)
    await record_key_use(migrated, B, primary=False)
    await record_key_use(migrated, A, primary=False)
    assert await states(migrated) == {A: "primary", B: "decrypt-only"}


async def test_a_retired_key_used_again_is_decrypt_only_and_a_warning_says_so(
    migrated: asyncpg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    await record_key_use(migrated, A, primary=True)
    await migrated.execute("INSERT INTO tenantstore_keys (key_id, state) VALUES ($1, 'retired')", B)
    with caplog.at_level(logging.WARNING, logger="tenantstore"):
        await record_key_use(migrated, B, primary=False)
    assert await states(migrated) == {A: "primary", B: "decrypt-only"}
    assert f"key {B} was retired but is in use again" in caplog.text


async def test_a_plain_key_never_demotes_a_wrapped_primary(migrated: asyncpg.Pool) -> None:
    """Envelope mode: only `keys new-data-key` changes which data key is primary."""
    await migrated.execute(
        "INSERT INTO tenantstore_keys (key_id, state, wrapped_key, wrapped_by, wrapped_at) "
        "VALUES ($1, 'primary', '\\x01', 'kek', now()),"
        " ($2, 'decrypt-only', '\\x02', 'kek', now())",
        A,
        B,
    )
    await record_key_use(migrated, C, primary=True)
    await record_key_use(migrated, B, primary=True)  # an old process still on B
    assert await states(migrated) == {A: "primary", B: "decrypt-only", C: "decrypt-only"}


async def test_concurrent_new_primaries_leave_exactly_one_primary(migrated: asyncpg.Pool) -> None:
    ids = [f"{i:012x}" for i in range(4)]
    await asyncio.gather(*(record_key_use(migrated, kid, primary=True) for kid in ids))
    found = await states(migrated)
    assert set(found) == set(ids)
    assert list(found.values()).count("primary") == 1


async def test_record_key_use_refuses_anything_but_a_key_id(migrated: asyncpg.Pool) -> None:
    key = "Zm9vYmFyYmF6cXV4cXV1eHF1dXhxdXV4cXV1eHF1dXg="
    with pytest.raises(ValueError, match="12 lowercase hex") as info:
        await record_key_use(migrated, key, primary=True)
    assert key not in str(info.value)
    assert await states(migrated) == {}


async def test_record_key_use_without_the_table_is_a_database_error(pool: asyncpg.Pool) -> None:
    with pytest.raises(DatabaseError, match="UndefinedTableError"):
        await record_key_use(pool, A, primary=True)


async def test_record_key_use_is_one_statement_inside_the_callers_transaction(
    migrated: asyncpg.Pool,
) -> None:
    async with migrated.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        await record_key_use(conn, A, primary=True)
        await tx.rollback()
    assert await states(migrated) == {}


# -- KeyUseRecorder -----------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_recorder_writes_once_per_key_and_role_per_interval(migrated: asyncpg.Pool) -> None:
    clock = FakeClock()
    recorder = KeyUseRecorder(migrated, interval=300, clock=clock)
    assert await recorder.record(A, primary=True) is True
    first = (await list_known_keys(migrated))[0].last_used_at
    clock.now += 299
    assert await recorder.record(A, primary=True) is False
    assert await recorder.record(A, primary=False) is True  # another role: its own interval
    assert await recorder.record(B, primary=False) is True
    clock.now += 1
    assert recorder.due(A, primary=True)
    assert await recorder.record(A, primary=True) is True
    assert (await list_known_keys(migrated))[0].last_used_at != first


async def test_recorder_logs_a_failure_and_never_raises(
    pool: asyncpg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = KeyUseRecorder(pool, clock=FakeClock())
    with caplog.at_level(logging.WARNING, logger="tenantstore"):
        assert await recorder.record(A, primary=True) is False  # no table: not migrated
        assert await recorder.record("not-an-id", primary=True) is False
    assert "could not record the use of a key" in caplog.text
    assert "UndefinedTableError" in caplog.text
    assert "not recording a key use" in caplog.text
    assert "not-an-id" not in caplog.text


async def test_recorder_failure_leaves_the_callers_transaction_usable(pool: asyncpg.Pool) -> None:
    await pool.execute("CREATE TABLE t (x int)")
    recorder = KeyUseRecorder(pool, clock=FakeClock())
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("INSERT INTO t VALUES (1)")
        assert await recorder.record(A, primary=True, conn=conn) is False
        await conn.execute("INSERT INTO t VALUES (2)")
    assert await pool.fetchval("SELECT count(*) FROM t") == 2


async def test_recorder_writes_through_the_callers_connection(migrated: asyncpg.Pool) -> None:
    recorder = KeyUseRecorder(migrated, clock=FakeClock())
    async with migrated.acquire() as conn, conn.transaction():
        assert await recorder.record(A, primary=True, conn=conn) is True
    assert await states(migrated) == {A: "primary"}


def test_recorder_repr_shows_no_key_material() -> None:
    assert repr(KeyUseRecorder(None, interval=5)) == "<KeyUseRecorder interval=5 keys=0>"
