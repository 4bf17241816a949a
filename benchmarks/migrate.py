"""How fast does `encrypt_secrets` encrypt a table, next to the usual ways and its limits?

One run, one scratch database, fresh `tenants` tables cloned from one
template of plaintext secrets (the dataset: "1" holds only the 39-char Gemini
key; "4" adds a ~200-char OAuth access token, NULL on every 4th row, a
~100-char refresh token and a 32-char webhook secret, NULL on every 4th row
offset by 2; "4e" is dataset 4 once encrypted). The variants:

  a           row-at-a-time as an Alembic data migration does: one UPDATE per
              row, one transaction, `Fernet.encrypt` per row (on --baseline-rows)
  b           keyset pages of 5000, `Fernet.encrypt` per row, UPDATE FROM unnest
  c1          `encrypt_secrets` of the one column of dataset 1
  c4          `encrypt_secrets` of all four columns in one pass (and on rows/10, for RSS)
  c4x1        four one-column passes (`columns=[c]`) in sequence
  d-db-1/4    limit: the runner's keyset read and compare-and-swap `write_page`,
              serial, with tokens made beforehand (their making is not timed)
  d-fernet-4  limit: `KeyRing.encrypt_batch` alone over each page's secrets
  d-plain-4   reference: `Fernet.encrypt` alone, one secret at a time
  verify      `verify_secrets` over dataset 4e, against its limits:
  d-dec-4     `KeyRing.decrypt_batch_with_key_index` alone over each page's tokens
  d-read-4    the runner's keyset read alone

Each variant runs in a fresh subprocess, so peak RSS is its own, and is
checked afterwards (its count of secrets; a sample decrypts to the original;
nothing left in plaintext).

    uv run python benchmarks/migrate.py --rows 100000 --baseline-rows 20000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from operator import attrgetter
from typing import Any

import _common
import anyio.to_thread
import asyncpg
from _common import LoopLag, Meter, backend_process, cell, peak_rss_mb, run_child, text_table
from cryptography.fernet import Fernet

from tenantstore import KeyRing
from tenantstore._catalog import resolve_table
from tenantstore.db import AnyConnection
from tenantstore.encryption import generate_encryption_key, stored_token
from tenantstore.migrate import encrypt_secrets, upgrade, verify_secrets
from tenantstore.migrate._statements import RunnerStatements
from tenantstore.migrate.secrets import DEFAULT_BATCH_SIZE
from tenantstore.models import TENANTS

# The scratch key and URL (which may hold a password) reach children here, not on argv.
KEY_ENV, URL_ENV = "TENANTSTORE_BENCH_KEY", "TENANTSTORE_BENCH_URL"
SAMPLE = 1000
ALL = TENANTS.secrets
GEMINI = ("gemini_api_key",)

# Deterministic url-safe text per seed: `blocks` SHA-512 digests in base64, 86 characters each.
TEMPLATE = [
    """CREATE FUNCTION bench_chars(seed text, blocks integer) RETURNS text
       LANGUAGE sql IMMUTABLE PARALLEL SAFE
       AS $$ SELECT string_agg(translate(encode(sha512(convert_to(seed || ':' || i, 'UTF8')),
                                                'base64'), '+/=' || chr(10), '-_'), '')
             FROM generate_series(1, blocks) AS i $$""",
    "CREATE TABLE tenants_template (LIKE tenants INCLUDING ALL)",
]
GENERATE = """
INSERT INTO tenants_template (tenant_id, name, gemini_api_key, oauth_access_token,
                              oauth_refresh_token, webhook_signing_secret)
SELECT 'tenant-' || lpad(g::text, 9, '0'), 'Tenant ' || g,
       'AIzaSy' || left(bench_chars($2 || ':gemini:' || g, 1), 33),
       CASE WHEN g % 4 <> 0 THEN 'ya29.' || left(bench_chars($2 || ':access:' || g, 3), 195) END,
       '1//' || left(bench_chars($2 || ':refresh:' || g, 2), 97),
       CASE WHEN g % 4 <> 2 THEN left(bench_chars($2 || ':webhook:' || g, 1), 32) END
