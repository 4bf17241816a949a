"""How fast is `TenantRepository.get_tenant`, next to its limit and its alternatives?

One run, one fresh database, two sets of tenants: with one secret (a Gemini
key) and with four (three of the four present on most rows). Per set, the
variants side by side:

  a  raw asyncpg `fetchrow` of the same row, no decryption: the limit
  b  `fetchrow` + one `anyio.to_thread.run_sync` per call decrypting the row's secrets
  c  `TenantRepository.get_tenant`, cold (`cache_size=0`) and warm (default cache, primed)
  d  SQLAlchemy 2 async ORM + sqlalchemy-utils `StringEncryptedType(FernetEngine)`: a peer
  e  `fetchrow` + the row's secrets decrypted inline on the loop: a reference
  f  `get_tenant` with a `LiveCache` (served from memory, kept fresh by NOTIFY)

Each variant gets a fresh pool, `--clients` coroutines drawing the same seeded
tenant ids, an untimed warm-up, then `--requests` timed ones, while a monitor
task records the worst event-loop lag. Rounds interleave the variants, so
drift hits each alike; the tables give medians, the ratios every round.
`--zipf S` draws the ids from a Zipf distribution (rank r with weight
1/r^S, ranks shuffled over the tenants) instead of uniformly, for every
variant alike.

f's clients yield to the loop once per request (outside the timed call), as
a server does between requests: a cache hit never waits, so otherwise one
client would serve every request and no notification would be handled.
Besides its rate and latency, f reports its hit ratio, then, under the same
load, the commit-to-visible delay: a writer process updates the hottest
tenants (`--live-writes`, one every `--live-interval` s) and timestamps each
commit; the clients record when they first read each new value. Last, the
memory one cached tenant costs (tracemalloc, the repository's other caches
off, so the live cache alone holds the tenants).

    uv run python benchmarks/get_tenant.py --repeat 3
    uv run python benchmarks/get_tenant.py --zipf 1.1 --sets 4 --only a --only f
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import os
import random
import statistics
import string
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import anyio.to_thread
import asyncpg
from _common import run_child, scratch_database, server_url, with_database, worst_lag
from cryptography.fernet import Fernet
from sqlalchemy import DateTime, Text, Unicode, func, insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy_utils import StringEncryptedType
from sqlalchemy_utils.types.encrypted.encrypted_type import FernetEngine

from tenantstore import KeyRing, LiveCache, TenantRepository
from tenantstore.encryption import generate_encryption_key
from tenantstore.live_cache import CHANNEL
from tenantstore.migrate import upgrade
from tenantstore.models import TENANTS, Tenant

COLUMNS = ", ".join(Tenant.model_fields)
GET_ROW = f"SELECT {COLUMNS} FROM tenants WHERE tenant_id = $1"
SECRET_AT = [list(Tenant.model_fields).index(c) for c in TENANTS.secrets]
FILL = (
    f"INSERT INTO tenants (tenant_id, name, {', '.join(TENANTS.secrets)}) "
    "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[])"
)
SET_GEMINI = "UPDATE tenants SET gemini_api_key = $2 WHERE tenant_id = $1"
VERIFY_SAMPLE = 100
# (ratio name, numerator, denominator, target): numerator / denominator >= target.
TARGETS = [
    ("cold c/e", "c cold", "e", 0.85),
    ("cold c/b", "c cold", "b", 1.7),
    ("warm c/a", "c warm", "a", 0.9),
    ("cold c/d", "c cold", "d", 3.5),
    ("warm c/d", "c warm", "d", 3.5),
    ("live f/a", "f", "a", 10.0),
]
SETS = {"1": "one secret", "4": "four secrets"}
# The scratch key and URL reach the live-cache writer child here, not on argv.
KEY_ENV, URL_ENV = "TENANTSTORE_BENCH_KEY", "TENANTSTORE_BENCH_URL"
IDS_ENV = "TENANTSTORE_BENCH_IDS"
LIVE_HOT = 20  # the writer updates the hottest tenants, in turn


@dataclass
class Bench:
    """Everything a variant needs: where the data is and what it should read back."""

    url: str
    sa_url: str
    key: str
    pool_size: int
    clients: int
    secrets: dict[str, tuple[str | None, ...]]  # tenant id -> plaintexts in TENANTS order
    warmup_ids: list[str]
    measured_ids: list[str]
    sample_ids: list[str]
    ranked_ids: list[str]  # hottest first (with --zipf; otherwise in no particular order)
    live_writes: int = 200
    live_interval: float = 0.01
    live_max_tenants: int = 10_000


@dataclass
class Subject:
    """One variant's request (`fetch`) and how to read the secrets out of its result."""

    fetch: Callable[[str], Awaitable[Any]]
    reveal: Callable[[Any], tuple[str | None, ...]]
    stats: Any = None  # the repository's CoalescerStats, for c
    repo: TenantRepository | None = None  # f: its live cache's figures


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
    # f only: hits over lookups in the timed run, commit-to-visible delays, memory
    hit_ratio: float | None = None
    visible_p50_ms: float | None = None
    visible_p99_ms: float | None = None
    notified_p50_ms: float | None = None
    notified_p99_ms: float | None = None
    visible_writes: int = 0
    visible_missed: int = 0
    bytes_per_tenant: float | None = None


