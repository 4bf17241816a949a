"""`python -m tenantstore.migrate`: a thin shell over `tenantstore.migrate`.

Behind PgBouncer in transaction mode, set `TENANTSTORE_PGBOUNCER=1` (or
`--pgbouncer`) and point `DATABASE_DIRECT_URL` (or `--direct-url`) at
PostgreSQL itself: `up` and `down` take their lock there, and refuse to run
without it.

Exit codes: 0 success; 1 a migration or batch run failed (or found
undecryptable secrets); 2 usage or configuration error (such as a missing
`ENCRYPTION_KEY` or a table that does not fit its declaration), with
nothing changed; 130 interrupted (Ctrl-C), nothing half-written.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import Sequence

import anyio.to_thread
import asyncpg

from .._cli import run_command
from ..config import load_settings
from ..db import (
    DATABASE_DIRECT_URL,
    connect,
    create_pool,
    embedded_database_url,
    resolve_database_url,
    resolve_direct_url,
)
from ..encryption import KeyRing
from ..errors import (
    ConfigurationError,
    DestructiveMigrationError,
    EncryptionKeyMissingError,
    describe_driver_error,
    printable,
)
from ..keys.envelope import keyring_from_env
from ..keys.providers import provider_name
from ..keys.store import check_key_id, keys_table_exists, list_known_keys
from ..models import TENANTS
from ..pooling import PGBOUNCER_SETTING, pgbouncer_setting, through_pooler
from ..tables import EncryptedTable
from ._format import format_status, report_data
from ._textfile import write_metrics_file
from .progress import make_progress, redirect_logging
from .schema import MigrationReport, StatusReport, downgrade, migration_status, upgrade
from .secrets import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_RETRY_FOR,
    RunOptions,
    SecretsReport,
    run_operation,
)

__all__ = ["main", "parse_shard"]

logger = logging.getLogger("tenantstore")

_BATCH_OPERATIONS = ("encrypt", "decrypt", "rotate", "verify")


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
    formatter = argparse.ArgumentDefaultsHelpFormatter
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--database-url",
        metavar="URL",
        help="PostgreSQL URL (overrides DATABASE_URL; unset: the embedded development server)",
    )
    common.add_argument(
        "--pgbouncer",
        action="store_true",
        default=None,
        help=f"the database URL goes through PgBouncer in transaction mode "
        f"(default: {PGBOUNCER_SETTING})",
    )
    common.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        metavar="N",
        help="rows per keyset page and per write",
    )
    common.add_argument(
        "--shard",
        type=parse_shard,
        default="0/1",  # a string, parsed like the option, so --help shows it as typed
        metavar="i/N",
        help="process only shard i of N, to split a table across runners",
    )
    common.add_argument(
        "--retry-for",
        type=float,
        default=DEFAULT_RETRY_FOR,
        metavar="SECONDS",
        help="how long a lost database connection is retried, with backoff, before giving up",
    )
    common.add_argument(
        "--metrics-file",
        metavar="PATH",
        help="also write the run's figures here, in the Prometheus text format "
        "(for node_exporter's textfile collector; written atomically)",
    )
    common.add_argument("--quiet", action="store_true", help="no progress output")
    common.add_argument(
        "--json", action="store_true", help="print the final report as JSON on stdout"
    )
    target = argparse.ArgumentParser(add_help=False)
    target.add_argument(
        "--table",
        metavar="[SCHEMA.]NAME",
        help="an application table instead of tenants (needs --key and --column)",
    )
    target.add_argument("--key", action="append", metavar="COLUMN", help="--table's key column")
    target.add_argument(
        "--column",
        action="append",
        metavar="NAME",
        help="a secret column (repeatable); with no --table, restricts the tenants columns",
    )
    parser = argparse.ArgumentParser(
        prog="python -m tenantstore.migrate",
        description="Schema migrations and batch encryption of tenant secrets.",
        formatter_class=formatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser(
        "up", parents=[common], help="apply pending migrations", formatter_class=formatter
    )
    up.add_argument("--to", type=int, metavar="VERSION", help="stop at this version")
    down = commands.add_parser(
        "down", parents=[common], help="revert the latest N migrations", formatter_class=formatter
    )
    down.add_argument("steps", nargs="?", type=int, default=1, metavar="N", help="steps to revert")
    down.add_argument(
        "--yes", action="store_true", help="allow dropping tables or columns that hold data"
    )
    for schema_command in (up, down):
        schema_command.add_argument(
            "--direct-url",
            metavar="URL",
            help=f"PostgreSQL itself, not PgBouncer, for the schema lock (overrides "
            f"{DATABASE_DIRECT_URL}; unset: the database URL)",
        )
    commands.add_parser(
        "status",
        parents=[common, target],
        help="show migrations, runs and secret counts (changes nothing)",
        formatter_class=formatter,
    )
    for name, doc in (
        ("encrypt", "encrypt every plaintext secret"),
        ("decrypt", "decrypt every secret back to plaintext"),
        ("rotate", "re-encrypt under the primary key every token made with an older key"),
    ):
        commands.add_parser(name, parents=[common, target], help=doc, formatter_class=formatter)
    verify = commands.add_parser(
        "verify",
        parents=[common, target],
        help="count current, previous-key, plaintext and undecryptable secrets",
        formatter_class=formatter,
    )
    verify.add_argument(
        "--require-current",
        action="store_true",
        help="exit 1 unless every secret is a token under the primary key",
    )
    verify.add_argument(
        "--retire",
        metavar="KEY_ID",
        help="exit 1 while any secret is still under this key id (see `keys list`)",
    )
    return parser


def _table(args: argparse.Namespace) -> EncryptedTable:
    """The table a batch command or `status` runs over, from --table/--key/--column."""
    table = getattr(args, "table", None)
    keys = getattr(args, "key", None)
    columns = getattr(args, "column", None)
    if table is None:
        if keys:
            raise ConfigurationError("--key needs --table")
        return TENANTS if not columns else TENANTS.only(columns)
    if not keys or not columns:
        raise ConfigurationError("--table needs --key COLUMN and at least one --column NAME")
    return EncryptedTable(table, key=keys if len(keys) > 1 else keys[0], secrets=columns)


def _lock_url(args: argparse.Namespace, pgbouncer: bool) -> str | None:
    """`up`/`down`'s DATABASE_DIRECT_URL; required, before any I/O, when PgBouncer is declared."""
    if args.command not in ("up", "down"):
        return None
    lock_url = resolve_direct_url(args.direct_url)
    if pgbouncer and lock_url is None:
        raise ConfigurationError(
            f"the database URL goes through PgBouncer ({PGBOUNCER_SETTING}), and "
            f"`{args.command}` needs a PostgreSQL session of its own for the schema "
            f"lock: set {DATABASE_DIRECT_URL} (or --direct-url) to a URL that reaches "
            "PostgreSQL directly"
        )
    return lock_url