FROM generate_series(1, $1::integer) AS g
"""
CLONE = [
    "DROP TABLE IF EXISTS tenants",
    "CREATE TABLE tenants (LIKE tenants_template INCLUDING ALL)",
]
FILL = {
    "1": "INSERT INTO tenants (tenant_id, name, gemini_api_key) "
    "SELECT tenant_id, name, gemini_api_key FROM tenants_template ORDER BY tenant_id LIMIT $1",
    "4": "INSERT INTO tenants SELECT * FROM tenants_template ORDER BY tenant_id LIMIT $1",
    "4e": "INSERT INTO tenants SELECT * FROM tenants_encrypted ORDER BY tenant_id LIMIT $1",
}
SETTLE = ["VACUUM ANALYZE tenants", "CHECKPOINT"]
KEEP_ENCRYPTED = "CREATE TABLE tenants_encrypted AS TABLE tenants"

SELECT_ALL = "SELECT tenant_id, gemini_api_key FROM tenants"
UPDATE_ONE = "UPDATE tenants SET gemini_api_key = $1 WHERE tenant_id = $2"
PAGE = (
    "SELECT tenant_id, gemini_api_key FROM tenants WHERE tenant_id > $1 ORDER BY tenant_id LIMIT $2"
)
UPDATE_UNNEST = (
    "UPDATE tenants AS t SET gemini_api_key = u.new "
    "FROM unnest($1::text[], $2::text[]) AS u (id, new) WHERE t.tenant_id = u.id"
)
# Rows, secrets, and secrets that are not Fernet tokens (every token starts "gAAAAA" until 2106).
COUNTS = """
SELECT count(*) / 4, count(v), count(*) FILTER (WHERE v NOT LIKE 'gAAAAA%')
FROM tenants, unnest(ARRAY[gemini_api_key, oauth_access_token, oauth_refresh_token,
                           webhook_signing_secret]) AS v
"""
SAMPLE_ROWS = """
SELECT tenant_id, gemini_api_key, oauth_access_token, oauth_refresh_token, webhook_signing_secret
FROM tenants WHERE tenant_id = any($1::text[])
"""


@dataclass
class Result:
    """One variant's measured run, as a child reports it."""

    variant: str
    rows: int
    secrets: int = 0
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    client_cpu_s: float = 0.0
    server_cpu_s: float | None = None
    lag_ms: float | None = None

    @property
    def rate(self) -> float:
        return self.rows / self.seconds

    @property
    def secrets_rate(self) -> float:
        return self.secrets / self.seconds


@dataclass
class Env:
    """What a child variant works with; it adds what it did to `result`, timed by `meter`."""

    pool: asyncpg.Pool
    key: str
    keyring: KeyRing
    batch_size: int
    plain_batch: int
    rng: random.Random
    meter: Meter
    result: Result


# -- the variants (each runs in its own child process) ----------------------------


def _cells(page: Sequence[asyncpg.Record]) -> list[str]:
    """The page's non-empty secrets, row by row, as the runner plans them."""
    return [value for row in page for value in row[1:] if value]


async def _pages(
    env: Env, conn: AnyConnection, columns: Sequence[str], *, timed: bool
) -> AsyncIterator[tuple[RunnerStatements, list[asyncpg.Record]]]:
    """The runner's keyset pages of `columns` (every row: shard 0 of 1); `timed` meters reads."""
    sql = RunnerStatements.build(await resolve_table(conn, TENANTS.only(columns)))
    size, everyone = env.batch_size, (1, 0)
    page: list[asyncpg.Record] = []
    while not page or len(page) == size:
        with env.meter if timed else nullcontext():
            if page:
                page = await conn.fetch(sql.next_page, size, *everyone, page[-1][0])
            else:
                page = await conn.fetch(sql.first_page, size, *everyone)
        if not page:
            return
        yield sql, page


async def variant_a(env: Env) -> None:
    fernet = Fernet(env.key)
    async with env.pool.acquire() as conn:
        with env.meter:
            async with conn.transaction():
                for tenant_id, value in await conn.fetch(SELECT_ALL):
                    token = fernet.encrypt(value.encode("utf-8")).decode("ascii")
                    await conn.execute(UPDATE_ONE, token, tenant_id)
                    env.result.secrets += 1


async def variant_b(env: Env) -> None:
    fernet = Fernet(env.key)
    async with env.pool.acquire() as conn:
        with env.meter:
            rows = await conn.fetch(PAGE, "", env.plain_batch)
            while rows:
                ids = [row[0] for row in rows]
                tokens = [fernet.encrypt(row[1].encode("utf-8")).decode("ascii") for row in rows]
                await conn.execute(UPDATE_UNNEST, ids, tokens)
                env.result.secrets += len(ids)
                full = len(rows) == env.plain_batch
                rows = await conn.fetch(PAGE, ids[-1], env.plain_batch) if full else []