@dataclass
class Summary:
    """The runs of a variant, and the median of each figure over them."""

    runs: list[Result] = field(default_factory=list)

    def median(self, name: str) -> float:
        return statistics.median(getattr(run, name) for run in self.runs)


# -- the variants ---------------------------------------------------------------


def _decrypt_row(fernet: Fernet, row: Any) -> tuple[str | None, ...]:
    return tuple(
        None if (t := row[at]) is None else fernet.decrypt(t.encode()).decode() for at in SECRET_AT
    )


def _revealed(tenant: Tenant) -> tuple[str | None, ...]:
    values = (getattr(tenant, column) for column in TENANTS.secrets)
    return tuple(None if v is None else v.get_secret_value() for v in values)


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
        # Checked outside the timed path: a returns the tokens as stored.
        yield Subject(lambda t: pool.fetchrow(GET_ROW, t), lambda row: _decrypt_row(fernet, row))


def _fetchrow_variant(*, hop: bool) -> Callable[[Bench], Any]:
    @asynccontextmanager
    async def variant_b_or_e(bench: Bench) -> AsyncIterator[Subject]:
        fernet = Fernet(bench.key)
        async with _pool(bench.url, bench.pool_size) as pool:

            async def fetch(tenant_id: str) -> tuple[str | None, ...]:
                row = await pool.fetchrow(GET_ROW, tenant_id)
                if hop:  # b: one worker-thread hop per call, for all of the row's secrets
                    return await anyio.to_thread.run_sync(_decrypt_row, fernet, row)
                return _decrypt_row(fernet, row)  # e: inline, on the loop

            yield Subject(fetch, lambda plain: plain)

    return variant_b_or_e


def _repository_variant(*, warm: bool) -> Callable[[Bench], Any]:
    @asynccontextmanager
    async def variant_c(bench: Bench) -> AsyncIterator[Subject]:
        async with _pool(bench.url, bench.pool_size) as pool:
            repo = TenantRepository(pool, KeyRing(bench.key), cache_size=None if warm else 0)
            if warm:  # one untimed pass over every tenant of the set fills the cache
                await _drive(repo.get_tenant, list(bench.secrets), bench.clients)
            yield Subject(repo.get_tenant, _revealed, repo.crypto.coalescer.stats)

    return variant_c


def tenant_sa_model(key: str) -> type[Any]:
    """The ORM class for `tenants_sa`, each secret column encrypted by FernetEngine."""

    class Base(DeclarativeBase):
        pass

    def secret() -> Any:
        return mapped_column(StringEncryptedType(Unicode, key, FernetEngine), nullable=True)

    class TenantSA(Base):
        __tablename__ = "tenants_sa"
        tenant_id: Mapped[str] = mapped_column(Text, primary_key=True)
        name: Mapped[str] = mapped_column(Text)
        gemini_api_key: Mapped[str | None] = secret()
        oauth_access_token: Mapped[str | None] = secret()
        oauth_refresh_token: Mapped[str | None] = secret()
        webhook_signing_secret: Mapped[str | None] = secret()
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
        yield Subject(fetch, lambda t: tuple(getattr(t, c) for c in TENANTS.secrets))
    finally:
        await engine.dispose()


