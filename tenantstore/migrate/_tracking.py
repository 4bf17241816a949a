"""The runner's own bookkeeping tables: applied migrations and batch runs."""

from __future__ import annotations

import asyncpg

from .._queries import load_queries
from ..db import AnyConnection

__all__ = ["TRACK", "ensure_tracking_tables"]

TRACK = {name: query.sql for name, query in load_queries("tracking.sql").items()}


async def ensure_tracking_tables(conn: AnyConnection) -> None:
    """Create the tracking tables if missing; safe while another runner does the same."""
    for name in ("create_migrations_table", "create_runs_table", "add_runs_target"):
        try:
            await conn.execute(TRACK[name])
        except (asyncpg.UniqueViolationError, asyncpg.DuplicateColumnError):
            pass  # PostgreSQL's catalog race on concurrent CREATE / ADD: the other runner won
