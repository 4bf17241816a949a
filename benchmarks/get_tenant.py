"""How fast is `TenantRepository.get_tenant`, next to its limit and its alternatives?

One run, one fresh database holding the same tenants, variants side by side:

  a  raw asyncpg `fetchrow`, no decryption: the limit
  b  raw asyncpg + one `anyio.to_thread.run_sync(fernet.decrypt)` per call: the naive offload
  c  `TenantRepository.get_tenant`, cold (`cache_size=0`) and warm (default cache, primed)
  d  SQLAlchemy 2 async ORM + sqlalchemy-utils `StringEncryptedType(FernetEngine)`: a peer
  e  raw asyncpg + Fernet decryption inline on the loop: a reference

Each variant gets a fresh pool, `--clients` coroutines drawing the same seeded
tenant ids, an untimed warm-up, then `--requests` timed ones, while a monitor
task records the worst event-loop lag. Machines are noisy: read the ratios.

    uv run python benchmarks/get_tenant.py --requests 5000 --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import string
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import anyio.to_thread
import asyncpg
from _common import scratch_database, server_url, with_database, worst_lag
from cryptography.fernet import Fernet
from sqlalchemy import DateTime, Text, Unicode, func, insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy_utils import StringEncryptedType
from sqlalchemy_utils.types.encrypted.encrypted_type import FernetEngine

from tenantstore import KeyRing, TenantRepository
from tenantstore.encryption import generate_encryption_key
from tenantstore.migrate import upgrade

GET_ROW = (
    "SELECT tenant_id, name, gemini_api_key, created_at, updated_at "
    "FROM tenants WHERE tenant_id = $1"
)
FILL = (
    "INSERT INTO tenants (tenant_id, name, gemini_api_key) "
    "SELECT * FROM unnest($1::text[], $2::text[], $3::text[])"
)
VERIFY_SAMPLE = 200
# (ratio name, numerator, denominator, target): numerator / denominator >= target.
TARGETS = [
    ("cold c/e", "c cold", "e", 0.85),
    ("cold c/b", "c cold", "b", 1.7),
    ("warm c/a", "c warm", "a", 0.9),
    ("cold c/d", "c cold", "d", 3.5),
    ("warm c/d", "c warm", "d", 3.5),
]


@dataclass
class Bench:
    """Everything a variant needs: where the data is and what it should read back."""

    url: str
    sa_url: str
    key: str
    pool_size: int
    clients: int
    plaintexts: dict[str, str]
    warmup_ids: list[str]
    measured_ids: list[str]
    sample_ids: list[str]


@dataclass
class Subject:
    """One variant's request (`fetch`) and how to read the secret out of its result."""

    fetch: Callable[[str], Awaitable[Any]]
    reveal: Callable[[Any], str | None]
    stats: Any = None  # the repository's CoalescerStats, for c


@dataclass
class Result:
    """One measured run of one variant."""

    rps: float
    p50_ms: float
    p99_ms: float
    lag_ms: float
    cpu_us: float  # this process's CPU time per request
    decrypt_requests: int = 0
    decrypt_batches: int = 0


@dataclass
class Summary:
    """The median of each figure over the `--repeat` runs of a variant."""

    runs: list[Result] = field(default_factory=list)

    def median(self, name: str) -> float:
        return statistics.median(getattr(run, name) for run in self.runs)


# -- the variants ---------------------------------------------------------------


def _decrypt(fernet: Fernet, token: str) -> str:
    return fernet.decrypt(token.encode("ascii")).decode("utf-8")


@asynccontextmanager
async def _pool(url: str, size: int) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(url, min_size=size, max_size=size)
    try:
        yield pool
    finally:
        await pool.close()


@asynccontextmanager
async def variant_a(bench: Bench) -> AsyncIterator[Subject]:
    fernet = Fernet(bench.key)
    async with _pool(bench.url, bench.pool_size) as pool:
        # Checked outside the timed path: a returns the token as stored.
        yield Subject(lambda t: pool.fetchrow(GET_ROW, t), lambda row: _decrypt(fernet, row[2]))