async def _in_process(env: Env, operation: str, passes: Sequence[Sequence[str]]) -> None:
    """The runner, once per column set in sequence, in this process (for the loop lag)."""
    await anyio.to_thread.run_sync(int)  # warm-up: anyio imports its backend on first use (~0.2 s)
    run = encrypt_secrets if operation == "encrypt" else verify_secrets
    async with LoopLag() as lag:
        with env.meter:
            reports = [
                await run(env.pool, env.keyring, columns=columns, batch_size=env.batch_size)
                for columns in passes
            ]
    env.result.lag_ms = lag.worst_ms
    for report in reports:
        if report.previous or report.plaintext or report.failed or report.changed_concurrently:
            raise RuntimeError(f"{operation} found {report.summary()}")
        env.result.secrets += report.changed if operation == "encrypt" else report.current


async def _db_limit(env: Env, columns: Sequence[str]) -> None:
    """The runner's read and compare-and-swap write, serial; tokens made between, untimed."""
    async with env.pool.acquire() as conn:
        async for sql, page in _pages(env, conn, columns, timed=True):
            keys = [row[0] for row in page]
            arrays: list[list[str | None]] = []
            for c in range(len(columns)):
                old = [row[c + 1] or None for row in page]
                arrays += [old, env.keyring.encrypt_batch(old)]
            with env.meter:
                written = await conn.fetch(sql.write_page, keys, keys[0], keys[-1], *arrays)
            env.result.secrets += sum(bool(flag) for row in written for flag in row[1:])


async def _crypto_alone(env: Env, crypto: str) -> None:
    """One crypto call over each page's secrets, as the runner makes it; reads are untimed."""
    fernet = Fernet(env.key)
    crypto_calls: dict[str, Callable[[list[str]], list[Any]]] = {
        "encrypt_batch": env.keyring.encrypt_batch,
        "Fernet.encrypt": lambda vs: [fernet.encrypt(v.encode()).decode("ascii") for v in vs],
        "decrypt_batch": env.keyring.decrypt_batch_with_key_index,
    }
    run = crypto_calls[crypto]
    run(env.keyring.encrypt_batch(["AIzaSy" + "x" * 33] * 100))  # warm-up
    async with env.pool.acquire() as conn:
        async for _, page in _pages(env, conn, ALL, timed=False):
            values = _cells(page)
            with env.meter:
                out = run(values)
            env.result.secrets += len(out)
            decrypt = crypto == "decrypt_batch"
            if decrypt and any(r is None or r[1] for r in out):
                raise RuntimeError("a token does not decrypt with the primary key")
            for i in env.rng.sample(range(len(out)), min(3, len(out))):
                token, plaintext = (values[i], out[i][0]) if decrypt else (out[i], values[i])
                if fernet.decrypt(token.encode("ascii")).decode("utf-8") != plaintext:
                    raise RuntimeError(f"token {i} does not decrypt to its plaintext")


async def _read_alone(env: Env) -> None:
    async with env.pool.acquire() as conn:
        async for _, page in _pages(env, conn, ALL, timed=True):
            env.result.secrets += len(_cells(page))


@dataclass(frozen=True)
class Variant:
    """A variant: the table it starts from, what its child runs, how it is shown."""

    label: str
    dataset: str  # "1", "4" or "4e": see FILL
    run: Callable[..., Awaitable[None]]
    args: tuple[Any, ...] = ()
    size: str = "rows"  # "rows", "baseline" (--baseline-rows) or "tenth" (rows/10)
    crypto_only: bool = False  # no server CPU; leaves the table as it was


ONE_PASS, EACH_COLUMN = [ALL], [[column] for column in ALL]
VARIANTS = {
    "a": Variant("a  row at a time, 1 col", "1", variant_a, size="baseline"),
    "b": Variant("b  keyset 5000 + Fernet, 1 col", "1", variant_b),
    "c1": Variant("c1 encrypt_secrets, 1 col", "1", _in_process, ("encrypt", [GEMINI])),
    "d-db-1": Variant("d-db-1 read + CAS write, 1 col", "1", _db_limit, (GEMINI,)),
    "c4": Variant("c4 encrypt_secrets, 4 cols", "4", _in_process, ("encrypt", ONE_PASS)),
    "c4/10": Variant("c4 same, rows/10 (RSS)", "4", _in_process, ("encrypt", ONE_PASS), "tenth"),
    "c4x1": Variant("c4x1 four 1-col passes", "4", _in_process, ("encrypt", EACH_COLUMN)),
    "d-fernet-4": Variant("d-fernet-4 encrypt_batch", "4", _crypto_alone, ("encrypt_batch",),
                          crypto_only=True),
    "d-plain-4": Variant("d-plain-4 Fernet.encrypt", "4", _crypto_alone, ("Fernet.encrypt",),
                         crypto_only=True),
    "d-db-4": Variant("d-db-4 read + CAS write, 4", "4", _db_limit, (ALL,)),
    "verify": Variant("verify verify_secrets, 4", "4e", _in_process, ("verify", ONE_PASS)),
    "d-dec-4": Variant("d-dec-4 decrypt_batch alone", "4e", _crypto_alone, ("decrypt_batch",),
                       crypto_only=True),
    "d-read-4": Variant("d-read-4 keyset read alone", "4e", _read_alone),
}  # fmt: skip


