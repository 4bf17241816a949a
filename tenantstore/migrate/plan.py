"""The pure half of the batch runner: what to do with one page, and the report.

`plan_batch` decides and computes the new value of every row of a page (it
does CPU work only and runs in a worker thread); `SecretsReport` adds up
what the pages did and formats the summary line. No I/O here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from ..encryption import KeyRing, is_encrypted

__all__ = ["Batch", "Operation", "SecretsReport", "plan_batch"]

Operation = Literal["encrypt", "decrypt", "rotate", "verify"]


@dataclass
class SecretsReport:
    """What a run did. Holds tenant ids and counts, never a secret.

    `changed` is rows encrypted / decrypted / rotated; `skipped` is rows that
    were already done (already encrypted / already plaintext / already current).
    """

    operation: Operation
    changed: int = 0
    skipped: int = 0
    current: int = 0
    previous: int = 0
    plaintext: int = 0
    changed_concurrently: int = 0
    retries: int = 0
    failed_tenant_ids: list[str] = field(default_factory=list)
    elapsed_seconds: float = 0.0

    @property
    def failed(self) -> int:
        """How many rows could not be processed (their ids are in `failed_tenant_ids`):
        undecryptable, or (decrypt) holding a NUL character PostgreSQL cannot store."""
        return len(self.failed_tenant_ids)

    @property
    def rows(self) -> int:
        """Rows examined."""
        if self.operation == "verify":
            return self.current + self.previous + self.plaintext + self.failed
        extra = self.plaintext if self.operation == "rotate" else 0
        return self.changed + self.skipped + self.failed + self.changed_concurrently + extra

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        data = asdict(self)
        data["failed"] = self.failed
        data["rows"] = self.rows
        return data

    def summary(self) -> str:
        """The one-line summary the CLI ends with."""
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


@dataclass(slots=True)
class Batch:
    """The outcome of one page's crypto: what to write and what to count."""

    ids: list[str] = field(default_factory=list)
    old: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    skipped: int = 0
    current: int = 0
    previous: int = 0
    plaintext: int = 0
    failed: list[str] = field(default_factory=list)
    unstorable: list[str] = field(default_factory=list)  # plaintext with NUL: PostgreSQL refuses it

    def extend(self, other: Batch) -> None:
        """Append another batch's rows and counts (pages are planned in slices)."""
        self.ids += other.ids
        self.old += other.old
        self.new += other.new
        self.skipped += other.skipped
        self.current += other.current
        self.previous += other.previous
        self.plaintext += other.plaintext
        self.failed += other.failed
        self.unstorable += other.unstorable


def plan_batch(operation: Operation, keyring: KeyRing, rows: list[tuple[str, str]]) -> Batch:
    """Decide and compute the new value of each (tenant_id, stored value): pure CPU work.

    Runs in a worker thread. Tokens are recognised structurally (`is_encrypted`);
    encrypt never decrypts, the other operations decrypt every token.
    """
    batch = Batch()
    if operation == "encrypt":
        todo = [(tid, value) for tid, value in rows if not is_encrypted(value)]
        batch.skipped = len(rows) - len(todo)
        batch.ids = [tid for tid, _ in todo]
        batch.old = [value for _, value in todo]
        batch.new = keyring.encrypt_batch(batch.old)
        return batch
    tokens = [(tid, value) for tid, value in rows if is_encrypted(value)]
    batch.plaintext = len(rows) - len(tokens)
    results = keyring.decrypt_batch_with_key_index([value for _, value in tokens])
    for (tid, value), result in zip(tokens, results, strict=True):
        if result is None:
            batch.failed.append(tid)
            continue
        plaintext, index = result
        if operation == "decrypt":
            if "\x00" in plaintext:  # PostgreSQL text cannot hold it: leave it encrypted
                batch.unstorable.append(tid)
                continue
            batch.ids.append(tid)
            batch.old.append(value)
            batch.new.append(plaintext)
        elif index == 0:
            batch.current += 1
        else:
            batch.previous += 1
            if operation == "rotate":
                batch.ids.append(tid)
                batch.old.append(value)
                batch.new.append(plaintext)
    if operation == "rotate":
        # encrypt_batch passes "" through; a token of "" must stay a token.
        batch.new = [
            t or keyring.encrypt(p)
            for t, p in zip(keyring.encrypt_batch(batch.new), batch.new, strict=True)
        ]
    if operation == "decrypt":
        batch.skipped, batch.plaintext = batch.plaintext, 0
    elif operation == "rotate":
        batch.skipped = batch.current
    return batch