def _fetchrow_variant(*, hop: bool) -> Callable[[Bench], Any]:
    @asynccontextmanager
    async def variant_b_or_e(bench: Bench) -> AsyncIterator[Subject]:
        fernet = Fernet(bench.key)
        async with _pool(bench.url, bench.pool_size) as pool:

            async def fetch(tenant_id: str) -> str:
                row = await pool.fetchrow(GET_ROW, tenant_id)
                if hop:  # b: one worker-thread hop per call
                    return await anyio.to_thread.run_sync(_decrypt, fernet, row[2])
                return _decrypt(fernet, row[2])  # e: inline, on the loop

            yield Subject(fetch, lambda plain: plain)

    return variant_b_or_e


def _repository_variant(*, warm: bool) -> Callable[[Bench], Any]:
    @asynccontextmanager
    async def variant_c(bench: Bench) -> AsyncIterator[Subject]:
        async with _pool(bench.url, bench.pool_size) as pool:
            repo = TenantRepository(pool, KeyRing(bench.key), **({} if warm else {"cache_size": 0}))
            if warm:  # one untimed pass over every tenant fills the cache
                await _drive(repo.get_tenant, list(bench.plaintexts), bench.clients)
            yield Subject(
                repo.get_tenant,
                lambda tenant: tenant.gemini_api_key.get_secret_value(),
                repo.decryptor.stats,
            )

    return variant_c


def tenant_sa_model(key: str) -> type[Any]:
    """The ORM class for `tenants_sa`, its secret column keyed by `key` (hashed by FernetEngine)."""

    class Base(DeclarativeBase):
        pass

    class TenantSA(Base):
        __tablename__ = "tenants_sa"
        tenant_id: Mapped[str] = mapped_column(Text, primary_key=True)
        name: Mapped[str] = mapped_column(Text)
        gemini_api_key: Mapped[str | None] = mapped_column(
            StringEncryptedType(Unicode, key, FernetEngine)
        )
        created_at: Mapped[datetime] = mapped_column(
            DateTime(timezone=True), server_default=func.now()
        )
        updated_at: Mapped[datetime] = mapped_column(
            DateTime(timezone=True), server_default=func.now()
        )

    return TenantSA


@asynccontextmanager
async def variant_d(bench: Bench) -> AsyncIterator[Subject]:
    model = tenant_sa_model(bench.key)
    engine = create_async_engine(bench.sa_url, pool_size=bench.pool_size, max_overflow=0)
    sessions = async_sessionmaker(engine)

    async def fetch(tenant_id: str) -> Any:
        session: AsyncSession
        async with sessions() as session:  # a fresh session per request, as an app would
            return await session.get(model, tenant_id)

    try:
        yield Subject(fetch, lambda tenant: tenant.gemini_api_key)
    finally:
        await engine.dispose()


# name -> (table label, setup yielding a Subject)
VARIANTS: dict[str, tuple[str, Callable[[Bench], Any]]] = {
    "a": ("a  asyncpg fetchrow (limit)", variant_a),
    "b": ("b  fetchrow + hop per call", _fetchrow_variant(hop=True)),
    "c cold": ("c  get_tenant cold", _repository_variant(warm=False)),
    "c warm": ("c  get_tenant warm", _repository_variant(warm=True)),
    "d": ("d  SQLAlchemy ORM + utils", variant_d),
    "e": ("e  fetchrow + inline decrypt", _fetchrow_variant(hop=False)),
}


# -- driving and measuring ------------------------------------------------------


