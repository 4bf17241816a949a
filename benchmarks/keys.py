"""What do several keys and an HSM cost: start-up unwrapping, and `get_tenant` after it?

One run, one scratch database, one SoftHSM2 token made in a temporary
directory (the Debian package `softhsm2` must be installed):

  start-up   `tenantstore.keys.load_keyring` through PKCS#11: read and unwrap
             N wrapped data keys, N = 1, 10, 100 (median of --startup-runs)
  get_tenant four-secret tenants (benchmarks/get_tenant.py's data), 100
             clients, cold (`cache_size=0`) and warm, with:
               one   one key in the environment, every token under it
               four  four keys, primary first; the primary made few tokens
                     (10%), the oldest key most (45%): a decryption tries up
                     to four HMACs
               hsm   the same four keys, loaded from the HSM (envelope mode)
             Rounds interleave the variants. Targets: four/one and hsm/one
             >= 0.97 (within 3%).

    uv run python benchmarks/keys.py --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
from _common import scratch_database, server_url
from get_tenant import FILL, Result, Summary, _drive, _revealed, make_secrets

from tenantstore import KeyRing, TenantRepository
from tenantstore.encryption import generate_encryption_key
from tenantstore.keys import import_keys, load_keyring, new_data_key
from tenantstore.keys.pkcs11 import Pkcs11Provider
from tenantstore.migrate import upgrade

MODULES = ("/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so")
TOKEN, PIN, SO_PIN, KEK = "bench", "1234-bench", "5678-bench", "kek-bench"
SHARES = (0.10, 0.20, 0.25, 0.45)  # of tokens per key, primary first
VARIANTS = ("one cold", "four cold", "hsm cold", "one warm", "four warm", "hsm warm")


def softhsm(root: Path) -> tuple[str, str]:
    """A fresh token with an AES-256 KEK (non-extractable, sensitive); (module, conf)."""
    import pkcs11
    from pkcs11 import Attribute, KeyType

    module = next((m for m in MODULES if os.path.isfile(m)), None)
    util = shutil.which("softhsm2-util")
    if module is None or util is None:
        sys.exit("SoftHSM2 is missing: apt-get install --no-install-recommends softhsm2")
    (root / "tokens").mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    subprocess.run(  # noqa: S603 - our own arguments, no shell
        [util, "--init-token", "--free", "--label", TOKEN, "--pin", PIN, "--so-pin", SO_PIN],
        check=True, capture_output=True,
    )  # fmt: skip
    with pkcs11.lib(module).get_token(token_label=TOKEN).open(rw=True, user_pin=PIN) as session:
        session.generate_key(
            KeyType.AES, 256, label=KEK, store=True,
            template={Attribute.TOKEN: True, Attribute.EXTRACTABLE: False,
                      Attribute.SENSITIVE: True, Attribute.WRAP: True, Attribute.UNWRAP: True},
        )  # fmt: skip
    return module, str(conf)


def provider(module: str) -> Pkcs11Provider:
    return Pkcs11Provider(module=module, token=TOKEN, pin=PIN, kek=KEK)


async def startup(url: str, module: str, counts: list[int], runs: int) -> dict[int, float]:
    """Median seconds of `load_keyring` (read and unwrap) with N data keys, per N."""
    out: dict[int, float] = {}
    for count in counts:
        async with scratch_database(url, f"tenantstore_bench_keys{count}") as db:
            pool = await asyncpg.create_pool(db, min_size=1, max_size=2)
            assert pool is not None
            try:
                await upgrade(pool, KeyRing(generate_encryption_key()), target=5)
                hsm = provider(module)
                try:
                    for _ in range(count):
                        await new_data_key(pool, hsm)
                    times = []
                    for _ in range(runs):
                        start = time.perf_counter()
                        ring = await load_keyring(pool, hsm)
                        times.append(time.perf_counter() - start)
                    assert len(ring.key_ids) == count
                finally:
                    hsm.close()
            finally:
                await pool.close()
        out[count] = statistics.median(times)
    return out


async def fill(
    pool: asyncpg.Pool, keys: list[str], secrets: dict[str, tuple[str | None, ...]]
) -> None:
    """Tenants whose tokens are spread over `keys` by SHARES (one key: all under it)."""
    rings = [KeyRing(k) for k in keys]
    rng = random.Random(7)
    ids = list(secrets)
    owner = [rng.choices(range(len(keys)), SHARES[: len(keys)])[0] for _ in ids]
    columns: list[list[str | None]] = [[None] * len(ids) for _ in range(4)]
    for row, tenant_id in enumerate(ids):
        ring = rings[owner[row]]
        for c, value in enumerate(secrets[tenant_id]):
            columns[c][row] = None if value is None else ring.encrypt(value)
    await pool.execute(FILL, ids, [f"Tenant {t}" for t in ids], *columns)


async def measure(
    pool: asyncpg.Pool,
    ring: KeyRing,
    *,
    warm: bool,
    args: argparse.Namespace,
    ids: list[str],
    secrets: dict[str, tuple[str | None, ...]],
) -> Result:
    repo = TenantRepository(pool, ring, cache_size=None if warm else 0)
    for tenant_id in ids[:50]:
        assert _revealed(await repo.get_tenant(tenant_id)) == secrets[tenant_id]  # type: ignore[arg-type]
    if warm:
        await _drive(repo.get_tenant, list(secrets), args.clients)
    rng = random.Random(args.seed)
    await _drive(repo.get_tenant, rng.choices(ids, k=args.warmup), args.clients)
    measured = rng.choices(ids, k=args.requests)
    cpu, wall = time.process_time(), time.perf_counter()
    latencies = await _drive(repo.get_tenant, measured, args.clients)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return Result(
        len(latencies) / wall, cuts[49] * 1e3, cuts[98] * 1e3, 0.0, cpu / len(latencies) * 1e6
    )


async def run(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="tenantstore-bench-hsm-"))
    try:
        module, _ = softhsm(root)
        server = server_url(args.database_url)
        starts = await startup(server, module, args.startup_keys, args.startup_runs)
        rng = random.Random(args.seed)
        secrets = make_secrets(rng, args.tenants, "4")
        keys = [generate_encryption_key() for _ in range(4)]
        summaries = {name: Summary() for name in VARIANTS}
        # One table holds both sets (ids "one-..." under one key, "four-..." spread
        # over four), read through one pool: only the keys differ between variants.
        one = {f"one-{t}": v for t, v in secrets.items()}
        four = {f"four-{t}": v for t, v in secrets.items()}
        async with scratch_database(server, "tenantstore_bench_keyring") as url:
            pool = await asyncpg.create_pool(url, min_size=args.pool_size, max_size=args.pool_size)
            assert pool is not None
            try:
                await upgrade(pool, KeyRing(keys[0]))
                await fill(pool, keys[:1], one)
                await fill(pool, keys, four)
                await pool.execute("ANALYZE tenants")
                hsm = provider(module)
                try:
                    await import_keys(pool, hsm, keys)
                    ring_hsm = await load_keyring(pool, hsm)
                finally:
                    hsm.close()
                env_ids = KeyRing(keys[0], keys[1:]).key_ids
                assert ring_hsm.primary_key_id == env_ids[0]
                assert set(ring_hsm.key_ids) == set(env_ids)
                rings = {
                    "one": (one, KeyRing(keys[0])),
                    "four": (four, KeyRing(keys[0], keys[1:])),
                    "hsm": (four, ring_hsm),
                }
                for round_ in range(args.repeat):
                    # Alternate the order of the rings each round, so drift is shared.
                    order = VARIANTS if round_ % 2 == 0 else VARIANTS[2::-1] + VARIANTS[:2:-1]
                    for name in order:
                        ring_name, mode = name.split()
                        data, ring = rings[ring_name]
                        result = await measure(pool, ring, warm=mode == "warm", args=args,
                                               ids=list(data), secrets=data)  # fmt: skip
                        summaries[name].runs.append(result)
                        print(f"  round {round_ + 1} {name:10} {result.rps:9,.0f} req/s",
                              file=sys.stderr)  # fmt: skip
            finally:
                await pool.close()
        return {"startup": starts, "summaries": summaries}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def report(data: dict[str, Any], args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    summaries: dict[str, Summary] = data["summaries"]
    lines = [f"keys: {args.tenants} four-secret tenants, {args.clients} clients, "
             f"pool {args.pool_size}, {args.requests} requests, {args.repeat} rounds, "
             f"{os.cpu_count()} CPUs", "",
             "start-up through SoftHSM2 (read + unwrap the data keys, median of "
             f"{args.startup_runs}):"]  # fmt: skip
    lines += [f"  {n:4} data keys  {s * 1e3:8.1f} ms  ({s / n * 1e3:.2f} ms a key)"
              for n, s in data["startup"].items()]  # fmt: skip
    lines += ["", f"{'variant':11} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'cpu us/req':>11}"]
    for name, summary in summaries.items():
        m = summary.median
        lines.append(
            f"{name:11} {m('rps'):9,.0f} {m('p50_ms'):8.2f} {m('p99_ms'):8.2f} {m('cpu_us'):11.0f}"
        )
    lines.append("")
    ratios: dict[str, Any] = {}
    for mode in ("cold", "warm"):
        base = summaries[f"one {mode}"]
        for ring in ("four", "hsm"):
            other = summaries[f"{ring} {mode}"]
            rounds = [o.rps / b.rps for o, b in zip(other.runs, base.runs, strict=True)]
            value = other.median("rps") / base.median("rps")
            ok = value >= 0.97
            ratios[f"{ring}/one {mode}"] = {"value": value, "rounds": rounds, "ok": ok}
            each = ", ".join(f"{r:.3f}" for r in rounds)
            lines.append(f"{ring}/one {mode}  {value:.3f}  (rounds: {each})  target >= 0.97 "
                         f"{'ok' if ok else 'MISS'}")  # fmt: skip
    return "\n".join(lines), {
        "startup_seconds": data["startup"],
        "variants": {n: [r.__dict__ for r in s.runs] for n, s in summaries.items()},
        "ratios": ratios,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", help="server to create scratch databases on")
    parser.add_argument("--tenants", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--pool-size", type=int, default=10)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--warmup", type=int, default=2_000)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--startup-keys", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--startup-runs", type=int, default=5)
    parser.add_argument("--output-format", choices=["text", "json"], default="text")
    args = parser.parse_args(argv)
    text, data = report(asyncio.run(run(args)), args)
    print(json.dumps(data, indent=2, default=str) if args.output_format == "json" else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
