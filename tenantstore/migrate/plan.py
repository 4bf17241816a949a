"""The pure half of the batch runner: what to do with each secret, and the report.

`plan_cells` decides, for every non-empty secret of a page (a cell: row,
column, stored value), what the operation makes of it and computes the new
value; it does CPU work only and runs in a worker thread. `SecretsReport`
adds up what happened, per column and per key id, and formats the summary
lines. No I/O here.

What is a token is decided in one place, `encryption.stored_token`: a value
that is a Fernet token once surrounding whitespace is stripped (a
hand-edited row, a `psql \\copy` artefact) is that token, for the repository,
`encrypt` and `verify` alike.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ..encryption import KeyRing, stored_token
from ..errors import printable

__all__ = [
    "REPORT_SCHEMA_VERSION",
    "Cell",
    "ColumnCounts",
    "Failure",
    "Operation",
    "Outcome",
    "SecretsReport",
    "plan_cells",
]

Operation = Literal["encrypt", "decrypt", "rotate", "verify"]

Outcome = Literal[
    "changed", "skipped", "current", "previous", "plaintext", "failed", "changed_concurrently"
]
"""What became of one secret. `changed`: encrypted / decrypted / rotated;
`skipped`: already done (already encrypted / plaintext / current); `current`
and `previous` (verify): a token under the primary or an older key;
`plaintext` (verify, rotate): left as plaintext; `failed`: see `Failure`;
`changed_concurrently`: the application kept rewriting it during the run."""

FailureReason = Literal["undecryptable", "nul", "token-like"]

REPORT_SCHEMA_VERSION = 1
"""Version of `SecretsReport.as_dict()`'s layout (`--json`); bumped on any incompatible change."""


@dataclass(frozen=True, slots=True)
class Failure:
    """A secret the run could not process: the row's key, the column, and why.

    `undecryptable`: no configured key decrypts the token. `nul`: its plaintext
    holds a NUL character, which PostgreSQL text cannot store, so it stays
    encrypted. `token-like`: its plaintext is itself a Fernet token, which
    every later step would take for one, so it stays encrypted.
    """

    key: str
    column: str
    reason: FailureReason


@dataclass(slots=True)
class Cell:
    """One secret of a page, planned: `new` is the value to write, or None for none.

    `verify` writes nothing, so its cells that did not fail each stand for
    `count` secrets of one column with one outcome and key (`row` is -1).
    """

    row: int
    column: int
    outcome: Outcome
    new: str | None = field(default=None, repr=False)  # plaintext, for `decrypt`
    key_id: str | None = None
    reason: FailureReason | None = None
    count: int = 1


def plan_cells(
    operation: Operation, keyring: KeyRing, cells: Sequence[tuple[int, int, str]]
) -> list[Cell]:
    """Plan each (row, column, stored value) of a page: pure CPU work, for a worker thread.

    `encrypt` recognises tokens structurally and never decrypts; the other
    operations decrypt every token, all of a page's at once.
    """
    if operation == "verify":
        return _verify_cells(keyring, cells)
    if operation == "encrypt":
        plain = [cell for cell in cells if stored_token(cell[2]) is None]
        tokens = keyring.encrypt_batch([value for _, _, value in plain])
        planned = {(r, c): t for (r, c, _), t in zip(plain, tokens, strict=True)}
        return [
            Cell(r, c, "changed", planned[r, c]) if (r, c) in planned else Cell(r, c, "skipped")
            for r, c, _ in cells
        ]
    out: list[Cell] = []
    found: list[tuple[int, int, str]] = []
    for r, c, value in cells:
        token = stored_token(value)
        if token is None:
            out.append(Cell(r, c, "skipped" if operation == "decrypt" else "plaintext"))
        else:
            found.append((r, c, token))
    results = keyring.decrypt_batch_with_key_index([token for _, _, token in found])
    rotate: list[tuple[int, int, str, str]] = []
    for (r, c, _), result in zip(found, results, strict=True):
        if result is None:
            out.append(Cell(r, c, "failed", reason="undecryptable"))
            continue
        plaintext, index = result
        key_id = keyring.key_ids[index]
        if operation == "rotate":
            if index == 0:
                out.append(Cell(r, c, "skipped", key_id=key_id))
            else:
                rotate.append((r, c, plaintext, key_id))
        elif "\x00" in plaintext:
            out.append(Cell(r, c, "failed", key_id=key_id, reason="nul"))
        elif stored_token(plaintext) is not None:
            out.append(Cell(r, c, "failed", key_id=key_id, reason="token-like"))
        else:
            out.append(Cell(r, c, "changed", plaintext, key_id))
    # encrypt_batch passes "" through; a token of "" must stay a token, hence encrypt().
    fresh = keyring.encrypt_batch([plaintext for _, _, plaintext, _ in rotate])
    for (r, c, plaintext, key_id), token in zip(rotate, fresh, strict=True):
        out.append(Cell(r, c, "changed", token or keyring.encrypt(plaintext), key_id))
    return out


