"""`python -m tenantstore.audit`: read the audit log that `PostgresSink` writes.

    python -m tenantstore.audit tail [-n N] [--follow] [--json]
    python -m tenantstore.audit query [--tenant ID] [--since WHEN] [--until WHEN]
                                      [--actor A] [--operation OP] [--limit N] [--json]
    python -m tenantstore.audit sessions [--all] [--json]
    python -m tenantstore.audit prune --before WHEN [--yes]

WHEN is an ISO 8601 time (UTC when it has no offset) or a duration back
from now: `90s`, `15m`, `1h`, `7d`, `2w`. `tail --follow` polls for new
events until interrupted; events of a batch that committed after a later
one are printed when they appear (within `--grace` seconds). `sessions`
lists the sink sessions not closed, or with a loss: dropped events, or
events issued and never written (a session without `closed_at` whose
process is gone was killed; what it still held is `unaccounted`). `prune`
deletes the events older than WHEN, the one deletion the table allows.

Events hold names, never secrets; every name is printed escaped
(`printable`). Exit codes: 0 success; 1 the database failed (or the audit
table is missing: run `python -m tenantstore.migrate up`); 2 usage or
configuration error, or `prune` without `--yes`, with nothing changed;
130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from .._cli import run_command
from ..db import create_pool, embedded_database_url, resolve_database_url
from ..errors import ConfigurationError, printable
from ._session import SQL

__all__ = ["main", "parse_when"]

logger = logging.getLogger("tenantstore")

_SETTINGS = {"application_name": "tenantstore-audit"}
_DURATION = re.compile(r"(\d+)\s*([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_PAGE = 1000


def parse_when(text: str, now: datetime | None = None) -> datetime:
    """`1h`, `7d` (back from `now`) or an ISO 8601 time (UTC without an offset).

    Raises:
        ConfigurationError: neither.
    """
    now = now or datetime.now(UTC)
    match = _DURATION.fullmatch(text.strip())
    if match:
        return now - timedelta(**{_UNITS[match[2]]: int(match[1])})
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ConfigurationError(
            f"{printable(text)!r} is neither a duration (90s, 15m, 1h, 7d, 2w) nor an ISO time"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _when(text: str) -> datetime:
    try:
        return parse_when(text)
    except ConfigurationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--database-url",
        metavar="URL",
        help="PostgreSQL URL (overrides DATABASE_URL; unset: the embedded development server)",
    )
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("--json", action="store_true", help="one JSON object per line")
    parser = argparse.ArgumentParser(
        prog="python -m tenantstore.audit",
        description="Read the audit log written by tenantstore.audit.pg.PostgresSink.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    tail = commands.add_parser("tail", parents=[common, output], help="the latest events")
    tail.add_argument("-n", type=int, default=20, metavar="N", help="how many (default 20)")
    tail.add_argument("-f", "--follow", action="store_true", help="then print new events")
    tail.add_argument("--interval", type=float, default=1.0, help="seconds between polls")
    tail.add_argument("--grace", type=float, default=10.0, help="seconds to watch for late commits")
    query = commands.add_parser("query", parents=[common, output], help="events in time order")
    query.add_argument("--tenant", metavar="ID", help="the row's key (tenant id)")
    query.add_argument("--since", metavar="WHEN", type=_when, help="at or after")
    query.add_argument("--until", metavar="WHEN", type=_when, help="before")
    query.add_argument("--actor", metavar="ACTOR")
    query.add_argument("--operation", metavar="OP", help="read, write, clear, encrypt, ...")
    query.add_argument("--limit", type=int, metavar="N", help="at most N events")
    sessions = commands.add_parser(
        "sessions", parents=[common, output], help="sink sessions not closed, or with losses"
    )
    sessions.add_argument("--all", action="store_true", help="every session")
    prune = commands.add_parser("prune", parents=[common], help="delete events older than WHEN")
    prune.add_argument("--before", metavar="WHEN", type=_when, required=True)
    prune.add_argument("--yes", action="store_true", help="delete them (else: count, refuse)")
    return parser


# -- output -------------------------------------------------------------------


def _event(row: Any) -> dict[str, Any]:
    return {
        "id": row["id"],
        "at": row["at"].isoformat(),
        "actor": row["actor"],
        "operation": row["operation"],
        "table": row["table_name"],
        "column": row["column_name"],
        "key": row["row_key"],
        "key_id": row["key_id"],
        "outcome": row["outcome"],
        "count": row["count"],
        "process": row["process"],
        "seq": row["seq"],
    }


def _text(value: object) -> str:
    return "-" if value is None else printable(str(value))


def _print_event(row: Any, as_json: bool) -> None:
    event = _event(row)
    if as_json:
        print(json.dumps(event))
        return
    column = event["column"]
    where = _text(event["table"]) + ("" if column is None else "." + _text(column))
    print(
        f"{event['at']} {_text(event['operation'])} {where} key={_text(event['key'])} "
        f"key_id={_text(event['key_id'])} outcome={_text(event['outcome'])} "
        f"count={event['count']} actor={_text(event['actor'])} "
        f"process={_text(event['process'])} seq={event['seq']}"
    )


def _print_session(row: Any, as_json: bool) -> None:
    session = {
        name: value.isoformat() if isinstance(value, datetime) else value
        for name, value in dict(row).items()
    }
    if as_json:
        print(json.dumps(session))
        return
    if row["closed_at"] is None:
        state = "not closed (still running, or killed)"
    else:
        state = f"closed {session['closed_at']}"
    loss = []
    if row["dropped"]:
        loss.append(f"{row['dropped']} dropped")
    if row["unaccounted"]:
        loss.append(f"{row['unaccounted']} issued and not written (lost if the process is gone)")
    print(
        f"{_text(row['process'])}: started {session['started_at']}, last flush "
        f"{session['last_flush_at'] or '-'}, {state}; issued {row['issued']}, written "
        f"{row['written']}" + (f"; {', '.join(loss)}" if loss else "")
    )


# -- commands -------------------------------------------------------------------


async def _tail(conn: Any, args: argparse.Namespace) -> None:
    rows = list(reversed(await conn.fetch(SQL["tail"], max(args.n, 0))))
    for row in rows:
        _print_event(row, args.json)
    if not args.follow:
        return
    sys.stdout.flush()
    if rows:
        high = rows[-1]["id"]
    else:
        high = max([r["id"] for r in await conn.fetch(SQL["tail"], 1)], default=0)
    # Ids are taken when a batch is written and become visible when it commits,
    # so a batch of another process can appear below `high`: every gap is
    # watched for `grace` seconds.
    gaps: list[tuple[int, int, float]] = []  # (first id, last id, watch until)
    printed: set[int] = set()
    while True:
        await asyncio.sleep(args.interval)
        now = time.monotonic()
        gaps = [gap for gap in gaps if gap[2] > now]
        printed = {i for i in printed if any(lo <= i <= hi for lo, hi, _ in gaps)}
        for lo, hi, _ in gaps:
            for row in await conn.fetch(SQL["between"], lo, hi):
                if row["id"] not in printed:
                    printed.add(row["id"])
                    _print_event(row, args.json)
        while True:
            rows = await conn.fetch(SQL["after"], high, _PAGE)
            for row in rows:
                if row["id"] > high + 1:
                    gaps.append((high + 1, row["id"] - 1, now + args.grace))
                high = row["id"]
                _print_event(row, args.json)
            if len(rows) < _PAGE:
                break
        sys.stdout.flush()


async def _query(conn: Any, args: argparse.Namespace) -> None:
    params = (args.tenant, args.since, args.until, args.actor, args.operation, args.limit)
    async with conn.transaction():
        async for row in conn.cursor(SQL["query"], *params, prefetch=_PAGE):
            _print_event(row, args.json)


async def _sessions(conn: Any, args: argparse.Namespace) -> None:
    for row in await conn.fetch(SQL["sessions"], args.all):
        _print_session(row, args.json)


async def _prune(conn: Any, args: argparse.Namespace) -> int:
    before = args.before.isoformat()
    if not args.yes:
        count = await conn.fetchval(SQL["count_before"], args.before)
        print(
            f"error: refusing: prune deletes {count} events older than {before} "
            "(pass --yes to delete them)",
            file=sys.stderr,
        )
        return 2
    deleted = await conn.fetchval(SQL["prune"], args.before)
    print(f"Deleted {deleted} events older than {before}")
    return 0


async def _run(args: argparse.Namespace) -> int:
    url = resolve_database_url(args.database_url)
    if url is None:
        url = embedded_database_url()
    pool = await create_pool(url, min_size=0, max_size=1, server_settings=_SETTINGS)
    try:
        async with pool.acquire() as conn:
            if args.command == "tail":
                await _tail(conn, args)
            elif args.command == "query":
                await _query(conn, args)
            elif args.command == "sessions":
                await _sessions(conn, args)
            else:
                return await _prune(conn, args)
    finally:
        await pool.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the audit CLI and return its exit code (0 ok, 1 failed, 2 usage/configuration)."""
    args = _parser().parse_args(argv)
    if (args.command == "tail" and args.n < 0) or (
        args.command == "query" and args.limit is not None and args.limit < 0
    ):
        print("error: -n and --limit take 0 or more", file=sys.stderr)
        return 2
    return run_command(
        lambda: asyncio.run(_run(args)),
        level=logging.WARNING,
        interrupted=f"{args.command} stopped.",
        missing_table="the audit tables do not exist",
    )


if __name__ == "__main__":
    sys.exit(main())