Sample = dict[str, list[str | None]]


async def _sample(env: Env, ids: Sequence[str]) -> Sample:
    """The secrets of rows `ids` as plaintext (decrypted where stored as tokens)."""
    return {
        row[0]: [v if stored_token(v) is None else env.keyring.decrypt(v) for v in row[1:]]
        for row in await env.pool.fetch(SAMPLE_ROWS, ids)
    }


async def check_table(env: Env, rows: int, secrets: int, sample: Sample) -> None:
    """Every secret a token, none lost, and the sample decrypts to what it held before."""
    found = tuple((await env.pool.fetch(COUNTS))[0])
    if found != (rows, secrets, 0):
        raise RuntimeError(f"(rows, secrets, plaintext) {found}, expected {(rows, secrets, 0)}")
    if await _sample(env, list(sample)) != sample:
        raise RuntimeError("a sampled row does not decrypt to what it held")


async def child(args: argparse.Namespace) -> Result:
    """Run one variant against the prepared `tenants` table; return what it measured."""
    spec, result = VARIANTS[args.variant], Result(args.variant, args.rows)
    # One connection: the runner's only backend is the one whose CPU we read.
    async with asyncpg.create_pool(os.environ[URL_ENV], min_size=1, max_size=1) as pool:
        pid = await pool.fetchval("SELECT pg_backend_pid()")
        meter = Meter(None if spec.crypto_only else backend_process(pid))
        key = os.environ[KEY_ENV]
        env = Env(pool, key, KeyRing(key), args.batch_size, args.plain_batch_size,
                  random.Random(args.seed), meter, result)  # fmt: skip
        secrets = (await pool.fetch(COUNTS))[0][1]
        picked = env.rng.sample(range(1, args.rows + 1), min(SAMPLE, args.rows))
        sample = await _sample(env, [f"tenant-{g:09d}" for g in picked])
        await spec.run(env, *spec.args)
        if result.secrets != secrets:
            raise RuntimeError(f"{args.variant} did {result.secrets} of {secrets} secrets")
        if not spec.crypto_only:
            await check_table(env, args.rows, secrets, sample)
    result.seconds, result.client_cpu_s = meter.seconds, meter.client_cpu_s
    result.server_cpu_s, result.peak_rss_mb = meter.server_cpu_s, peak_rss_mb()
    return result


# -- the parent: the database, the children, the report -------------------------------


async def _prepare(conn: AnyConnection, dataset: str, rows: int) -> None:
    """A fresh `tenants` holding the first `rows` rows of `dataset`, vacuumed, checkpointed."""
    for statement in [*CLONE, FILL[dataset], *SETTLE]:
        await conn.execute(statement, *([rows] if "$1" in statement else []))