def _verify_cells(keyring: KeyRing, cells: Sequence[tuple[int, int, str]]) -> list[Cell]:
    """Count a page's secrets per column and key (a cell per failure, for its row).

    A cell per secret cost verify a fifth of its throughput; it only counts.
    """
    tally: Counter[tuple[int, int]] = Counter()  # (column, key index; -1: plaintext)
    found: list[tuple[int, int, str]] = []
    for r, c, value in cells:
        token = stored_token(value)
        if token is None:
            tally[c, -1] += 1
        else:
            found.append((r, c, token))
    out: list[Cell] = []
    results = keyring.decrypt_batch_with_key_index([token for _, _, token in found])
    for (r, c, _), result in zip(found, results, strict=True):
        if result is None:
            out.append(Cell(r, c, "failed", reason="undecryptable"))
        else:
            tally[c, result[1]] += 1
    ids = keyring.key_ids
    for (c, index), count in tally.items():
        if index < 0:
            out.append(Cell(-1, c, "plaintext", count=count))
        else:
            outcome: Outcome = "current" if index == 0 else "previous"
            out.append(Cell(-1, c, outcome, key_id=ids[index], count=count))
    return out


@dataclass
class ColumnCounts:
    """What a run found and did in one column; `keys` counts tokens found per key id."""

    changed: int = 0
    skipped: int = 0
    current: int = 0
    previous: int = 0
    plaintext: int = 0
    failed: int = 0
    changed_concurrently: int = 0
    keys: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        """The counts as JSON-ready data."""
        return {
            "changed": self.changed,
            "skipped": self.skipped,
            "current": self.current,
            "previous": self.previous,
            "plaintext": self.plaintext,
            "failed": self.failed,
            "changed_concurrently": self.changed_concurrently,
            "keys": dict(sorted(self.keys.items())),
        }


_TOTALS = ("changed", "skipped", "current", "previous", "plaintext", "changed_concurrently")


