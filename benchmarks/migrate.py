"""How fast does `encrypt_secrets` encrypt a table, next to the usual ways and its limits?

One run, one scratch database, identical fresh `tenants` tables of plaintext
API keys (cloned from a template built once), variants side by side:

  a   row-at-a-time, as an Alembic data migration does: select all, one UPDATE
      per row, one transaction, `Fernet.encrypt` per row (on --baseline-rows)
  b   serial keyset pages of 5000, `Fernet.encrypt` per row, one UPDATE FROM unnest per page
  c   `tenantstore.migrate.encrypt_secrets` (and again on rows/10, for peak RSS)
  d1  limit: `Fernet.encrypt` alone over the same plaintexts, one thread
  d2  limit: `KeyRing.encrypt_batch` alone, in chunks of the runner's batch size
  d3  limit: the database write alone, with ready tokens: the runner's keyset
      read and compare-and-swap `write_batch`, serial

Each variant runs in a fresh subprocess of this script, so peak RSS is its own;
every row is checked afterwards (a sample decrypts with the key, no plaintext left).

    uv run python benchmarks/migrate.py --rows 100000 --baseline-rows 20000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass

import anyio.to_thread
import asyncpg
import psutil
from _common import scratch_database, server_url, worst_lag
from cryptography.fernet import Fernet

from tenantstore import KeyRing
from tenantstore._queries import load_queries
from tenantstore.encryption import generate_encryption_key
from tenantstore.migrate import encrypt_secrets, upgrade
from tenantstore.migrate.secrets import DEFAULT_BATCH_SIZE

# The scratch key and URL (which may hold a password) reach children here, not on argv.
KEY_ENV, URL_ENV = "TENANTSTORE_BENCH_KEY", "TENANTSTORE_BENCH_URL"
SAMPLE = 1000
_Q = {name: query.sql for name, query in load_queries("secrets.sql").items()}

TEMPLATE = "CREATE TABLE tenants_template (LIKE tenants INCLUDING ALL)"
# 39-char keys, "AIzaSy" + 33 url-safe characters, deterministic per (seed, row).
GENERATE = """
INSERT INTO tenants_template (tenant_id, name, gemini_api_key)
SELECT 'tenant-' || lpad(g::text, 9, '0'), 'Tenant ' || g,
       'AIzaSy' || substr(translate(encode(sha256(convert_to($2 || ':' || g, 'UTF8')),
                                           'base64'), '+/', '-_'), 1, 33)
FROM generate_series(1, $1::integer) AS g
"""
CLONE = [
    "DROP TABLE tenants",
    "CREATE TABLE tenants (LIKE tenants_template INCLUDING ALL)",
    "INSERT INTO tenants SELECT * FROM tenants_template ORDER BY tenant_id LIMIT $1",
    "VACUUM ANALYZE tenants",
    "CHECKPOINT",
]
SELECT_ALL = "SELECT tenant_id, gemini_api_key FROM tenants"
UPDATE_ONE = "UPDATE tenants SET gemini_api_key = $1 WHERE tenant_id = $2"
PAGE = (
    "SELECT tenant_id, gemini_api_key FROM tenants WHERE tenant_id > $1 ORDER BY tenant_id LIMIT $2"
)
UPDATE_UNNEST = (
    "UPDATE tenants AS t SET gemini_api_key = u.new "
    "FROM unnest($1::text[], $2::text[]) AS u (id, new) WHERE t.tenant_id = u.id"
)
PLAINTEXTS = "SELECT gemini_api_key FROM tenants_template ORDER BY tenant_id LIMIT $1"
CHECK_ALL = "SELECT count(*), count(*) FILTER (WHERE gemini_api_key LIKE 'AIza%') FROM tenants"
CHECK_SAMPLE = (
    "SELECT t.gemini_api_key, p.gemini_api_key FROM tenants t "
    "JOIN tenants_template p USING (tenant_id) WHERE t.tenant_id = any($1::text[])"
)

LABELS = {
    "a": "a  row-at-a-time (rows/s only)",
    "b": "b  keyset 5000 + Fernet",
    "c": "c  tenantstore encrypt_secrets",
    "c/10": "c  same, rows/10 (RSS)",
    "d1": "d1 Fernet encrypt alone",
    "d2": "d2 KeyRing.encrypt_batch alone",
    "d3": "d3 DB write alone (tokens)",
}


@dataclass
class Result:
    """One variant's measured run, as a child reports it."""

    variant: str
    rows: int
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    client_cpu_s: float = 0.0
    server_cpu_s: float | None = None
    lag_ms: float | None = None

    @property
    def rate(self) -> float:
        return self.rows / self.seconds