async def _drive(
    fetch: Callable[[str], Awaitable[Any]], ids: list[str], clients: int
) -> list[float]:
    """Run `ids` through `clients` coroutines sharing one iterator; return latencies (s)."""
    pending = iter(ids)
    latencies: list[float] = []

    async def client() -> None:
        for tenant_id in pending:
            start = time.perf_counter()
            await fetch(tenant_id)
            latencies.append(time.perf_counter() - start)

    async with asyncio.TaskGroup() as group:
        for _ in range(clients):
            group.create_task(client())
    return latencies


async def _verify(name: str, subject: Subject, bench: Bench) -> None:
    for tenant_id in bench.sample_ids:
        got = subject.reveal(await subject.fetch(tenant_id))
        if got != bench.plaintexts[tenant_id]:
            raise RuntimeError(f"variant {name} read a wrong secret for {tenant_id}")


async def measure(name: str, bench: Bench) -> Result:
    """Set up a variant, verify it, warm it up, then time `measured_ids` through it."""
    async with VARIANTS[name][1](bench) as subject:
        await _verify(name, subject, bench)
        await _drive(subject.fetch, bench.warmup_ids, bench.clients)
        before = (subject.stats.requests, subject.stats.batches) if subject.stats else (0, 0)
        stop = asyncio.Event()
        monitor = asyncio.create_task(worst_lag(stop))
        await asyncio.sleep(0.01)  # let the monitor take its first step
        cpu, wall = time.process_time(), time.perf_counter()
        latencies = await _drive(subject.fetch, bench.measured_ids, bench.clients)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        stop.set()
        lag = await monitor
        after = (subject.stats.requests, subject.stats.batches) if subject.stats else (0, 0)
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return Result(
        rps=len(latencies) / wall,
        p50_ms=cuts[49] * 1e3,
        p99_ms=cuts[98] * 1e3,
        lag_ms=lag * 1e3,
        cpu_us=cpu / len(latencies) * 1e6,
        decrypt_requests=after[0] - before[0],
        decrypt_batches=after[1] - before[1],
    )


# -- the database -----------------------------------------------------------------


def _api_key(rng: random.Random) -> str:
    return "AIza" + "".join(rng.choices(string.ascii_letters + string.digits + "-_", k=35))


