"""LiveCache while `migrate rotate` re-encrypts 100k rows in another process.

The runner writes a page per statement, so the triggers send a few
notifications per page (ids in chunks under 8000 bytes), not one per row;
the reader keeps returning the right plaintexts throughout, and afterwards
its cached tenants are those of the new tokens (their audit events name
the new key).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import sys

import asyncpg
import pytest
from test_live_cache import gemini, live_cache, poll, until_live
from test_live_cache_trigger import Notifications, ids_in

from tenantstore import KeyRing, TenantRepository
from tenantstore.migrate import upgrade
from tenantstore.migrate.secrets import DEFAULT_BATCH_SIZE

ROWS = 100_000


@pytest.mark.slow
async def test_rotating_100k_rows_sends_notifications_per_page_and_reads_stay_correct(
    pool: asyncpg.Pool,
    database_url: str,
    key: str,
    old_key: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    old = KeyRing(old_key)
    await upgrade(pool, old)
    ids = [f"t{i:06d}" for i in range(ROWS)]
    plaintexts = {tenant_id: f"AIza-{tenant_id}" for tenant_id in ids}
    await pool.execute(
        "INSERT INTO tenants (tenant_id, name, gemini_api_key) "
        "SELECT unnest($1::text[]), 'n', unnest($2::text[])",
        ids,
        old.encrypt_batch(list(plaintexts.values())),
    )
    listen = await asyncpg.connect(database_url)
    notes = Notifications(listen)
    await notes.start()
    sample = ids[::997]
    ring = KeyRing(key, [old_key])  # deployed with both keys before the rotation, as documented
    try:
        async with TenantRepository(pool, ring, live_cache=live_cache(database_url)) as repo:
            await until_live(repo)
            await repo.get_tenants(sample)  # cached, under the old key
            stop = asyncio.Event()

            async def read() -> int:
                reads = 0
                while not stop.is_set():
                    for tenant_id in sample:
                        assert gemini(await repo.get_tenant(tenant_id)) == plaintexts[tenant_id]
                        reads += 1
                    await asyncio.sleep(0.005)
                return reads

            reader = asyncio.create_task(read())
            env = {
                **os.environ,
                "DATABASE_URL": database_url,
                "ENCRYPTION_KEY": key,
                "OLD_ENCRYPTION_KEY": old_key,
            }
            rotate = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tenantstore.migrate", "rotate", "--quiet", env=env
            )
            assert await asyncio.wait_for(rotate.wait(), 600) == 0
            stop.set()
            assert await reader > 0

            payloads = await notes.settle()
            pages = math.ceil(ROWS / DEFAULT_BATCH_SIZE)
            assert pages <= len(payloads) <= 8 * pages  # per page, never per row
            assert "*" in payloads or set(ids_in(payloads)) == set(ids)

            caplog.set_level(logging.INFO, logger="tenantstore.audit")

            async def key_ids() -> set[str | None]:
                caplog.clear()
                found = await repo.get_tenants(sample)
                assert {t: gemini(v) for t, v in found.items()} == {
                    t: plaintexts[t] for t in sample
                }
                return {
                    r.audit["key_id"]  # type: ignore[attr-defined]
                    for r in caplog.records
                    if r.name == "tenantstore.audit"
                }

            assert (await poll(key_ids, lambda seen: seen == {ring.primary_key_id}))[-1]
    finally:
        await listen.close()
