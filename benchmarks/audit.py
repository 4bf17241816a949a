"""What does the PostgreSQL audit sink sustain, and what does it cost a warm `get_tenant`?

One run, one scratch database, two measurements:

  throughput  `PostgresSink` alone: `--producers` tasks emit ready-made events
              (four per call, as a four-secret read) as fast as `emit` lets
              them (on_full="block", so the writer sets the pace), on a pool
              of one connection; events written per second over `--seconds`,
              after `--warmup-seconds`, with this process's and the backend's
              CPU per 1000 events. Target >= 50k events/s.
  get_tenant  warm `TenantRepository.get_tenant` over four-secret tenants
              (benchmarks/get_tenant.py's data), `--clients` coroutines on a
              pool of `--pool-size`, cache primed: "off" has an `AuditLog`
              whose one sink is disabled (a LoggingSink on a logger at
              WARNING: no event is built), "pg" a `PostgresSink` on the same
              pool. The pg window ends when the sink has written every event
              of it. Rounds interleave off and pg. Target pg/off >= 0.85.

    uv run python benchmarks/audit.py --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import asyncpg
import psutil
from _common import Meter, backend_process, cell, scratch_database, server_url, text_table
from _common import worst_lag as _worst_lag
from get_tenant import FILL, _drive, make_secrets

from tenantstore import KeyRing, TenantRepository
from tenantstore.audit import AuditEvent, AuditLog, LoggingSink
from tenantstore.audit.pg import PostgresSink
from tenantstore.encryption import generate_encryption_key
from tenantstore.migrate import upgrade
from tenantstore.models import TENANTS

THROUGHPUT_TARGET = 50_000.0
RATIO_TARGET = 0.85


@dataclass
class Throughput:
    """One measured window of the sink alone."""

    events_per_s: float
    client_us_per_event: float  # this process's CPU (producers and writer)
    server_us_per_event: float | None  # the writer's backend's CPU
    commits: int  # transactions committed in the database meanwhile


@dataclass
class Reads:
    """One measured run of warm get_tenant."""

    rps: float
    p50_ms: float
    p99_ms: float
    lag_ms: float
    cpu_us: float  # this process's CPU per request
    server_us: float | None  # the CPU of the database's backends per request
    events: int = 0

    @property
    def total_us(self) -> float | None:
        """Client and server CPU per request: what bounds req/s on a CPU-bound machine."""
        return None if self.server_us is None else self.cpu_us + self.server_us


# -- throughput -----------------------------------------------------------------


async def _commits(url: str) -> int:
    """Transactions committed in the database so far (pg_stat_database lags up to 1 s)."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        return int(
            await conn.fetchval(
                "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
            )
        )
    finally:
        await conn.close()


async def throughput(url: str, args: argparse.Namespace) -> Throughput:
    """Producers emit into one sink on a one-connection pool; count what gets written."""
    one = [AuditEvent("read", "tenants", c, f"t{i:06d}", "kid0", "ok", actor="user:42")
           for i in range(1000) for c in TENANTS.secrets]  # fmt: skip
    calls = [one[i : i + 4] for i in range(0, len(one), 4)]
    pool = await asyncpg.create_pool(url, min_size=1, max_size=1)
    assert pool is not None
    async with pool.acquire() as conn:
        backend = backend_process(conn.get_server_pid())
    sink = PostgresSink(pool, batch=args.batch, buffer=args.buffer)
    stop = False

    async def produce() -> None:
        while not stop:
            for call in calls:
                await sink.emit(call)
                if stop:
                    return

    producers = [asyncio.create_task(produce()) for _ in range(args.producers)]
    await asyncio.sleep(args.warmup_seconds)
    meter = Meter(backend)
    before = sink.counts["written"]
    commits = await _commits(url)
    with meter:
        await asyncio.sleep(args.seconds)
        written = sink.counts["written"] - before
    commits = await _commits(url) - commits
    stop = True
    await asyncio.gather(*producers)
    await sink.aclose()
    await pool.close()
    per_event = 1e6 / max(written, 1)
    return Throughput(
        events_per_s=written / meter.seconds,
        client_us_per_event=meter.client_cpu_s * per_event,
        server_us_per_event=None if meter.server_cpu_s is None else meter.server_cpu_s * per_event,
        commits=commits,
    )


# -- get_tenant with and without the sink -----------------------------------------