@asynccontextmanager
async def variant_f(bench: Bench) -> AsyncIterator[Subject]:
    async with _pool(bench.url, bench.pool_size) as pool:
        cache = LiveCache(listen_dsn=bench.url, max_tenants=bench.live_max_tenants)
        async with TenantRepository(pool, KeyRing(bench.key), live_cache=cache) as repo:
            await asyncio.wait_for(cache.wait_live(), 30)
            # As for c warm: one untimed pass over every tenant of the set fills the
            # cache (as far as max_tenants lets it), as a running service's would be.
            await _drive(repo.get_tenant, list(bench.secrets), bench.clients)
            yield Subject(repo.get_tenant, _revealed, repo.crypto.coalescer.stats, repo)


# name -> (table label, setup yielding a Subject)
VARIANTS: dict[str, tuple[str, Callable[[Bench], Any]]] = {
    "a": ("a  asyncpg fetchrow (limit)", variant_a),
    "b": ("b  fetchrow + hop per call", _fetchrow_variant(hop=True)),
    "c cold": ("c  get_tenant cold", _repository_variant(warm=False)),
    "c warm": ("c  get_tenant warm", _repository_variant(warm=True)),
    "d": ("d  SQLAlchemy ORM + utils", variant_d),
    "e": ("e  fetchrow + inline decrypt", _fetchrow_variant(hop=False)),
    "f": ("f  get_tenant live cache", variant_f),
}


# -- driving and measuring ------------------------------------------------------


async def _drive(
    fetch: Callable[[str], Awaitable[Any]],
    ids: Iterable[str],
    clients: int,
    *,
    pause: bool = False,
    stop: asyncio.Event | None = None,
) -> list[float]:
    """Run `ids` through `clients` coroutines sharing one iterator; return latencies (s).

    `pause`: yield to the loop after each request (untimed). `stop`: end early once set.
    """
    pending = iter(ids)
    latencies: list[float] = []

    async def client() -> None:
        for tenant_id in pending:
            start = time.perf_counter()
            await fetch(tenant_id)
            latencies.append(time.perf_counter() - start)
            if pause:
                await asyncio.sleep(0)
            if stop is not None and stop.is_set():
                return

    async with asyncio.TaskGroup() as group:
        for _ in range(clients):
            group.create_task(client())
    return latencies


async def _verify(name: str, subject: Subject, bench: Bench) -> None:
    for tenant_id in bench.sample_ids:
        got = subject.reveal(await subject.fetch(tenant_id))
        if got != bench.secrets[tenant_id]:
            raise RuntimeError(f"variant {name} read wrong secrets for {tenant_id}")


def _lookups(repo: TenantRepository | None) -> tuple[int, int]:
    if repo is None:
        return 0, 0
    metrics = repo.crypto.metrics
    return metrics.count("cache.hits", ("live",)), metrics.count("cache.misses", ("live",))


async def measure(name: str, bench: Bench) -> Result:
    """Set up a variant, verify it, warm it up, then time `measured_ids` through it."""
    async with VARIANTS[name][1](bench) as subject:
        pause = subject.repo is not None
        await _verify(name, subject, bench)
        await _drive(subject.fetch, bench.warmup_ids, bench.clients, pause=pause)
        before = (subject.stats.requests, subject.stats.batches) if subject.stats else (0, 0)
        looked = _lookups(subject.repo)
        stop = asyncio.Event()
        monitor = asyncio.create_task(worst_lag(stop))
        await asyncio.sleep(0.01)  # let the monitor take its first step
        cpu, wall = time.process_time(), time.perf_counter()
        latencies = await _drive(subject.fetch, bench.measured_ids, bench.clients, pause=pause)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        stop.set()
        lag = await monitor
        after = (subject.stats.requests, subject.stats.batches) if subject.stats else (0, 0)
        live: dict[str, Any] = {}
        if subject.repo is not None:
            hits, misses = (n - m for n, m in zip(_lookups(subject.repo), looked, strict=True))
            live["hit_ratio"] = hits / max(1, hits + misses)
            live.update(await freshness(subject.repo, bench))
    if subject.repo is not None:
        live["bytes_per_tenant"] = await memory_per_tenant(bench)
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return Result(
        rps=len(latencies) / wall,
        p50_ms=cuts[49] * 1e3,
        p99_ms=cuts[98] * 1e3,
        lag_ms=lag * 1e3,
        cpu_us=cpu / len(latencies) * 1e6,
        decrypt_requests=after[0] - before[0],
        decrypt_batches=after[1] - before[1],
        **live,
    )