async def _through_pooler(url: str, settings: dict[str, str]) -> bool:
    """Whether `url` goes through PgBouncer (or another pooler), declared or not."""
    # No statement cache: a named statement would outlive us on a PgBouncer server.
    probe = await connect(url, statement_cache_size=0, server_settings=settings)
    try:
        return await through_pooler(probe)
    finally:
        await probe.close()


async def _run(args: argparse.Namespace, keyring: KeyRing | None, *, hsm: bool = False) -> int:
    url = resolve_database_url(args.database_url)
    declared = pgbouncer_setting(args.pgbouncer)
    lock_url = _lock_url(args, declared)
    if url is None:
        url = await anyio.to_thread.run_sync(embedded_database_url)
    settings = {"application_name": "tenantstore-migrate"}
    # Found out undeclared too: through PgBouncer the pool keeps no prepared statements.
    pgbouncer = declared or await _through_pooler(url, settings)
    # min_size=0: no background reconnect loop, whose tracebacks would read like
    # a crash during an outage the runner reports itself.
    pool = await create_pool(
        url, min_size=0, max_size=3, pgbouncer=pgbouncer, server_settings=settings
    )
    if hsm:  # envelope mode: the data keys come from tenantstore_keys, unwrapped by the HSM
        try:
            keyring = await keyring_from_env(pool)
        except BaseException:
            await pool.close()
            raise
    progress = make_progress(args.command, "none" if args.quiet or args.json else "auto")
    options: RunOptions = {
        "batch_size": args.batch_size,
        "shard": args.shard,
        "progress": progress,
        "retry_for": args.retry_for,
    }
    started = time.monotonic()
    report: MigrationReport | SecretsReport | StatusReport | None = None
    try:
        with redirect_logging(progress):
            report = await _command(args, keyring, pool, lock_url or url, options, settings)
    except BaseException as exc:
        outcome = (
            "interrupted"
            if isinstance(exc, KeyboardInterrupt | asyncio.CancelledError)
            else "failed"
        )
        _metrics_file(args, report, outcome, time.monotonic() - started)
        raise
    finally:
        progress.close()
        await pool.close()
    code = _report(args, report)
    _metrics_file(args, report, "completed" if code == 0 else "failed", time.monotonic() - started)
    return code


def _metrics_file(
    args: argparse.Namespace,
    report: MigrationReport | SecretsReport | StatusReport | None,
    outcome: str,
    seconds: float,
) -> None:
    """Write `--metrics-file`, if asked (never fails the run: a warning if it cannot)."""
    if args.metrics_file is None:
        return
    table = (
        TENANTS.qualified_name if args.command in ("up", "down") else _table(args).qualified_name
    )
    try:
        write_metrics_file(
            args.metrics_file, args.command, table, report, outcome=outcome, seconds=seconds
        )
    except OSError as exc:
        logger.warning("could not write --metrics-file: %s", describe_driver_error(exc))


