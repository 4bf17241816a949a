"""What does PgBouncer in transaction mode cost `TenantRepository.get_tenant`?

One run, one fresh database of tenants with four secrets (as
benchmarks/get_tenant.py makes them), one PgBouncer started by this script
(transaction mode, as tests/pgbouncer_fixture.py starts it, its server pool as
large as the application's). Variants, cold (`cache_size=0`: every call
decrypts) and warm (default cache, primed):

  direct     asyncpg pool straight to PostgreSQL, statement cache on (the default)
  nocache    straight to PostgreSQL with `pgbouncer=True` (no statement cache):
             what turning the cache off costs, without the extra hop
  pgbouncer  through PgBouncer with `pgbouncer=True`: the production set-up

Each variant gets a fresh pool, `--clients` coroutines drawing the same seeded
tenant ids, an untimed warm-up, then `--requests` timed ones. Rounds
interleave the variants, so drift hits each alike; the table gives medians,
the ratios each round.

    uv run python benchmarks/pgbouncer.py --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

from _common import scratch_database, server_url, text_table, worst_lag
from get_tenant import FILL, Result, Summary, _drive, _revealed, make_secrets

from tenantstore import KeyRing, Tenant, TenantRepository, create_pool
from tenantstore.encryption import generate_encryption_key
from tenantstore.migrate import upgrade

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
# PgBouncer is started as the tests start it: the fixture's module is shared.
from pgbouncer_fixture import PgBouncer, pgbouncer_binary

ROUTES = ("direct", "nocache", "pgbouncer")
VARIANTS = [f"{route} {cache}" for cache in ("cold", "warm") for route in ROUTES]
# (ratio name, numerator, denominator)
RATIOS = [
    ("cold pgbouncer/direct", "pgbouncer cold", "direct cold"),
    ("warm pgbouncer/direct", "pgbouncer warm", "direct warm"),
    ("cold pgbouncer/nocache", "pgbouncer cold", "nocache cold"),
    ("warm pgbouncer/nocache", "pgbouncer warm", "nocache warm"),
]
VERIFY_SAMPLE = 50


@dataclass
class Bench:
    """Where the data is (directly and through PgBouncer) and what it should read back."""

    direct_url: str
    bouncer_url: str
    key: str
    pool_size: int
    clients: int
    secrets: dict[str, tuple[str | None, ...]]
    warmup_ids: list[str]
    measured_ids: list[str]
    sample_ids: list[str]


@asynccontextmanager
async def repository(name: str, bench: Bench) -> AsyncIterator[TenantRepository]:
    """The repository of variant `name` on a fresh pool of its route."""
    route, cache = name.split()
    url = bench.bouncer_url if route == "pgbouncer" else bench.direct_url
    size = bench.pool_size
    pool = await create_pool(url, min_size=size, max_size=size, pgbouncer=route != "direct")
    try:
        repo = TenantRepository(pool, KeyRing(bench.key), cache_size=0 if cache == "cold" else None)
        if cache == "warm":  # one untimed pass over every tenant fills the cache
            await _drive(repo.get_tenant, list(bench.secrets), bench.clients)
        yield repo
    finally:
        await pool.close()


async def measure(name: str, bench: Bench) -> Result:
    """Set up a variant, check what it reads, warm it up, then time `measured_ids`."""
    async with repository(name, bench) as repo:
        for tenant_id in bench.sample_ids:
            tenant = await repo.get_tenant(tenant_id)
            if not isinstance(tenant, Tenant) or _revealed(tenant) != bench.secrets[tenant_id]:
                raise RuntimeError(f"variant {name} read wrong secrets for {tenant_id}")
        await _drive(repo.get_tenant, bench.warmup_ids, bench.clients)
        stats = repo.crypto.coalescer.stats
        before = (stats.requests, stats.batches)
        stop = asyncio.Event()
        monitor = asyncio.create_task(worst_lag(stop))
        await asyncio.sleep(0.01)  # let the monitor take its first step
        cpu, wall = time.process_time(), time.perf_counter()
        latencies = await _drive(repo.get_tenant, bench.measured_ids, bench.clients)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        stop.set()
        lag = await monitor
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return Result(
        rps=len(latencies) / wall,
        p50_ms=cuts[49] * 1e3,
        p99_ms=cuts[98] * 1e3,
        lag_ms=lag * 1e3,
        cpu_us=cpu / len(latencies) * 1e6,
        decrypt_requests=stats.requests - before[0],
        decrypt_batches=stats.batches - before[1],
    )


async def fill(url: str, key: str, secrets: dict[str, tuple[str | None, ...]]) -> None:
    """Migrate the fresh database directly, then load the tenants."""
    keyring = KeyRing(key)
    columns = [keyring.encrypt_batch([row[c] for row in secrets.values()]) for c in range(4)]
    pool = await create_pool(url, min_size=2, max_size=2)
    try:
        await upgrade(pool, keyring)
        await pool.execute(FILL, list(secrets), [f"Tenant {t}" for t in secrets], *columns)
        await pool.execute("ANALYZE tenants")
    finally:
        await pool.close()


async def run(args: argparse.Namespace, server: str) -> dict[str, Summary]:
    rng = random.Random(args.seed)
    secrets = make_secrets(rng, args.tenants, "4")
    key = generate_encryption_key()
    summaries = {name: Summary() for name in args.variants}
    async with scratch_database(server, "tenantstore_bench_pgbouncer") as url:
        await fill(url, key, secrets)
        with PgBouncer(server, pool_size=args.pool_size) as bouncer:
            ids = list(secrets)
            bench = Bench(
                direct_url=url,
                bouncer_url=bouncer.url(urlsplit(url).path.lstrip("/")),
                key=key,
                pool_size=args.pool_size,
                clients=args.clients,
                secrets=secrets,
                warmup_ids=rng.choices(ids, k=args.warmup),
                measured_ids=rng.choices(ids, k=args.requests),
                sample_ids=rng.sample(ids, k=min(VERIFY_SAMPLE, len(ids))),
            )
            for round_ in range(args.repeat):
                for name in args.variants:  # interleaved, so drift hits every variant alike
                    result = await measure(name, bench)
                    summaries[name].runs.append(result)
                    if args.output_format == "text":
                        print(
                            f"  round {round_ + 1} {name:15} {result.rps:9,.0f} req/s",
                            file=sys.stderr,
                        )
    return summaries


def ratios(summaries: dict[str, Summary]) -> list[tuple[str, float, list[float]]]:
    """(name, ratio of medians, ratio in each round) for each ratio whose variants ran."""
    out = []
    for label, num, den in RATIOS:
        if num in summaries and den in summaries:
            pairs = zip(summaries[num].runs, summaries[den].runs, strict=True)
            rounds = [n.rps / d.rps for n, d in pairs]
            out.append((label, summaries[num].median("rps") / summaries[den].median("rps"), rounds))
    return out


def format_text(summaries: dict[str, Summary], args: argparse.Namespace) -> str:
    header = ["variant", "req/s", "p50 ms", "p99 ms", "worst lag ms", "cpu us/req"]
    rows = [
        [
            name,
            f"{s.median('rps'):,.0f}",
            f"{s.median('p50_ms'):.2f}",
            f"{s.median('p99_ms'):.2f}",
            f"{s.median('lag_ms'):.2f}",
            f"{s.median('cpu_us'):.0f}",
        ]
        for name, s in summaries.items()
    ]
    lines = [
        f"get_tenant through PgBouncer {args.pgbouncer_version} (transaction mode, server pool "
        f"{args.pool_size}) against direct: {args.tenants} tenants with four secrets, "
        f"{args.clients} clients, pool {args.pool_size}, {args.requests} requests "
        f"(+{args.warmup} warm-up), median of {args.repeat}, {os.cpu_count()} CPUs",
        "",
        *text_table(header, rows),
        "",
    ]
    for label, value, rounds in ratios(summaries):
        each = ", ".join(f"{r:.2f}" for r in rounds)
        lines.append(f"{label:23} {value:5.2f}  (rounds: {each})")
    return "\n".join(lines)


def format_json(summaries: dict[str, Summary], args: argparse.Namespace) -> str:
    fields = ("rps", "p50_ms", "p99_ms", "lag_ms", "cpu_us")
    report = {
        "config": {k: v for k, v in vars(args).items() if k != "database_url"},
        "variants": {
            name: {
                "median": {f: s.median(f) for f in fields},
                "runs": [asdict(r) for r in s.runs],
            }
            for name, s in summaries.items()
        },
        "ratios": {label: {"value": v, "rounds": r} for label, v, r in ratios(summaries)},
    }
    return json.dumps(report, indent=2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", help="server to create a scratch database on")
    parser.add_argument("--tenants", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--pool-size", type=int, default=10, help="asyncpg and PgBouncer pools")
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--warmup", type=int, default=2_000)
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--only", action="append", choices=VARIANTS, help="run only these")
    parser.add_argument("--output-format", choices=["text", "json"], default="text")
    args = parser.parse_args(argv)
    for name in ("tenants", "clients", "pool_size", "requests", "warmup", "repeat"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} is expected to be at least 1")
    args.variants = args.only or VARIANTS
    return args


def _pgbouncer_version() -> str:
    argv = [pgbouncer_binary(), "--version"]  # a fixed command: no input reaches it
    out = subprocess.run(argv, capture_output=True, text=True)  # noqa: S603
    return out.stdout.split("\n", 1)[0].removeprefix("PgBouncer ").strip()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.pgbouncer_version = _pgbouncer_version()
    summaries = asyncio.run(run(args, server_url(args.database_url)))
    render: Callable[[dict[str, Summary], argparse.Namespace], str] = (
        format_json if args.output_format == "json" else format_text
    )
    print(render(summaries, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