# -- f: freshness under load, memory --------------------------------------------------


async def freshness(repo: TenantRepository, bench: Bench) -> dict[str, Any]:
    """Commit-to-visible delays of a writer process's updates, with the clients reading on."""
    seen: dict[str, float] = {}

    async def fetch(tenant_id: str) -> None:
        tenant = await repo.get_tenant(tenant_id)
        key = None if tenant is None else tenant.gemini_api_key
        if key is not None:
            value = key.get_secret_value()
            if value.startswith("live-") and value not in seen:
                seen[value] = time.monotonic()  # system-wide clock: the writer's too

    hot = bench.ranked_ids[:LIVE_HOT]
    # A LISTEN connection of the benchmark's own, on the same loop: the writer's
    # statements commit one at a time, so the i-th notification is the i-th write's.
    arrivals: list[float] = []
    listen = await asyncpg.connect(bench.url)
    await listen.add_listener(CHANNEL, lambda *_: arrivals.append(time.monotonic()))
    argv = [__file__, "--live-writer", "--live-writes", str(bench.live_writes),
            "--live-interval", str(bench.live_interval)]  # fmt: skip
    env = {KEY_ENV: bench.key, URL_ENV: bench.url, IDS_ENV: json.dumps(hot)}
    writer = asyncio.create_task(run_child(argv, env))
    done = asyncio.Event()
    writer.add_done_callback(lambda _: done.set())
    await _drive(fetch, itertools.cycle(bench.measured_ids), bench.clients, pause=True, stop=done)
    commits: list[tuple[str, float]] = (await writer)["commits"]
    await listen.close()
    # Put the written tenants back as they were, for the variants still to run.
    fernet = Fernet(bench.key)
    conn = await asyncpg.connect(bench.url)
    try:
        await conn.executemany(
            SET_GEMINI,
            [(t, fernet.encrypt(str(bench.secrets[t][0]).encode()).decode()) for t in hot],
        )
    finally:
        await conn.close()
    delays = [(seen[value] - at) * 1e3 for value, at in commits if value in seen]
    notified = [(t - at) * 1e3 for t, (_, at) in zip(arrivals, commits, strict=False)]
    cuts = _cuts(delays)
    notify_cuts = _cuts(notified)
    return {
        "visible_p50_ms": cuts[49] if cuts else None,
        "visible_p99_ms": cuts[98] if cuts else None,
        "notified_p50_ms": notify_cuts[49] if notify_cuts else None,
        "notified_p99_ms": notify_cuts[98] if notify_cuts else None,
        "visible_writes": len(commits),
        "visible_missed": len(commits) - len(delays),
    }


def _cuts(values: list[float]) -> list[float] | None:
    return statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else None


async def live_writer(args: argparse.Namespace) -> dict[str, Any]:
    """The writer child: update the hottest tenants in turn, timestamping each commit."""
    fernet = Fernet(os.environ[KEY_ENV])
    hot: list[str] = json.loads(os.environ[IDS_ENV])
    conn = await asyncpg.connect(os.environ[URL_ENV])
    commits = []
    try:
        await asyncio.sleep(0.2)  # the readers are under way
        for k in range(args.live_writes):
            value = f"live-{k}"
            token = fernet.encrypt(value.encode()).decode()
            await conn.execute(SET_GEMINI, hot[k % len(hot)], token)
            commits.append((value, time.monotonic()))  # acknowledged, so committed
            await asyncio.sleep(args.live_interval)
    finally:
        await conn.close()
    return {"commits": commits}