def _report(
    args: argparse.Namespace, report: MigrationReport | SecretsReport | StatusReport
) -> int:
    """Print the report (text or JSON) and return the exit code it calls for."""
    if args.json:
        print(json.dumps(report_data(report), default=str))
    elif isinstance(report, StatusReport):
        print("\n".join(format_status(report)))
    else:
        if isinstance(report, SecretsReport) and len(report.columns) > 1:
            print("\n".join(report.column_lines()))
        print(report.summary())
    if isinstance(report, SecretsReport):
        if report.failures:
            return 1
        if getattr(args, "require_current", False) and (report.previous or report.plaintext):
            print(
                f"error: {report.previous} previous-key and {report.plaintext} plaintext secrets "
                "remain: run rotate / encrypt before removing OLD_ENCRYPTION_KEY",
                file=sys.stderr,
            )
            return 1
        retire = getattr(args, "retire", None)
        if retire is not None and report.keys[retire]:
            counts = ", ".join(
                f"{name} {c.keys[retire]}" for name, c in report.columns.items() if c.keys[retire]
            )
            print(
                f"error: {report.keys[retire]} secrets are still under key {printable(retire)} "
                f"({counts}): run rotate before retiring it",
                file=sys.stderr,
            )
            return 1
    return 0


async def _command(
    args: argparse.Namespace,
    keyring: KeyRing | None,
    pool: asyncpg.Pool,
    lock_url: str,
    options: RunOptions,
    settings: dict[str, str],
) -> MigrationReport | SecretsReport | StatusReport:
    if args.command in ("up", "down"):
        # The schema runner's advisory lock lives on a connection of its own,
        # to DATABASE_DIRECT_URL when set (the schema steps run there too).
        lock = await connect(lock_url, statement_cache_size=0, server_settings=settings)
        try:
            if args.command == "up":
                return await upgrade(pool, keyring, target=args.to, connection=lock, **options)
            return await downgrade(
                pool, keyring, steps=args.steps, confirm=args.yes, connection=lock, **options
            )
        finally:
            await lock.close()
    table = _table(args)
    if args.command == "status":
        status = await migration_status(pool)
        status.table = table.qualified_name
        if keyring is None:
            status.not_counted = "ENCRYPTION_KEY not set"
        else:
            try:
                status.counts = await run_operation(
                    "verify", pool, keyring, record=False, table=table,
                    batch_size=args.batch_size, retry_for=args.retry_for,
                )  # fmt: skip
            except ConfigurationError as exc:  # the table is missing or does not fit
                status.not_counted = str(exc)
        return status
    assert keyring is not None
    retire = getattr(args, "retire", None)
    if retire is not None:
        await _check_retiring(pool, keyring, retire)
    options["table"] = table
    return await run_operation(args.command, pool, keyring, **options)


async def _check_retiring(pool: asyncpg.Pool, keyring: KeyRing, key_id: str) -> None:
    """Refuse a `--retire` id that names no key: a typo would otherwise count 0 and pass."""
    try:
        check_key_id(key_id)
    except ValueError as exc:
        raise ConfigurationError(f"--retire: {exc}") from None
    if key_id in keyring.key_ids:
        return
    if await keys_table_exists(pool) and any(
        known.key_id == key_id for known in await list_known_keys(pool)
    ):
        return
    raise ConfigurationError(
        f"--retire: key {key_id} is neither configured nor recorded in tenantstore_keys: "
        "check the id (`python -m tenantstore.keys list`)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the migration CLI and return its exit code."""
    args = _parser().parse_args(argv)
    if args.batch_size <= 0:
        print("error: --batch-size must be greater than zero", file=sys.stderr)
        return 2
    if args.retry_for < 0:
        print("error: --retry-for must be zero or greater", file=sys.stderr)
        return 2

    def body() -> int:
        if args.command not in ("up", "down"):
            _table(args)  # a bad --table/--column is a usage error, before any I/O
        keyring: KeyRing | None = None
        hsm = provider_name(load_settings(None, [".env.secrets"])) != "env"
        if not hsm:
            try:
                keyring = KeyRing.from_env()
            except EncryptionKeyMissingError:
                if args.command in _BATCH_OPERATIONS:
                    raise
        return asyncio.run(_run(args, keyring, hsm=hsm))

    return run_command(
        body,
        level=logging.WARNING if args.quiet else logging.INFO,
        interrupted=f"{args.command} stopped. Nothing is half-written; run the same "
        "command again to resume.",
        usage=(DestructiveMigrationError,),
        hide="tenantstore.audit",  # audit records go to the application's handlers
    )


if __name__ == "__main__":
    sys.exit(main())