async def _backends(pool: asyncpg.Pool) -> list[psutil.Process]:
    """The backends of the pool's connections (all open: min_size is the pool's size)."""
    rows = await pool.fetch(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND backend_type = 'client backend'"
    )
    found = [backend_process(row[0]) for row in rows]
    return [p for p in found if p is not None]


def _cpu(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def _disabled() -> AuditLog:
    quiet = logging.getLogger("tenantstore.audit.bench-off")
    quiet.setLevel(logging.WARNING)
    quiet.propagate = False
    return AuditLog(LoggingSink(quiet))


async def reads(
    url: str, key: str, ids: list[str], args: argparse.Namespace, variant: str, rng: random.Random
) -> Reads:
    """A fresh pool and repository, the cache primed, a warm-up, then the measured requests."""
    pool = await asyncpg.create_pool(url, min_size=args.pool_size, max_size=args.pool_size)
    assert pool is not None
    sink = PostgresSink(pool) if variant == "pg" else None
    audit = AuditLog(sink) if sink is not None else _disabled()
    repo = TenantRepository(pool, KeyRing(key), audit=audit)
    await _drive(repo.get_tenant, ids, args.clients)  # primes the caches
    await _drive(repo.get_tenant, rng.choices(ids, k=args.warmup), args.clients)
    if sink is not None:
        await sink.flush()
    measured = rng.choices(ids, k=args.requests)
    written = sink.counts["written"] if sink is not None else 0
    backends = await _backends(pool)
    server = _cpu(backends)
    stop = asyncio.Event()
    monitor = asyncio.create_task(_worst_lag(stop))
    await asyncio.sleep(0.01)
    cpu, wall = time.process_time(), time.perf_counter()
    latencies = await _drive(repo.get_tenant, measured, args.clients)
    if sink is not None:
        await sink.flush()  # the window ends when its events are in the table
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    server = _cpu(backends) - server
    stop.set()
    lag = await monitor
    events = sink.counts["written"] - written if sink is not None else 0
    await repo.aclose()
    await pool.close()
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return Reads(
        rps=len(latencies) / wall,
        p50_ms=cuts[49] * 1e3,
        p99_ms=cuts[98] * 1e3,
        lag_ms=lag * 1e3,
        cpu_us=cpu / len(latencies) * 1e6,
        server_us=server / len(latencies) * 1e6 if backends else None,
        events=events,
    )


# -- the run and its report ---------------------------------------------------------


async def run(args: argparse.Namespace, server: str) -> dict[str, Any]:
    rng = random.Random(args.seed)
    secrets = make_secrets(rng, args.tenants, "4")
    key = generate_encryption_key()
    keyring = KeyRing(key)
    results: dict[str, Any] = {"throughput": [], "off": [], "pg": []}
    async with scratch_database(server, "tenantstore_bench_audit") as url:
        pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
        assert pool is not None
        await upgrade(pool, keyring)
        columns = [keyring.encrypt_batch([row[c] for row in secrets.values()]) for c in range(4)]
        ids = list(secrets)
        await pool.execute(FILL, ids, [f"Tenant {t}" for t in ids], *columns)
        await pool.execute("ANALYZE tenants")
        await pool.close()
        for round_ in range(args.repeat):
            if "throughput" in args.parts:
                result = await throughput(url, args)
                results["throughput"].append(result)
                _progress(args, f"round {round_ + 1} throughput {result.events_per_s:,.0f} ev/s")
            if "get_tenant" in args.parts:
                for variant in ("off", "pg"):
                    got = await reads(url, key, ids, args, variant, rng)
                    results[variant].append(got)
                    _progress(args, f"round {round_ + 1} get_tenant {variant} {got.rps:,.0f} req/s")
    return results


def _progress(args: argparse.Namespace, text: str) -> None:
    if args.output_format == "text":
        print(f"  {text}", file=sys.stderr)


def _median(runs: list[Any], name: str) -> float:
    return statistics.median(getattr(run, name) for run in runs)


def ratios(results: dict[str, Any]) -> list[float]:
    """pg/off req/s, per round."""
    return [p.rps / o.rps for p, o in zip(results["pg"], results["off"], strict=True)]


def _throughput_rows(runs: list[Throughput]) -> list[list[str]]:
    return [
        [
            f"round {i + 1}",
            f"{r.events_per_s:,.0f}",
            f"{r.client_us_per_event:.2f}",
            cell(r.server_us_per_event, ".2f"),
            str(r.commits),
        ]
        for i, r in enumerate(runs)
    ]


def _reads_rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name in ("off", "pg"):
        runs = results[name]
        rows.append(
            [name, f"{_median(runs, 'rps'):,.0f}"]
            + [f"{_median(runs, f):.2f}" for f in ("p50_ms", "p99_ms", "lag_ms")]
            + [f"{_median(runs, 'cpu_us'):.0f}", cell(_median_of(runs, "server_us"), ".0f")]
            + [cell(_median_of(runs, "total_us"), ".0f"), f"{_median(runs, 'events'):,.0f}"]
        )
    return rows


def _median_of(runs: list[Any], name: str) -> float | None:
    values = [v for run in runs if (v := getattr(run, name)) is not None]
    return statistics.median(values) if values else None


def cpu_ratio(results: dict[str, Any]) -> float | None:
    """off/pg total CPU per request: the req/s ratio to expect when CPU is what runs out."""
    off, pg = _median_of(results["off"], "total_us"), _median_of(results["pg"], "total_us")
    return None if off is None or pg is None else off / pg


def format_text(results: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [f"audit sink: median of {args.repeat} rounds, {os.cpu_count()} CPUs"]
    runs: list[Throughput] = results["throughput"]
    if runs:
        best = _median(runs, "events_per_s")
        verdict = "ok" if min(r.events_per_s for r in runs) >= THROUGHPUT_TARGET else "MISS"
        header = ["", "events/s", "client us/event", "server us/event", "commits"]
        lines += [
            "",
            f"-- throughput: {args.producers} producers, batch {args.batch}, buffer "
            f"{args.buffer}, {args.seconds:g} s after {args.warmup_seconds:g} s --",
            *text_table(header, _throughput_rows(runs)),
            f"median {best:,.0f} events/s  target >= {THROUGHPUT_TARGET:,.0f} {verdict}",
        ]
    if results["off"]:
        header = ["variant", "req/s", "p50 ms", "p99 ms", "worst lag ms", "client us/req"]
        header += ["server us/req", "total us/req", "events"]
        each = ratios(results)
        verdict = "ok" if min(each) >= RATIO_TARGET else "MISS"
        lines += [
            "",
            f"-- warm get_tenant, four secrets: {args.tenants} tenants, {args.clients} clients, "
            f"pool {args.pool_size}, {args.requests} requests (+{args.warmup} warm-up) --",
            *text_table(header, _reads_rows(results)),
            f"pg/off {statistics.median(each):.2f}  (rounds: "
            f"{', '.join(f'{r:.2f}' for r in each)})  target >= {RATIO_TARGET} {verdict}",
        ]
        expected = cpu_ratio(results)
        if expected is not None:
            lines.append(f"CPU per request off/pg {expected:.2f} (the ratio when CPU-bound)")
    return "\n".join(lines)


def format_json(results: dict[str, Any], args: argparse.Namespace) -> str:
    report: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k != "database_url"},
        "throughput": {
            "runs": [asdict(r) for r in results["throughput"]],
            "target": THROUGHPUT_TARGET,
        },
        "get_tenant": {
            name: {"runs": [asdict(r) for r in results[name]]} for name in ("off", "pg")
        },
    }
    if results["throughput"]:
        runs = results["throughput"]
        report["throughput"]["median"] = _median(runs, "events_per_s")
        report["throughput"]["ok"] = min(r.events_per_s for r in runs) >= THROUGHPUT_TARGET
    if results["off"]:
        each = ratios(results)
        report["get_tenant"]["ratio"] = {
            "value": statistics.median(each),
            "rounds": each,
            "target": RATIO_TARGET,
            "ok": min(each) >= RATIO_TARGET,
            "cpu": cpu_ratio(results),
        }
    return json.dumps(report, indent=2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", help="server to create a scratch database on")
    parser.add_argument("--parts", default="throughput,get_tenant", help="comma-separated")
    parser.add_argument("--repeat", type=int, default=1, help="interleaved rounds")
    parser.add_argument("--producers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--buffer", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup-seconds", type=float, default=2.0)
    parser.add_argument("--tenants", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--pool-size", type=int, default=10)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--warmup", type=int, default=2_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--output-format", choices=["text", "json"], default="text")
    args = parser.parse_args(argv)
    args.parts = [p.strip() for p in args.parts.split(",")]
    if not set(args.parts) <= {"throughput", "get_tenant"}:
        parser.error("--parts takes throughput, get_tenant or both")
    for name in ("repeat", "producers", "batch", "buffer", "tenants", "clients", "pool_size",
                 "requests"):  # fmt: skip
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} is expected to be at least 1")
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