async def memory_per_tenant(bench: Bench) -> float:
    """Bytes one cached tenant costs: every tenant loaded, the repository's other caches off."""
    ids = list(bench.secrets)
    async with _pool(bench.url, 2) as pool:
        cache = LiveCache(listen_dsn=bench.url, max_tenants=len(ids))
        keyring = KeyRing(bench.key)
        async with TenantRepository(pool, keyring, cache_size=0, live_cache=cache) as repo:
            await asyncio.wait_for(cache.wait_live(), 30)
            await repo.get_tenants(ids[:100])  # first-call allocations: statements, codecs
            cache.flush()
            gc.collect()
            tracemalloc.start()
            try:
                for start in range(0, len(ids), 1000):
                    await repo.get_tenants(ids[start : start + 1000])
                gc.collect()
                held = tracemalloc.get_traced_memory()[0]
            finally:
                tracemalloc.stop()
            return held / len(cache)


# -- the database -----------------------------------------------------------------


def _text(rng: random.Random, prefix: str, length: int) -> str:
    return prefix + "".join(rng.choices(string.ascii_letters + string.digits + "-_", k=length))


def make_secrets(rng: random.Random, count: int, width: str) -> dict[str, tuple[str | None, ...]]:
    """Plaintexts per tenant: a Gemini key; with four, OAuth tokens and a webhook secret,
    the access token absent on every 4th tenant and the webhook secret on every 4th + 2."""
    out: dict[str, tuple[str | None, ...]] = {}
    for i in range(count):
        gemini = _text(rng, "AIza", 35)
        if width == "1":
            out[f"one-{i:06d}"] = (gemini, None, None, None)
        else:
            access = None if i % 4 == 1 else _text(rng, "ya29.", 195)
            refresh = _text(rng, "1//", 100)
            webhook = None if i % 4 == 3 else _text(rng, "whsec_", 26)
            out[f"four-{i:06d}"] = (gemini, access, refresh, webhook)
    return out