@dataclass
class Env:
    """What a child variant works with."""

    pool: asyncpg.Pool
    key: str
    rows: int
    batch_size: int
    plain_batch: int
    rng: random.Random


class Meter:
    """Times a block: wall, this process's CPU, the PostgreSQL backend's CPU, peak RSS."""

    def __init__(self, result: Result, backend: psutil.Process | None) -> None:
        self.result, self.backend = result, backend

    def _server(self) -> float:
        if self.backend is None:
            return 0.0
        times = self.backend.cpu_times()
        return times.user + times.system

    def __enter__(self) -> Meter:
        self.start = (time.perf_counter(), time.process_time(), self._server())
        return self

    def __exit__(self, *exc: object) -> None:
        wall, cpu, server = self.start
        self.result.seconds = time.perf_counter() - wall
        self.result.client_cpu_s = time.process_time() - cpu
        if self.backend is not None:
            self.result.server_cpu_s = self._server() - server
        self.result.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- the variants (each runs in its own child process) ----------------------------


def _fernet_encrypt(fernet: Fernet, values: list[str]) -> list[str]:
    return [fernet.encrypt(v.encode("utf-8")).decode("ascii") for v in values]


async def variant_a(env: Env, meter: Meter) -> None:
    fernet = Fernet(env.key)
    async with env.pool.acquire() as conn:
        with meter:
            async with conn.transaction():
                for tenant_id, value in await conn.fetch(SELECT_ALL):
                    token = fernet.encrypt(value.encode("utf-8")).decode("ascii")
                    await conn.execute(UPDATE_ONE, token, tenant_id)


async def variant_b(env: Env, meter: Meter) -> None:
    fernet = Fernet(env.key)
    async with env.pool.acquire() as conn:
        with meter:
            rows = await conn.fetch(PAGE, "", env.plain_batch)
            while rows:
                ids = [row[0] for row in rows]
                tokens = _fernet_encrypt(fernet, [row[1] for row in rows])
                await conn.execute(UPDATE_UNNEST, ids, tokens)
                full = len(rows) == env.plain_batch
                rows = await conn.fetch(PAGE, ids[-1], env.plain_batch) if full else []


async def variant_c(env: Env, meter: Meter) -> None:
    await anyio.to_thread.run_sync(int)  # warm-up: anyio imports its backend on first use (~0.2 s)
    stop = asyncio.Event()
    monitor = asyncio.create_task(worst_lag(stop))
    await asyncio.sleep(0.01)  # let the monitor take its first step
    with meter:
        report = await encrypt_secrets(env.pool, KeyRing(env.key), batch_size=env.batch_size)
    stop.set()
    meter.result.lag_ms = await monitor * 1e3
    if report.changed != env.rows:
        raise RuntimeError(f"encrypt_secrets changed {report.changed} of {env.rows} rows")


async def _plaintexts(env: Env) -> list[str]:
    return [row[0] for row in await env.pool.fetch(PLAINTEXTS, env.rows)]


def _check_tokens(env: Env, plaintexts: list[str], tokens: list[str]) -> None:
    fernet = Fernet(env.key)
    for i in env.rng.sample(range(len(tokens)), min(SAMPLE, len(tokens))):
        if fernet.decrypt(tokens[i].encode("ascii")).decode("utf-8") != plaintexts[i]:
            raise RuntimeError(f"token {i} does not decrypt to its plaintext")


async def variant_d1(env: Env, meter: Meter) -> None:
    plaintexts = await _plaintexts(env)
    fernet = Fernet(env.key)
    _fernet_encrypt(fernet, plaintexts[:1000])  # warm-up
    with meter:
        tokens = _fernet_encrypt(fernet, plaintexts)
    _check_tokens(env, plaintexts, tokens)


async def variant_d2(env: Env, meter: Meter) -> None:
    plaintexts = await _plaintexts(env)
    keyring, size = KeyRing(env.key), env.batch_size
    keyring.encrypt_batch(plaintexts[:1000])  # warm-up
    with meter:
        tokens = [
            t
            for i in range(0, len(plaintexts), size)
            for t in keyring.encrypt_batch(plaintexts[i : i + size])
        ]
    _check_tokens(env, plaintexts, tokens)


