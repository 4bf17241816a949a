"""Migration files: discovery and parsing, pure apart from `load_migrations`.

Files live in `sql/migrations/` (shipped as `tenantstore.sql/migrations`),
a pair per version: `NNNN_name.up.sql` and, optionally, `NNNN_name.down.sql`.
Comment lines starting `-- tenantstore:` are directives:

- `-- tenantstore: no-transaction`: run outside a transaction (for statements
  such as `CREATE INDEX CONCURRENTLY`); the file must hold one statement.
- `-- tenantstore: drops TABLE`: the step drops TABLE; the runner refuses it
  while TABLE holds rows, unless confirmed.
- `-- tenantstore: drops-column TABLE.COLUMN`: the step drops that column; the
  runner refuses it while the column holds a non-empty value, unless confirmed.
- `-- tenantstore: data-step NAME`: the step is the batch runner NAME
  (`encrypt_secrets` or `decrypt_secrets`) instead of SQL.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass

from .._queries import sql_resource
from ..errors import SqlFileError

__all__ = ["DATA_STEPS", "Migration", "Step", "load_migrations", "parse_migrations"]

DATA_STEPS = frozenset({"encrypt_secrets", "decrypt_secrets"})

_FILENAME = re.compile(r"(?P<version>\d{4})_(?P<name>[a-z0-9_]+)\.(?P<direction>up|down)\.sql")
_DIRECTIVE_LINE = re.compile(r"--\s*tenantstore\s*:", re.IGNORECASE)
_DIRECTIVE = re.compile(r"--\s*tenantstore:\s*(?P<word>[a-z-]+)(?:\s+(?P<arg>\S+))?\s*$")


@dataclass(frozen=True, slots=True)
class Step:
    """One direction of a migration: SQL, or a data step, with its directives."""

    filename: str
    sql: str
    transactional: bool = True
    drops: tuple[str, ...] = ()
    data_step: str | None = None
    drops_columns: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Migration:
    """A numbered migration: its up step, optional down step and the up file's checksum."""

    version: int
    name: str
    up: Step
    down: Step | None
    checksum: str

    @property
    def label(self) -> str:
        """`0001_create_tenants`, as in the file names."""
        return f"{self.version:04d}_{self.name}"


def parse_step(filename: str, text: str) -> Step:
    """Read a step's directives.

    Raises:
        SqlFileError: an unknown directive or data step, at `file:line`.
    """
    transactional = True
    drops: list[str] = []
    drops_columns: list[tuple[str, str]] = []
    data_step: str | None = None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not _DIRECTIVE_LINE.match(line.strip()):
            continue
        # Any line that looks like a directive must be one: a mistyped
        # `drops` silently ignored would skip the guard against data loss.
        match = _DIRECTIVE.match(line.strip())
        if not match:
            raise SqlFileError(f"malformed directive {line.strip()!r} at {filename}:{lineno}")
        word, arg = match["word"], match["arg"]
        if word == "no-transaction" and arg is None:
            transactional = False
        elif word == "drops" and arg:
            drops.append(arg)
        elif word == "drops-column" and arg and arg.count(".") == 1 and "" not in arg.split("."):
            table, column = arg.split(".")
            drops_columns.append((table, column))
        elif word == "data-step" and arg in DATA_STEPS:
            data_step = arg
        else:
            raise SqlFileError(f"unknown directive {line.strip()!r} at {filename}:{lineno}")
    return Step(filename, text, transactional, tuple(drops), data_step, tuple(drops_columns))


def parse_migrations(files: Mapping[str, str]) -> list[Migration]:
    """Pair up `{filename: text}` into migrations ordered by version.

    Raises:
        SqlFileError: a badly named file, a down file without an up file, or
            two files for one version and direction.
    """
    ups: dict[int, tuple[str, Step]] = {}
    downs: dict[int, tuple[str, Step]] = {}
    for filename in sorted(files):
        match = _FILENAME.fullmatch(filename)
        if not match:
            raise SqlFileError(
                f"migration file name must look like 0001_name.up.sql at {filename}:1"
            )
        version, name = int(match["version"]), match["name"]
        target = ups if match["direction"] == "up" else downs
        if version in target:
            raise SqlFileError(
                f"second {match['direction']} file for version {version} at {filename}:1"
            )
        target[version] = (name, parse_step(filename, files[filename]))
    for version, (_, step) in downs.items():
        if version not in ups:
            raise SqlFileError(f"down file without an up file at {step.filename}:1")
    migrations = []
    for version in sorted(ups):
        name, up = ups[version]
        down = downs.get(version)
        if down is not None and down[0] != name:
            raise SqlFileError(f"down file name differs from its up file at {down[1].filename}:1")
        checksum = hashlib.sha256(up.sql.encode("utf-8")).hexdigest()
        migrations.append(Migration(version, name, up, down and down[1], checksum))
    return migrations


def load_migrations() -> list[Migration]:
    """Read the migrations shipped in `tenantstore.sql/migrations`."""
    folder = sql_resource("migrations")
    files = {
        entry.name: entry.read_text(encoding="utf-8")
        for entry in folder.iterdir()
        if entry.name.endswith(".sql")
    }
    return parse_migrations(files)
