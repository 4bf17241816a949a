"""What every `python -m tenantstore.*` command shares: its log handler and its exit codes.

Exit codes: 0 success; 1 a failure (`TenantStoreError`, or the database);
2 usage or configuration (`ConfigurationError` and the `usage` errors a
command names), nothing changed; 130 interrupted. Errors print as one
`error: ...` line: ours carry no secret by construction, and a driver's is
described through `describe_driver_error`, never quoted.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

import asyncpg

from .errors import ConfigurationError, TenantStoreError, describe_driver_error

__all__ = ["run_command"]


def run_command(
    body: Callable[[], int],
    *,
    level: int = logging.INFO,
    interrupted: str,
    usage: tuple[type[BaseException], ...] = (),
    hide: str | None = None,
    missing_table: str = "a table tenantstore needs does not exist",
) -> int:
    """Run a command's `body` with tenantstore's log lines on stderr; map errors to exit codes.

    Args:
        body: the command; returns its exit code.
        level: the level of the `tenantstore` logger while it runs.
        interrupted: what to say on Ctrl-C (after `interrupted: `).
        usage: more errors that mean "usage or configuration" (exit 2).
        hide: a logger name whose records stay off the terminal (the audit log).
        missing_table: what to say when a table does not exist (then: run `migrate up`).
    """
    logger = logging.getLogger("tenantstore")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    if hide is not None:
        prefix = hide
        handler.addFilter(lambda record: not record.name.startswith(prefix))
    logger.addHandler(handler)
    previous = logger.level
    logger.setLevel(level)
    try:
        return body()
    except KeyboardInterrupt:
        print(f"\ninterrupted: {interrupted}", file=sys.stderr)
        return 130
    except ConfigurationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except usage as exc:  # a command's own usage errors (e.g. a drop refused without --yes)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TenantStoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except asyncpg.UndefinedTableError:
        print(f"error: {missing_table}: run `python -m tenantstore.migrate up`", file=sys.stderr)
        return 1
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        print(f"error: database: {describe_driver_error(exc)}", file=sys.stderr)
        return 1
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