async def variant_d3(env: Env, meter: Meter) -> None:
    rows = await env.pool.fetch(SELECT_ALL)
    tokens = dict(
        zip((r[0] for r in rows), KeyRing(env.key).encrypt_batch([r[1] for r in rows]), strict=True)
    )
    del rows
    size, everyone = env.batch_size, (1, 0)  # shard 0 of 1: the whole table
    async with env.pool.acquire() as conn:
        with meter:
            page = await conn.fetch(_Q["first_page"], size, *everyone)
            while page:
                ids = [row[0] for row in page]
                new = [tokens[i] for i in ids]
                old = [row[1] for row in page]
                await conn.execute(_Q["write_batch"], ids, old, new, ids[0], ids[-1])
                if len(page) < size:
                    break
                page = await conn.fetch(_Q["next_page"], size, *everyone, ids[-1])


VARIANTS: dict[str, Callable[[Env, Meter], Awaitable[None]]] = {
    "a": variant_a,
    "b": variant_b,
    "c": variant_c,
    "d1": variant_d1,
    "d2": variant_d2,
    "d3": variant_d3,
}


async def verify_table(env: Env) -> None:
    """Every row changed, none left in plaintext, and a sample decrypts to its original."""
    total, plain = await env.pool.fetchrow(CHECK_ALL)
    if total != env.rows or plain:
        raise RuntimeError(f"{total} rows (expected {env.rows}), {plain} still plaintext")
    ids = [f"tenant-{g:09d}" for g in env.rng.sample(range(1, env.rows + 1), min(SAMPLE, env.rows))]
    fernet = Fernet(env.key)
    for token, plaintext in await env.pool.fetch(CHECK_SAMPLE, ids):
        if fernet.decrypt(token.encode("ascii")).decode("utf-8") != plaintext:
            raise RuntimeError("a sampled row does not decrypt to its plaintext")


def _backend(pid: int) -> psutil.Process | None:
    """The backend's process, when the server runs on this machine."""
    try:
        process = psutil.Process(pid)
        process.cpu_times()
    except psutil.Error:
        return None
    return process


async def child(args: argparse.Namespace) -> Result:
    """Run one variant against the prepared `tenants` table; return what it measured."""
    result = Result(args.variant, args.rows)
    # One connection: the runner's only backend is the one whose CPU we read.
    async with asyncpg.create_pool(os.environ[URL_ENV], min_size=1, max_size=1) as pool:
        env = Env(pool, os.environ[KEY_ENV], args.rows, args.batch_size, args.plain_batch_size,
                  random.Random(args.seed))  # fmt: skip
        crypto_only = args.variant in ("d1", "d2")
        backend = None if crypto_only else _backend(await pool.fetchval("SELECT pg_backend_pid()"))
        await VARIANTS[args.variant](env, Meter(result, backend))
        if not crypto_only:
            await verify_table(env)
    return result


# -- the parent: the database, the children, the report -------------------------------