async def fill(url: str, sa_url: str, key: str, plaintexts: dict[str, str]) -> None:
    """Migrate the fresh database, then load `tenants` (ours) and `tenants_sa` (the peer's)."""
    keyring = KeyRing(key)
    ids = list(plaintexts)
    names = [f"Tenant {tenant_id}" for tenant_id in ids]
    tokens = keyring.encrypt_batch(list(plaintexts.values()))
    async with _pool(url, 2) as pool:
        await upgrade(pool, keyring)
        await pool.execute(FILL, ids, names, tokens)
        await pool.execute("ANALYZE tenants")
    model = tenant_sa_model(key)
    engine = create_async_engine(sa_url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(model.metadata.create_all)
            rows = [
                {"tenant_id": t, "name": n, "gemini_api_key": plaintexts[t]}
                for t, n in zip(ids, names, strict=True)
            ]
            await conn.execute(insert(model), rows)
            await conn.exec_driver_sql("ANALYZE tenants_sa")
    finally:
        await engine.dispose()


# -- the run and its report ---------------------------------------------------------


async def run(args: argparse.Namespace, server: str) -> dict[str, Summary]:
    rng = random.Random(args.seed)
    plaintexts = {f"tenant-{i:06d}": _api_key(rng) for i in range(args.tenants)}
    ids = list(plaintexts)
    async with scratch_database(server) as url:
        sa_url = with_database(url, urlsplit(url).path[1:], scheme="postgresql+asyncpg")
        bench = Bench(
            url=url,
            sa_url=sa_url,
            key=generate_encryption_key(),
            pool_size=args.pool_size,
            clients=args.clients,
            plaintexts=plaintexts,
            warmup_ids=rng.choices(ids, k=args.warmup),
            measured_ids=rng.choices(ids, k=args.requests),
            sample_ids=rng.sample(ids, k=min(VERIFY_SAMPLE, len(ids))),
        )
        await fill(url, sa_url, bench.key, plaintexts)
        summaries = {name: Summary() for name in VARIANTS}
        for round_ in range(args.repeat):
            for name in VARIANTS:  # interleaved, so drift hits every variant alike
                result = await measure(name, bench)
                summaries[name].runs.append(result)
                if args.output_format == "text":
                    print(
                        f"  round {round_ + 1} {name:7} {result.rps:9,.0f} req/s", file=sys.stderr
                    )
    return summaries


def ratios(summaries: dict[str, Summary]) -> list[tuple[str, float, float]]:
    """(name, value, target) for each target ratio, from median req/s."""
    return [
        (label, summaries[num].median("rps") / summaries[den].median("rps"), target)
        for label, num, den, target in TARGETS
    ]


def coalescer(summaries: dict[str, Summary]) -> dict[str, tuple[int, int]]:
    """For c cold and warm: (decrypt requests, worker batches) summed over the timed runs."""
    return {
        name: (
            sum(r.decrypt_requests for r in summaries[name].runs),
            sum(r.decrypt_batches for r in summaries[name].runs),
        )
        for name in ("c cold", "c warm")
    }


def format_text(summaries: dict[str, Summary], args: argparse.Namespace) -> str:
    """The table, the ratios against their targets, and the coalescer's batching."""
    lines = [
        f"get_tenant: {args.tenants} tenants, {args.clients} clients, pool {args.pool_size}, "
        f"{args.requests} requests (+{args.warmup} warm-up), median of {args.repeat}, "
        f"{os.cpu_count()} CPUs",
        "",
        f"{'variant':31} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'worst lag ms':>13}"
        f" {'cpu us/req':>11}",
    ]
    for name, summary in summaries.items():
        m = summary.median
        lines.append(
            f"{VARIANTS[name][0]:31} {m('rps'):9,.0f} {m('p50_ms'):8.2f} {m('p99_ms'):8.2f}"
            f" {m('lag_ms'):13.2f} {m('cpu_us'):11.0f}"
        )
    lines.append("")
    for label, value, target in ratios(summaries):
        verdict = "ok" if value >= target else "MISS"
        lines.append(f"{label:9} {value:6.2f}   target >= {target:<4}  {verdict}")
    lines.append("")
    for name, (requests, batches) in coalescer(summaries).items():
        per_hop = f"{requests / batches:.1f}" if batches else "-"
        lines.append(
            f"coalescer, {name}: {requests} decrypt requests in {batches} batches"
            f" -> {per_hop} decrypts per hop"
        )
    return "\n".join(lines)


def format_json(summaries: dict[str, Summary], args: argparse.Namespace) -> str:
    report = {
        "config": {k: v for k, v in vars(args).items() if k != "database_url"},
        "variants": {
            name: {
                "median": {f: s.median(f) for f in ("rps", "p50_ms", "p99_ms", "lag_ms", "cpu_us")},
                "runs": [asdict(r) for r in s.runs],
            }
            for name, s in summaries.items()
        },
        "ratios": {
            label: {"value": value, "target": target, "ok": value >= target}
            for label, value, target in ratios(summaries)
        },
        "coalescer": {
            name: {"requests": requests, "batches": batches}
            for name, (requests, batches) in coalescer(summaries).items()
        },
    }
    return json.dumps(report, indent=2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", help="server to create a scratch database on")
    parser.add_argument("--tenants", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--pool-size", type=int, default=10)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--warmup", type=int, default=2_000)
    parser.add_argument("--repeat", type=int, default=1, help="interleaved rounds (median)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--output-format", choices=["text", "json"], default="text")
    args = parser.parse_args(argv)
    for name in ("tenants", "clients", "pool_size", "requests", "repeat"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} is expected to be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    summaries = asyncio.run(run(args, server_url(args.database_url)))
    print(
        format_json(summaries, args)
        if args.output_format == "json"
        else format_text(summaries, args)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
