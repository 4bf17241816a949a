"""`check_keys`: know the keys before serving.

For application start-up and readiness probes (and `python -m
tenantstore.keys check`): does this process hold every key the database
uses, has the database seen its primary key, and do a few stored secrets of
each column actually decrypt? A problem raises `KeyCheckError`, so a key
mix-up stops a deployment instead of failing requests.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import anyio.to_thread
import asyncpg

from .._catalog import resolve_table
from .._queries import identifier, render
from ..encryption import KeyRing, stored_token
from ..errors import TenantStoreError, database_error, printable
from ..models import TENANTS
from ..tables import EncryptedTable
from .store import KnownKey, Q, keys_table_exists, list_known_keys

__all__ = ["DEFAULT_SAMPLE", "ColumnCanary", "KeyCheckError", "KeyCheckReport", "check_keys"]

DEFAULT_SAMPLE = 20
"""Stored tokens canary-decrypted per secret column."""

_DRIVER_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)


@dataclass
class ColumnCanary:
    """The canary decrypt of one column: how many sampled values did what, per key id."""

    column: str
    sampled: int = 0
    decrypted: int = 0
    failed: int = 0
    plaintext: int = 0
    keys: Counter[str] = field(default_factory=Counter)


@dataclass
class KeyCheckReport:
    """What `check_keys` found. Key ids, states and counts; never a key or a secret.

    Attributes:
        keyring_ids: the process's key ids, primary first.
        known: the keys `tenantstore_keys` holds (None: the table is missing).
        missing: key ids the database uses (not retired) that the ring lacks.
        primary_seen: whether the database has seen the ring's primary key
            (informational: a brand-new primary has not been used yet).
        database_primary: the key the database records as primary, if any.
        canaries: per secret column of the table, the canary decrypt.
    """

    keyring_ids: tuple[str, ...]
    known: list[KnownKey] | None
    missing: list[str]
    primary_seen: bool
    database_primary: str | None
    canaries: list[ColumnCanary]

    @property
    def problems(self) -> list[str]:
        """Each problem as a sentence; empty when all is well."""
        found = []
        if self.known is None:
            found.append("tenantstore_keys does not exist: run `python -m tenantstore.migrate up`")
        if self.missing:
            found.append(
                "the database uses keys this process lacks: "
                + ", ".join(map(printable, self.missing))
                + " (add them to ENCRYPTION_KEYS, or retire them with `keys retire` once "
                "`migrate verify` counts no secret under them)"
            )
        for canary in self.canaries:
            if canary.failed:
                found.append(
                    f"{canary.failed} of {canary.sampled} sampled {printable(canary.column)} "
                    "values do not decrypt with any key of this process"
                )
        return found

    @property
    def ok(self) -> bool:
        """Whether there is no problem."""
        return not self.problems

    def lines(self) -> list[str]:
        """The report as text for the CLI."""
        primary = self.keyring_ids[0]
        out = [f"primary key {primary}" + ("" if self.primary_seen else " (not used yet)")]
        if self.database_primary not in (None, primary):
            out.append(f"  the database records {self.database_primary} as primary")
        for known in self.known or []:
            held = "held" if known.key_id in self.keyring_ids else "NOT HELD"
            line = f"key {printable(known.key_id)}  {known.state}  {held}"
            if known.wrapped_by is not None:
                line += f"  wrapped by {printable(known.wrapped_by)}"
            out.append(line)
        for canary in self.canaries:
            keys = ", ".join(f"{k} {n}" for k, n in sorted(canary.keys.items()))
            out.append(
                f"canary {printable(canary.column)}: {canary.decrypted}/{canary.sampled} decrypt"
                + (f" ({keys})" if keys else "")
                + (f", {canary.plaintext} plaintext" if canary.plaintext else "")
                + (f", {canary.failed} FAILED" if canary.failed else "")
            )
        out += [f"problem: {problem}" for problem in self.problems]
        out.append("keys ok" if self.ok else "keys NOT ok")
        return out


class KeyCheckError(TenantStoreError):
    """The key check found a problem: a missing key, or a canary that does not decrypt.

    Attributes:
        report: the whole `KeyCheckReport`.
    """

    def __init__(self, report: KeyCheckReport) -> None:
        self.report = report
        super().__init__("key check failed: " + "; ".join(report.problems))


async def check_keys(
    pool: Any,
    keyring: KeyRing,
    *,
    sample: int = DEFAULT_SAMPLE,
    table: EncryptedTable = TENANTS,
) -> KeyCheckReport:
    """Check `keyring` against the database before serving.

    Reads `tenantstore_keys` (the key ids the database uses, their states and
    wrapping KEKs) and canary-decrypts up to `sample` stored values of each
    secret column of `table`. Reads only; takes no lock.

    Args:
        pool: a pool or connection.
        keyring: the process's key ring.
        sample: values canary-decrypted per column (0: no canary).
        table: the declaration whose secret columns are sampled.

    Returns:
        The report, when all is well.

    Raises:
        KeyCheckError: a key the database uses is missing, a canary value
            does not decrypt, or `tenantstore_keys` is missing; `.report` has it all.
        TableDefinitionError: `table` does not fit the catalog.
        DatabaseError: the database failed.
        ValueError: `sample` is negative.
    """
    if sample < 0:
        raise ValueError("sample is expected to be zero or greater")
    try:
        known = await list_known_keys(pool) if await keys_table_exists(pool) else None
        resolved = await resolve_table(pool, table)
        values: dict[str, list[Any]] = {}
        for column in table.secrets:
            query = render(Q["sample_tokens"], table=resolved.sql_name, column=identifier(column))
            values[column] = (
                [row[0] for row in await pool.fetch(query.text, sample)] if sample else []
            )
    except _DRIVER_ERRORS as exc:
        raise database_error(exc, "check_keys") from None

    canaries = await anyio.to_thread.run_sync(_canaries, keyring, values)
    ids = keyring.key_ids
    used = [k for k in known or [] if k.state != "retired"]
    report = KeyCheckReport(
        keyring_ids=ids,
        known=known,
        missing=[k.key_id for k in used if k.key_id not in ids],
        primary_seen=any(k.key_id == keyring.primary_key_id for k in known or []),
        database_primary=next((k.key_id for k in used if k.state == "primary"), None),
        canaries=canaries,
    )
    if not report.ok:
        raise KeyCheckError(report)
    return report


def _canaries(keyring: KeyRing, values: dict[str, list[Any]]) -> list[ColumnCanary]:
    ids = keyring.key_ids
    canaries = []
    for column, column_values in values.items():
        canary = ColumnCanary(column, sampled=len(column_values))
        tokens = [stored_token(value) for value in column_values]
        canary.plaintext = tokens.count(None)
        results = keyring.decrypt_batch_with_key_index([t for t in tokens if t is not None])
        for result in results:
            if result is None:
                canary.failed += 1
            else:
                canary.decrypted += 1
                canary.keys[ids[result[1]]] += 1
        canaries.append(canary)
    return canaries