async def run(args: argparse.Namespace, url: str) -> dict[str, Result]:
    """Build the template once, then per variant: clone `tenants`, run a child, collect JSON."""
    key = generate_encryption_key()
    small = max(1, args.rows // 10)
    plan = [("a", "a", args.baseline_rows), ("b", "b", args.rows), ("c", "c", args.rows),
            ("c/10", "c", small), ("d1", "d1", args.rows), ("d2", "d2", args.rows),
            ("d3", "d3", args.rows)]  # fmt: skip
    results: dict[str, Result] = {}
    async with scratch_database(url, "tenantstore_bench_migrate") as scratch:
        conn = await asyncpg.connect(scratch)
        try:
            async with asyncpg.create_pool(scratch, min_size=1, max_size=2) as pool:
                await upgrade(pool, KeyRing(key), target=1)
            await conn.execute(TEMPLATE)
            await conn.execute(GENERATE, args.rows, str(args.seed))
            for name, variant, rows in plan:
                if variant not in ("d1", "d2"):
                    for statement in CLONE:
                        await conn.execute(statement, *([rows] if "$1" in statement else []))
                command = [sys.executable, __file__, "--variant", variant, "--rows", str(rows),
                           "--batch-size", str(args.batch_size), "--seed", str(args.seed),
                           "--plain-batch-size", str(args.plain_batch_size)]  # fmt: skip
                proc = await asyncio.create_subprocess_exec(
                    *command,
                    stdout=asyncio.subprocess.PIPE,
                    env={**os.environ, KEY_ENV: key, URL_ENV: scratch},
                )
                out, _ = await proc.communicate()
                if proc.returncode:
                    raise RuntimeError(f"variant {name} failed (exit {proc.returncode})")
                data = json.loads(out.decode().strip().splitlines()[-1])
                results[name] = Result(**{**data, "variant": name})
                print(f"  {name:5} {rows:>9,} rows {results[name].rate:>10,.0f} rows/s",
                      file=sys.stderr)  # fmt: skip
        finally:
            await conn.close()
    return results


def ratios(results: dict[str, Result]) -> list[tuple[str, float, str, float, bool]]:
    """(name, value, comparison, target, ok) for each target."""
    rate = {name: r.rate for name, r in results.items()}
    c = rate["c"]
    rss = results["c"].peak_rss_mb / results["c/10"].peak_rss_mb
    rows = [
        ("c/a", c / rate["a"], ">=", 10.0),
        ("c/b", c / rate["b"], ">=", 1.2),
        ("c/min(d1,d3)", c / min(rate["d1"], rate["d3"]), ">=", 0.7),
        ("c/min(d2,d3)", c / min(rate["d2"], rate["d3"]), ">=", 0.7),
        ("RSS c/c(rows/10)", rss, "<=", 1.5),
    ]
    return [(n, v, op, t, v >= t if op == ">=" else v <= t) for n, v, op, t in rows]


def format_text(results: dict[str, Result], args: argparse.Namespace) -> str:
    """The table, the ratios against their targets, and where c's time goes."""
    lines = [
        f"migrate encrypt: {args.rows:,} rows (a: {args.baseline_rows:,}), runner batch "
        f"{args.batch_size}, b batch {args.plain_batch_size}, {os.cpu_count()} CPUs",
        "",
        f"{'variant':32} {'rows':>9} {'seconds':>8} {'rows/s':>9} {'peak RSS MB':>11}"
        f" {'worst lag ms':>12} {'client CPU s':>12} {'server CPU s':>12}",
    ]
    for name, r in results.items():
        lag = f"{r.lag_ms:12.1f}" if r.lag_ms is not None else f"{'-':>12}"
        server = f"{r.server_cpu_s:12.2f}" if r.server_cpu_s is not None else f"{'-':>12}"
        lines.append(
            f"{LABELS[name]:32} {r.rows:9,} {r.seconds:8.2f} {r.rate:9,.0f} {r.peak_rss_mb:11.1f}"
            f" {lag} {r.client_cpu_s:12.2f} {server}"
        )
    lines.append("")
    for name, value, op, target, ok in ratios(results):
        lines.append(f"{name:17} {value:6.2f}   target {op} {target:<4}  {'ok' if ok else 'MISS'}")
    c = results["c"]
    server = f"{c.server_cpu_s / c.seconds:.0%}" if c.server_cpu_s is not None else "?"
    lines += [
        "",
        f"c time: {c.seconds:.2f} s wall; client process CPU {c.client_cpu_s / c.seconds:.0%} "
        f"of wall (Python + crypto), PostgreSQL backend CPU {server} of wall",
    ]
    return "\n".join(lines)


def format_json(results: dict[str, Result], args: argparse.Namespace) -> str:
    report = {
        "config": {k: v for k, v in vars(args).items() if k not in ("database_url", "variant")},
        "variants": {name: {**asdict(r), "rows_per_s": r.rate} for name, r in results.items()},
        "ratios": {
            name: {"value": value, "target": f"{op} {target}", "ok": ok}
            for name, value, op, target, ok in ratios(results)
        },
    }
    return json.dumps(report, indent=2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", help="server to create a scratch database on")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--baseline-rows", type=int, default=100_000, help="rows for variant a")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="runner batch")
    parser.add_argument("--plain-batch-size", type=int, default=5000, help="batch of variant b")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--output-format", choices=["text", "json"], default="text")
    # Internal: how the parent runs one variant in a child process.
    parser.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("rows", "baseline_rows", "batch_size", "plain_batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} is expected to be at least 1")
    if args.variant is None and args.baseline_rows > args.rows:
        parser.error("--baseline-rows is expected to be at most --rows")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.variant:
        print(json.dumps(asdict(asyncio.run(child(args)))))
        return 0
    results = asyncio.run(run(args, server_url(args.database_url)))
    print(
        format_json(results, args) if args.output_format == "json" else format_text(results, args)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
