"""How fast is `TenantRepository.get_tenant`, next to its limit and its alternatives?

One run, one fresh database, two sets of tenants: with one secret (a Gemini
key) and with four (three of the four present on most rows). Per set, the
variants side by side:

  a  raw asyncpg `fetchrow` of the same row, no decryption: the limit
  b  `fetchrow` + one `anyio.to_thread.run_sync` per call decrypting the row's secrets
  c  `TenantRepository.get_tenant`, cold (`cache_size=0`) and warm (default cache, primed)
  d  SQLAlchemy 2 async ORM + sqlalchemy-utils `StringEncryptedType(FernetEngine)`: a peer
  e  `fetchrow` + the row's secrets decrypted inline on the loop: a reference

Each variant gets a fresh pool, `--clients` coroutines drawing the same seeded
tenant ids, an untimed warm-up, then `--requests` timed ones, while a monitor
task records the worst event-loop lag. Rounds interleave the variants, so
drift hits each alike; the tables give medians, the ratios every round.

    uv run python benchmarks/get_tenant.py --repeat 3
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
from tenantstore.models import TENANTS, Tenant

COLUMNS = ", ".join(Tenant.model_fields)
GET_ROW = f"SELECT {COLUMNS} FROM tenants WHERE tenant_id = $1"
SECRET_AT = [list(Tenant.model_fields).index(c) for c in TENANTS.secrets]
FILL = (
    f"INSERT INTO tenants (tenant_id, name, {', '.join(TENANTS.secrets)}) "
    "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[])"
)
VERIFY_SAMPLE = 100
# (ratio name, numerator, denominator, target): numerator / denominator >= target.
TARGETS = [
    ("cold c/e", "c cold", "e", 0.85),
    ("cold c/b", "c cold", "b", 1.7),
    ("warm c/a", "c warm", "a", 0.9),
    ("cold c/d", "c cold", "d", 3.5),
    ("warm c/d", "c warm", "d", 3.5),
]
SETS = {"1": "one secret", "4": "four secrets"}


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


@dataclass
class Subject:
    """One variant's request (`fetch`) and how to read the secrets out of its result."""

    fetch: Callable[[str], Awaitable[Any]]
    reveal: Callable[[Any], tuple[str | None, ...]]
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
        if got != bench.secrets[tenant_id]:
            raise RuntimeError(f"variant {name} read wrong secrets for {tenant_id}")


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


async def run(args: argparse.Namespace, server: str) -> dict[str, dict[str, Summary]]:
    rng = random.Random(args.seed)
    sets = {width: make_secrets(rng, args.tenants, width) for width in args.sets}
    key = generate_encryption_key()
    async with scratch_database(server) as url:
        sa_url = with_database(url, urlsplit(url).path[1:], scheme="postgresql+asyncpg")
        await fill(url, sa_url, key, {t: s for one in sets.values() for t, s in one.items()})
        benches = {
            width: Bench(
                url=url,
                sa_url=sa_url,
                key=key,
                pool_size=args.pool_size,
                clients=args.clients,
                secrets=secrets,
                warmup_ids=rng.choices(list(secrets), k=args.warmup),
                measured_ids=rng.choices(list(secrets), k=args.requests),
                sample_ids=rng.sample(list(secrets), k=min(VERIFY_SAMPLE, len(secrets))),
            )
            for width, secrets in sets.items()
        }
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
        f"{args.repeat}, {os.cpu_count()} CPUs"
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
    return "\n".join(lines)


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
    parser.add_argument("--output-format", choices=["text", "json"], default="text")
    args = parser.parse_args(argv)
    for name in ("tenants", "clients", "pool_size", "requests", "repeat"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} is expected to be at least 1")
    args.sets = [s.strip() for s in args.sets.split(",")]
    if not set(args.sets) <= set(SETS):
        parser.error("--sets takes 1, 4 or 1,4")
    args.variants = args.only or list(VARIANTS)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = asyncio.run(run(args, server_url(args.database_url)))
    print(
        format_json(results, args) if args.output_format == "json" else format_text(results, args)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