async def fill(url: str, sa_url: str, key: str, secrets: dict[str, tuple[str | None, ...]]) -> None:
    """Migrate the fresh database, then load `tenants` (ours) and `tenants_sa` (the peer's)."""
    keyring = KeyRing(key)
    ids = list(secrets)
    names = [f"Tenant {tenant_id}" for tenant_id in ids]
    columns = [keyring.encrypt_batch([row[c] for row in secrets.values()]) for c in range(4)]
    async with _pool(url, 2) as pool:
        await upgrade(pool, keyring)
        await pool.execute(FILL, ids, names, *columns)
        await pool.execute("ANALYZE tenants")
    model = tenant_sa_model(key)
    engine = create_async_engine(sa_url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(model.metadata.create_all)
            rows = [
                {"tenant_id": t, "name": n, **dict(zip(TENANTS.secrets, secrets[t], strict=True))}
                for t, n in zip(ids, names, strict=True)
            ]
            await conn.execute(insert(model), rows)
            await conn.exec_driver_sql("ANALYZE tenants_sa")
    finally:
        await engine.dispose()


# -- the run and its report ---------------------------------------------------------


def draw(
    rng: random.Random, ids: list[str], zipf: float | None
) -> tuple[list[str], Callable[[int], list[str]]]:
    """(ids hottest first, a function drawing k ids): uniform, or Zipf with exponent `zipf`."""
    if zipf is None:
        return list(ids), lambda k: rng.choices(ids, k=k)
    ranked = list(ids)
    rng.shuffle(ranked)
    weights = list(itertools.accumulate(1 / rank**zipf for rank in range(1, len(ranked) + 1)))
    return ranked, lambda k: rng.choices(ranked, cum_weights=weights, k=k)


async def run(args: argparse.Namespace, server: str) -> dict[str, dict[str, Summary]]:
    rng = random.Random(args.seed)
    sets = {width: make_secrets(rng, args.tenants, width) for width in args.sets}
    key = generate_encryption_key()
    async with scratch_database(server) as url:
        sa_url = with_database(url, urlsplit(url).path[1:], scheme="postgresql+asyncpg")
        await fill(url, sa_url, key, {t: s for one in sets.values() for t, s in one.items()})
        benches = {}
        for width, secrets in sets.items():
            ranked, choose = draw(rng, list(secrets), args.zipf)
            benches[width] = Bench(
                url=url,
                sa_url=sa_url,
                key=key,
                pool_size=args.pool_size,
                clients=args.clients,
                secrets=secrets,
                warmup_ids=choose(args.warmup),
                measured_ids=choose(args.requests),
                sample_ids=rng.sample(list(secrets), k=min(VERIFY_SAMPLE, len(secrets))),
                ranked_ids=ranked,
                live_writes=args.live_writes,
                live_interval=args.live_interval,
                live_max_tenants=args.live_max_tenants or len(secrets),
            )
        summaries = {width: {name: Summary() for name in args.variants} for width in sets}
        for round_ in range(args.repeat):
            for width, bench in benches.items():
                for name in args.variants:  # interleaved, so drift hits every variant alike
                    result = await measure(name, bench)
                    summaries[width][name].runs.append(result)
                    if args.output_format == "text":
                        print(
                            f"  round {round_ + 1} {SETS[width]:12} {name:7} "
                            f"{result.rps:9,.0f} req/s",
                            file=sys.stderr,
                        )
    return summaries


def ratios(summaries: dict[str, Summary]) -> list[tuple[str, float, list[float], float]]:
    """(name, median ratio, ratio in each round, target) for each target whose variants ran."""
    out = []
    for label, num, den, target in TARGETS:
        if num in summaries and den in summaries:
            rounds = [
                n.rps / d.rps for n, d in zip(summaries[num].runs, summaries[den].runs, strict=True)
            ]
            value = summaries[num].median("rps") / summaries[den].median("rps")
            out.append((label, value, rounds, target))
    return out


def overhead_us(summaries: dict[str, Summary], name: str) -> float | None:
    """Client CPU per request of a variant over raw fetchrow's (a), in microseconds."""
    if name not in summaries or "a" not in summaries:
        return None
    return summaries[name].median("cpu_us") - summaries["a"].median("cpu_us")


def format_text(results: dict[str, dict[str, Summary]], args: argparse.Namespace) -> str:
    """Per set of tenants: the table, the ratios against their targets, the batching."""
    lines = [
        f"get_tenant: {args.tenants} tenants a set, {args.clients} clients, pool "
        f"{args.pool_size}, {args.requests} requests (+{args.warmup} warm-up), median of "
        f"{args.repeat}, {os.cpu_count()} CPUs, ids "
        + ("uniform" if args.zipf is None else f"Zipf s={args.zipf}")
    ]
    for width, summaries in results.items():
        lines += [
            "",
            f"-- {SETS[width]} --",
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
        for label, value, rounds, target in ratios(summaries):
            verdict = "ok" if min(rounds) >= target else "MISS"
            each = ", ".join(f"{r:.2f}" for r in rounds)
            lines.append(
                f"{label:9} {value:6.2f}  (rounds: {each})  target >= {target:<4} {verdict}"
            )
        for name in ("c warm", "c cold"):
            extra = overhead_us(summaries, name)
            if extra is not None:
                lines.append(f"{name}: {extra:+.1f} us of client CPU per request over a")
        for name in ("c cold", "c warm"):
            if name in summaries:
                requests = sum(r.decrypt_requests for r in summaries[name].runs)
                batches = sum(r.decrypt_batches for r in summaries[name].runs)
                per_hop = f"{requests / batches:.1f}" if batches else "-"
                lines.append(
                    f"coalescer, {name}: {requests} decrypt requests in {batches} batches"
                    f" -> {per_hop} requests per hop"
                )
        if "f" in summaries:
            lines += live_lines(summaries["f"], width)
    return "\n".join(lines)


def live_figures(summary: Summary) -> dict[str, float | int | None]:
    """f's own figures, median over rounds (None where a round had none)."""

    def median(name: str) -> float | None:
        values = [v for r in summary.runs if (v := getattr(r, name)) is not None]
        return statistics.median(values) if values else None

    return {
        "hit_ratio": median("hit_ratio"),
        "visible_p50_ms": median("visible_p50_ms"),
        "visible_p99_ms": median("visible_p99_ms"),
        "notified_p50_ms": median("notified_p50_ms"),
        "notified_p99_ms": median("notified_p99_ms"),
        "visible_writes": sum(r.visible_writes for r in summary.runs),
        "visible_missed": sum(r.visible_missed for r in summary.runs),
        "bytes_per_tenant": median("bytes_per_tenant"),
    }


def live_lines(summary: Summary, width: str) -> list[str]:
    f = live_figures(summary)
    p50, p99 = summary.median("p50_ms") * 1e3, summary.median("p99_ms") * 1e3

    def ms(value: float | int | None) -> str:
        return "-" if value is None else f"{value:.2f} ms"

    hit = "-" if f["hit_ratio"] is None else f"{f['hit_ratio']:.1%}"
    size = "-" if f["bytes_per_tenant"] is None else f"{f['bytes_per_tenant']:,.0f} bytes"
    return [
        f"f live: p50 {p50:.1f} us, p99 {p99:.1f} us per call (the table rounds to 0.01 ms)",
        f"f live: hit ratio {hit} (timed run); under the same load, over"
        f" {f['visible_writes']} writes ({f['visible_missed']} never seen):",
        f"  commit-to-visible (first read of the new value) p50 {ms(f['visible_p50_ms'])},"
        f" p99 {ms(f['visible_p99_ms'])}",
        f"  commit-to-notified (its notification reaches this process) p50"
        f" {ms(f['notified_p50_ms'])}, p99 {ms(f['notified_p99_ms'])}",
        f"f live: {size} per cached tenant ({SETS[width]}, the live cache alone)",
    ]


def format_json(results: dict[str, dict[str, Summary]], args: argparse.Namespace) -> str:
    report = {
        "config": {k: v for k, v in vars(args).items() if k != "database_url"},
        "sets": {
            width: {
                "variants": {
                    name: {
                        "median": {
                            f: s.median(f) for f in ("rps", "p50_ms", "p99_ms", "lag_ms", "cpu_us")
                        },
                        "runs": [asdict(r) for r in s.runs],
                    }
                    for name, s in summaries.items()
                },
                "ratios": {
                    label: {"value": v, "rounds": rounds, "target": t, "ok": min(rounds) >= t}
                    for label, v, rounds, t in ratios(summaries)
                },
                "overhead_us": {n: overhead_us(summaries, n) for n in ("c warm", "c cold")},
                "live": live_figures(summaries["f"]) if "f" in summaries else None,
            }
            for width, summaries in results.items()
        },
    }
    return json.dumps(report, indent=2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", help="server to create a scratch database on")
    parser.add_argument("--tenants", type=int, default=10_000, help="tenants in each set")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--pool-size", type=int, default=10)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--warmup", type=int, default=2_000)
    parser.add_argument("--repeat", type=int, default=1, help="interleaved rounds")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--sets", default="1,4", help="comma-separated: 1 (one secret), 4 (four secrets)"
    )
    parser.add_argument(
        "--only", action="append", choices=list(VARIANTS), help="run only these variants"
    )
    parser.add_argument(
        "--zipf", type=float, metavar="S", help="draw ids from Zipf(S) over the tenants (S > 0)"
    )
    parser.add_argument("--live-writes", type=int, default=200, help="f: writes timed for delay")
    parser.add_argument("--live-interval", type=float, default=0.01, help="f: seconds between")
    parser.add_argument(
        "--live-max-tenants", type=int, help="f: the cache's max_tenants (default: --tenants)"
    )
    parser.add_argument("--live-writer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--output-format", choices=["text", "json"], default="text")
    args = parser.parse_args(argv)
    if args.live_writer:
        return args
    for name in ("tenants", "clients", "pool_size", "requests", "repeat"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} is expected to be at least 1")
    args.sets = [s.strip() for s in args.sets.split(",")]
    if not set(args.sets) <= set(SETS):
        parser.error("--sets takes 1, 4 or 1,4")
    if args.zipf is not None and args.zipf <= 0:
        parser.error("--zipf is expected to be greater than 0")
    if args.live_writes < 2 or args.live_interval < 0:
        parser.error("--live-writes is expected to be at least 2, --live-interval at least 0")
    args.variants = args.only or list(VARIANTS)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.live_writer:  # f's writer child: its report is its last line
        print(json.dumps(asyncio.run(live_writer(args))))
        return 0
    results = asyncio.run(run(args, server_url(args.database_url)))
    print(
        format_json(results, args) if args.output_format == "json" else format_text(results, args)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
