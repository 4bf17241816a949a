"""Key generation: `python -m tenantstore.keys generate [--write PATH]`.

A lost key means lost secrets: every token made with it becomes unreadable.
Back the printed key up in your secrets manager before you use it.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .config import parse_env_text
from .encryption import ENCRYPTION_KEY, generate_encryption_key
from .errors import ConfigurationError

__all__ = ["KeyFileExistsError", "append_key", "main"]

BACKUP_ADVICE = (
    "Back this key up in your secrets manager now: if it is lost, "
    "every secret encrypted with it is lost too."
)


class KeyFileExistsError(ConfigurationError):
    """The env file already holds an `ENCRYPTION_KEY`; overwriting it would lose secrets."""


def append_key(path: str | os.PathLike[str], key: str, *, if_missing: bool = False) -> bool:
    """Append `ENCRYPTION_KEY=<key>` to a dotenv file, creating it with mode 0600.

    The check and the append happen under an exclusive lock on the file, so two
    runs at once cannot both add a key. Returns whether the key was written.

    Raises:
        KeyFileExistsError: the file already sets `ENCRYPTION_KEY` (unless `if_missing`,
            which returns False instead).
    """
    file = Path(path)
    fd = os.open(file, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "rb+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        raw = handle.read()
        try:
            text: str | None = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is None:  # raised outside the handler: the decode error holds the bytes
            raise ConfigurationError(f"{file} is not UTF-8 text")
        if ENCRYPTION_KEY in parse_env_text(text, source=str(file)):
            if if_missing:
                return False
            raise KeyFileExistsError(
                f"{file} already sets {ENCRYPTION_KEY}; refusing to replace it "
                "(to rotate, move the old key to OLD_ENCRYPTION_KEY by hand first)"
            )
        if raw and not raw.endswith(b"\n"):
            handle.write(b"\n")
        handle.write(f"{ENCRYPTION_KEY}={key}\n".encode())
    return True


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
        if not append_key(args.write, key, if_missing=args.if_missing):
            print(f"{args.write} already sets {ENCRYPTION_KEY}; keeping it.", file=sys.stderr)
            return 0
    except ConfigurationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"Wrote a new {ENCRYPTION_KEY} to {args.write}. {BACKUP_ADVICE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