@dataclass
class SecretsReport:
    """What a run did, per column and in total. Holds keys and counts, never a secret.

    `rows` is the number of rows the run read (each once, whatever was
    retried); each column's counts add up to the secrets it found there.
    """

    operation: Operation
    table: str = "tenants"
    columns: dict[str, ColumnCounts] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)
    rows: int = 0
    retries: int = 0
    elapsed_seconds: float = 0.0

    def column(self, name: str) -> ColumnCounts:
        """The counts of one column (created empty on first use)."""
        counts = self.columns.get(name)
        if counts is None:
            counts = self.columns[name] = ColumnCounts()
        return counts

    def count(self, column: str, cell: Cell, key: Any) -> None:
        """Record a cell's final outcome."""
        counts = self.column(column)
        setattr(counts, cell.outcome, getattr(counts, cell.outcome) + 1)
        if cell.key_id is not None:
            counts.keys[cell.key_id] += 1
        if cell.outcome == "failed":
            assert cell.reason is not None
            self.failures.append(Failure(str(key), column, cell.reason))

    def _total(self, name: str) -> int:
        return sum(getattr(counts, name) for counts in self.columns.values())

    @property
    def changed(self) -> int:
        """Secrets encrypted / decrypted / rotated."""
        return self._total("changed")

    @property
    def skipped(self) -> int:
        """Secrets already done: already encrypted / plaintext / current."""
        return self._total("skipped")

    @property
    def current(self) -> int:
        """(verify) Tokens under the primary key."""
        return self._total("current")

    @property
    def previous(self) -> int:
        """(verify) Tokens under a previous key."""
        return self._total("previous")

    @property
    def plaintext(self) -> int:
        """(verify, rotate) Secrets stored as plaintext."""
        return self._total("plaintext")

    @property
    def changed_concurrently(self) -> int:
        """Secrets the application kept rewriting during the run; left as it wrote them."""
        return self._total("changed_concurrently")

    @property
    def failed(self) -> int:
        """Secrets that could not be processed (see `failures`)."""
        return len(self.failures)

    @property
    def failed_tenant_ids(self) -> list[str]:
        """The keys of the rows with a failure, each once, in the order found."""
        return list(dict.fromkeys(failure.key for failure in self.failures))

    @property
    def keys(self) -> Counter[str]:
        """Tokens found per key id, over every column."""
        total: Counter[str] = Counter()
        for counts in self.columns.values():
            total.update(counts.keys)
        return total

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data: the `--json` layout, `schema` versioned."""
        data: dict[str, Any] = {
            "schema": REPORT_SCHEMA_VERSION,
            "operation": self.operation,
            "table": self.table,
            "rows": self.rows,
        }
        data.update({name: self._total(name) for name in _TOTALS})
        data["failed"] = self.failed
        data["keys"] = dict(sorted(self.keys.items()))
        data["columns"] = {name: counts.as_dict() for name, counts in self.columns.items()}
        data["failures"] = [
            {"key": f.key, "column": f.column, "reason": f.reason} for f in self.failures
        ]
        data["failed_tenant_ids"] = self.failed_tenant_ids
        data["retries"] = self.retries
        data["elapsed_seconds"] = round(self.elapsed_seconds, 3)
        return data

    def summary(self) -> str:
        """The one-line summary the CLI ends with (totals over every column)."""
        failed = f", {self.failed} failed" if self.failed else ""
        if self.operation == "encrypt":
            return (
                f"Migration complete: {self.changed} keys encrypted, "
                f"{self.skipped} already encrypted{failed}"
            )
        if self.operation == "decrypt":
            return (
                f"Migration complete: {self.changed} keys decrypted, "
                f"{self.skipped} already plaintext{failed}"
            )
        if self.operation == "rotate":
            return (
                f"Rotation complete: {self.changed} keys rotated, "
                f"{self.skipped} already current{failed}"
            )
        return (
            f"Verification complete: {self.current} current key, {self.previous} previous key, "
            f"{self.plaintext} plaintext, {self.failed} undecryptable"
        )

    def column_lines(self) -> list[str]:
        """One line per column, for runs over several: `  oauth_access_token: 3 encrypted, ...`."""
        verbs = {"encrypt": "encrypted", "decrypt": "decrypted", "rotate": "rotated"}
        lines = []
        for name, c in self.columns.items():
            if self.operation == "verify":
                text = f"{c.current} current key, {c.previous} previous key"
            else:
                text = f"{c.changed} {verbs[self.operation]}, {c.skipped} already done"
            if self.operation in ("verify", "rotate"):
                text += f", {c.plaintext} plaintext"
            if c.failed:
                text += f", {c.failed} failed"
            if c.changed_concurrently:
                text += f", {c.changed_concurrently} changed concurrently"
            if c.keys:
                text += " (keys: " + ", ".join(f"{k} {n}" for k, n in sorted(c.keys.items())) + ")"
            lines.append(f"  {printable(name)}: {text}")
        return lines
