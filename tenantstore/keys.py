"""Key generation: `python -m tenantstore.keys generate [--write PATH]`.

A lost key means lost secrets: every token made with it becomes unreadable.
Back the printed key up in your secrets manager before you use it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .config import read_env_file
from .encryption import ENCRYPTION_KEY, generate_encryption_key
from .errors import ConfigurationError

__all__ = ["KeyFileExistsError", "append_key", "main"]

BACKUP_ADVICE = (
    "Back this key up in your secrets manager now: if it is lost, "
    "every secret encrypted with it is lost too."
)


class KeyFileExistsError(ConfigurationError):
    """The env file already holds an `ENCRYPTION_KEY`; overwriting it would lose secrets."""


def append_key(path: str | os.PathLike[str], key: str) -> None:
    """Append `ENCRYPTION_KEY=<key>` to a dotenv file, creating it with mode 0600.

    Raises:
        KeyFileExistsError: the file already sets `ENCRYPTION_KEY`.
    """
    file = Path(path)
    if ENCRYPTION_KEY in read_env_file(file):
        raise KeyFileExistsError(
            f"{file} already sets {ENCRYPTION_KEY}; refusing to replace it "
            "(to rotate, move the old key to OLD_ENCRYPTION_KEY by hand first)"
        )
    fd = os.open(file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as out:
        if out.tell() > 0 and not file.read_bytes().endswith(b"\n"):
            out.write("\n")
        out.write(f"{ENCRYPTION_KEY}={key}\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the key CLI; return the process exit code (0 ok, 2 usage or refused)."""
    parser = argparse.ArgumentParser(
        prog="python -m tenantstore.keys", description="Manage tenantstore encryption keys."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="print a new Fernet key")
    generate.add_argument(
        "--write", metavar="PATH", help="append the key to this env file (created with mode 0600)"
    )
    generate.add_argument(
        "--if-missing",
        action="store_true",
        help="with --write: do nothing (exit 0) when the file already sets ENCRYPTION_KEY",
    )
    args = parser.parse_args(argv)
    if args.if_missing and args.write is None:
        parser.error("--if-missing needs --write PATH")

    key = generate_encryption_key()
    if args.write is None:
        print(f"{ENCRYPTION_KEY}={key}")
        print(BACKUP_ADVICE, file=sys.stderr)
        return 0
    try:
        if args.if_missing and ENCRYPTION_KEY in read_env_file(args.write):
            print(f"{args.write} already sets {ENCRYPTION_KEY}; keeping it.", file=sys.stderr)
            return 0
        append_key(args.write, key)
    except ConfigurationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"Wrote a new {ENCRYPTION_KEY} to {args.write}. {BACKUP_ADVICE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