async def run(args: argparse.Namespace, url: str) -> dict[str, Result]:
    """Build the template once, then per variant: clone `tenants`, run a child, collect JSON."""
    key = generate_encryption_key()
    names = [name for name in VARIANTS if not args.only or name in args.only]
    sizes = {"rows": args.rows, "baseline": args.baseline_rows, "tenth": max(1, args.rows // 10)}
    need_encrypted = any(VARIANTS[name].dataset == "4e" for name in names)
    results: dict[str, Result] = {}
    async with (
        _common.scratch_database(url, "tenantstore_bench_migrate") as scratch,
        asyncpg.create_pool(scratch, min_size=1, max_size=2) as pool,
    ):
        await upgrade(pool, KeyRing(key), target=3)  # the secret columns, none encrypted
        async with pool.acquire() as conn:
            for statement in TEMPLATE:
                await conn.execute(statement)
            await conn.execute(GENERATE, args.rows, str(args.seed))
            for name in names:
                spec, rows = VARIANTS[name], sizes[VARIANTS[name].size]
                if spec.dataset == "4e" and need_encrypted:  # c4 did not run: encrypt here
                    await _prepare(conn, "4", args.rows)
                    await encrypt_secrets(pool, KeyRing(key), batch_size=args.batch_size)
                    await conn.execute(KEEP_ENCRYPTED)
                    need_encrypted = False
                await _prepare(conn, spec.dataset, rows)
                command = [__file__, "--variant", name, "--rows", str(rows),
                           "--batch-size", str(args.batch_size), "--seed", str(args.seed),
                           "--plain-batch-size", str(args.plain_batch_size)]  # fmt: skip
                data = await run_child(command, {KEY_ENV: key, URL_ENV: scratch})
                results[name] = result = Result(**data)
                if name == "c4" and need_encrypted:
                    await conn.execute(KEEP_ENCRYPTED)  # c4's table is dataset 4e
                    need_encrypted = False
                print(f"  {name:10} {rows:>9,} rows {result.secrets_rate:>10,.0f} secrets/s",
                      file=sys.stderr)  # fmt: skip
    return results


RATE, RSS = attrgetter("secrets_rate"), attrgetter("peak_rss_mb")
# (name, numerator, denominators (their minimum), measure, comparison, target or None: reported)
TARGETS = [
    ("c4 / c4x1", "c4", ["c4x1"], RATE, ">=", 1.3),
    ("c4 / min(d-fernet-4, d-db-4)", "c4", ["d-fernet-4", "d-db-4"], RATE, ">=", 0.85),
    ("c1 / d-db-1 (aim; was ~0.88)", "c1", ["d-db-1"], RATE, ">=", 0.95),
    ("c1 / a", "c1", ["a"], RATE, ">=", 10.0),
    ("c1 / b", "c1", ["b"], RATE, ">=", 1.2),
    ("verify / d-dec-4", "verify", ["d-dec-4"], RATE, "", None),
    ("verify / d-read-4", "verify", ["d-read-4"], RATE, "", None),
    ("RSS c4 / c4 (rows/10)", "c4", ["c4/10"], RSS, "<=", 1.5),
]


def ratios(results: dict[str, Result]) -> list[tuple[str, float, str, float | None, bool | None]]:
    """(name, value, comparison, target, ok) for each ratio whose variants all ran."""
    out = []
    for name, top, bottoms, measure, op, target in TARGETS:
        if top not in results or any(b not in results for b in bottoms):
            continue
        value = measure(results[top]) / min(measure(results[b]) for b in bottoms)
        ok = None if target is None else value >= target if op == ">=" else value <= target
        out.append((name, value, op, target, ok))
    return out


def format_text(results: dict[str, Result], args: argparse.Namespace) -> str:
    """The table, then the ratios against their targets (secrets/s unless RSS)."""
    head = ["variant", "rows", "secrets", "seconds", "rows/s", "secrets/s", "peak RSS MB",
            "worst lag ms", "client CPU s", "server CPU s"]  # fmt: skip
    table = [
        [VARIANTS[name].label, f"{r.rows:,}", f"{r.secrets:,}", f"{r.seconds:.2f}",
         f"{r.rate:,.0f}", f"{r.secrets_rate:,.0f}", f"{r.peak_rss_mb:.1f}",
         cell(r.lag_ms, ".1f"), f"{r.client_cpu_s:.2f}", cell(r.server_cpu_s, ".2f")]
        for name, r in results.items()
    ]  # fmt: skip
    checks = [
        [name, f"{value:.2f}", "-" if target is None else f"{op} {target:.2f}",
         "info" if ok is None else "ok" if ok else "MISS"]
        for name, value, op, target, ok in ratios(results)
    ]  # fmt: skip
    title = (
        f"migrate: {args.rows:,} rows (a: {args.baseline_rows:,}), runner batch "
        f"{args.batch_size}, b batch {args.plain_batch_size}, {os.cpu_count()} CPUs"
    )
    tables = [*text_table(head, table), "", *text_table(["ratio", "value", "target", ""], checks)]
    return "\n".join([title, "", *tables])


def format_json(results: dict[str, Result], args: argparse.Namespace) -> str:
    report = {
        "config": {k: v for k, v in vars(args).items() if k not in ("database_url", "variant")},
        "variants": {
            name: {**asdict(r), "rows_per_s": r.rate, "secrets_per_s": r.secrets_rate}
            for name, r in results.items()
        },
        "ratios": {
            name: {"value": value, "target": None if target is None else f"{op} {target}", "ok": ok}
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
    parser.add_argument("--only", action="append", choices=list(VARIANTS), metavar="VARIANT",
                        help="run only this (repeatable): " + ", ".join(VARIANTS))  # fmt: skip
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
    results = asyncio.run(run(args, _common.server_url(args.database_url)))
    print(
        format_json(results, args) if args.output_format == "json" else format_text(results, args)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
