"""`python -m tenantstore.migrate`: a thin shell over `tenantstore.migrate`.

Exit codes: 0 success; 1 a migration or batch run failed (or found
undecryptable secrets); 2 usage or configuration error (such as a missing
`ENCRYPTION_KEY`), with nothing changed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

import anyio.to_thread
import asyncpg

from ..db import create_pool, embedded_database_url, resolve_database_url
from ..encryption import KeyRing
from ..errors import (
    ConfigurationError,
    DestructiveMigrationError,
    EncryptionKeyMissingError,
    TenantStoreError,
)
from .progress import make_progress
from .schema import MigrationReport, StatusReport, downgrade, migration_status, upgrade
from .secrets import (
    DEFAULT_BATCH_SIZE,
    SecretsReport,
    decrypt_secrets,
    encrypt_secrets,
    rotate_secrets,
    verify_secrets,
)

__all__ = ["format_status", "main", "parse_shard"]

logger = logging.getLogger("tenantstore")

_BATCH_OPERATIONS = {
    "encrypt": encrypt_secrets,
    "decrypt": decrypt_secrets,
    "rotate": rotate_secrets,
    "verify": verify_secrets,
}


def parse_shard(text: str) -> tuple[int, int]:
    """Parse `i/N` (0 <= i < N) for `--shard`."""
    index, sep, count = text.partition("/")
    try:
        shard = (int(index), int(count))
    except ValueError:
        shard = (-1, 0)
    if not sep or shard[1] <= 0 or not 0 <= shard[0] < shard[1]:
        raise argparse.ArgumentTypeError(f"expected i/N with 0 <= i < N, got {text!r}")
    return shard


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--database-url", help="PostgreSQL URL (overrides DATABASE_URL)")
    common.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, metavar="N")
    common.add_argument(
        "--shard",
        type=parse_shard,
        default=(0, 1),
        metavar="i/N",
        help="process only shard i of N, to split a table across runners",
    )
    common.add_argument("--quiet", action="store_true", help="no progress output")
    common.add_argument("--json", action="store_true", help="print the final report as JSON")
    parser = argparse.ArgumentParser(
        prog="python -m tenantstore.migrate",
        description="Schema migrations and batch encryption of tenant secrets.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", parents=[common], help="apply pending migrations")
    up.add_argument("--to", type=int, metavar="VERSION", help="stop at this version")
    down = commands.add_parser("down", parents=[common], help="revert the latest N migrations")
    down.add_argument("steps", nargs="?", type=int, default=1, metavar="N")
    down.add_argument("--yes", action="store_true", help="allow dropping tables that hold rows")
    commands.add_parser("status", parents=[common], help="show migrations, runs and counts")
    for name, doc in (
        ("encrypt", "encrypt every plaintext secret"),
        ("decrypt", "decrypt every secret back to plaintext"),
        ("rotate", "re-encrypt every token under ENCRYPTION_KEY"),
    ):
        commands.add_parser(name, parents=[common], help=doc)
    verify = commands.add_parser(
        "verify",
        parents=[common],
        help="count current, previous-key, plaintext and undecryptable secrets",
    )
    verify.add_argument(
        "--require-current",
        action="store_true",
        help="exit 1 unless every secret is a token under ENCRYPTION_KEY",
    )
    return parser


def format_status(status: StatusReport) -> list[str]:
    """The lines `status` prints (no secrets: versions, run states and counts)."""
    lines = [f"Schema version: {status.version}"]
    lines += [f"  applied {m.version:04d}_{m.name} at {m.applied_at:%Y-%m-%d %H:%M:%S%z}"
              for m in status.applied]  # fmt: skip
    lines += [f"  pending {label}" for label in status.pending]
    lines += [f"  CHANGED since applied: {name}" for name in status.changed]
    lines += [f"  UNKNOWN applied version {version:04d}" for version in status.unknown]
    for run in status.runs:
        operation = run["operation"]
        state = "INTERRUPTED" if run["interrupted"] else str(run["status"])
        line = f"Last {operation}: {state}, started {run['started_at']:%Y-%m-%d %H:%M:%S%z}"
        line += f", {run['rows_done']} rows done"
        if run["interrupted"]:
            line += f" (rerun `python -m tenantstore.migrate {operation}` to finish)"
        lines.append(line)
    counts = status.counts
    if counts is not None:
        lines.append(
            f"Secrets: {counts.current} current key, {counts.previous} previous key, "
            f"{counts.plaintext} plaintext, {counts.failed} undecryptable"
        )
        lines += [f"  undecryptable: tenant {tid}" for tid in counts.failed_tenant_ids]
    else:
        lines.append("Secrets: not counted (ENCRYPTION_KEY not set)")
    return lines


def _report_data(report: MigrationReport | SecretsReport | StatusReport) -> dict[str, Any]:
    if isinstance(report, SecretsReport):
        return report.as_dict()
    if isinstance(report, MigrationReport):
        return {
            "direction": report.direction,
            "applied": report.applied,
            "version": report.version,
            "data": [data.as_dict() for data in report.data],
        }
    return {
        "version": report.version,
        "pending": report.pending,
        "changed": report.changed,
        "runs": [{k: str(v) for k, v in run.items()} for run in report.runs],
        "counts": None if report.counts is None else report.counts.as_dict(),
    }


async def _run(args: argparse.Namespace, keyring: KeyRing | None) -> int:
    url = resolve_database_url(args.database_url)
    if url is None:
        url = await anyio.to_thread.run_sync(embedded_database_url)
    settings = {"application_name": "tenantstore-migrate"}
    pool = await create_pool(url, min_size=1, max_size=3, server_settings=settings)
    progress = make_progress(args.command, "none" if args.quiet or args.json else "auto")
    options: dict[str, Any] = {
        "batch_size": args.batch_size,
        "shard": args.shard,
        "progress": progress,
    }
    try:
        report: MigrationReport | SecretsReport | StatusReport
        if args.command in ("up", "down"):
            # The schema runner's advisory lock lives on a connection of its own.
            lock = await asyncpg.connect(url, server_settings=settings)
            try:
                if args.command == "up":
                    report = await upgrade(
                        pool, keyring, target=args.to, connection=lock, **options
                    )
                else:
                    if keyring is not None:
                        logger.warning("Migrating down may store secrets in PLAINTEXT again")
                    report = await downgrade(
                        pool, keyring, steps=args.steps, confirm=args.yes, connection=lock,
                        **options,
                    )  # fmt: skip
            finally:
                await lock.close()
        elif args.command == "status":
            report = await migration_status(pool)
            if keyring is not None and "0001_create_tenants" not in report.pending:
                report.counts = await verify_secrets(pool, keyring, batch_size=args.batch_size)
            if not args.json:
                print("\n".join(format_status(report)))
        else:
            assert keyring is not None
            report = await _BATCH_OPERATIONS[args.command](pool, keyring, **options)
    finally:
        progress.close()
        await pool.close()
    if args.json:
        print(json.dumps(_report_data(report), default=str))
    elif not isinstance(report, StatusReport):
        print(report.summary())
    if isinstance(report, SecretsReport):
        if report.failed_tenant_ids:
            return 1
        if getattr(args, "require_current", False) and (report.previous or report.plaintext):
            print(
                f"error: {report.previous} previous-key and {report.plaintext} plaintext secrets "
                "remain: run rotate / encrypt before removing OLD_ENCRYPTION_KEY",
                file=sys.stderr,
            )
            return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the migration CLI and return its exit code."""
    args = _parser().parse_args(argv)
    if args.batch_size <= 0:
        print("error: --batch-size must be greater than zero", file=sys.stderr)
        return 2
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if args.quiet else logging.INFO)
    try:
        try:
            keyring: KeyRing | None = KeyRing.from_env()
        except EncryptionKeyMissingError:
            if args.command in _BATCH_OPERATIONS:
                raise
            keyring = None
        return asyncio.run(_run(args, keyring))
    except (ConfigurationError, DestructiveMigrationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TenantStoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        print(f"error: database: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        logger.removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
