"""`python -m tenantstore.tenants`: inspect a tenant's secrets, re-enter one.

    python -m tenantstore.tenants show TENANT_ID [--json]
    python -m tenantstore.tenants set-secret TENANT_ID COLUMN [--no-confirm] [--allow-empty]
    python -m tenantstore.tenants set-secret TENANT_ID COLUMN --clear

`show` prints the tenant with every secret masked and its state: absent,
plaintext, encrypted (under which key id, primary or previous), or
undecryptable. Without `ENCRYPTION_KEY` it still runs: tokens show as
`encrypted (key unknown)` (an undecryptable one cannot be told apart) and a
note on stderr says the key is not set.

`set-secret` never takes the value as an argument, where `ps` and shell
history would show it: on a terminal it asks twice at a hidden prompt
(`--no-confirm`: once), otherwise it reads stdin to its end and drops one
trailing line break. It reads the stored value before asking and writes
with compare-and-swap, so if the application changes the secret while the
operator types, nothing is written and the command says to run it again.
It needs the keys (`ENCRYPTION_KEY`, or the HSM with
`TENANTSTORE_KEY_PROVIDER=pkcs11`). It prints what it did, never the value
or token. The write or clear is an audit event by `operator:<user name>`,
written to `tenantstore_audit` once migration 0006 has made it, and the key
it used is recorded in `tenantstore_keys`.

Exit codes: 0 success; 1 the tenant does not exist, the secret changed
meanwhile, or the database failed; 2 usage or configuration error (an
unknown column, a refused value, entries that differ, a missing or invalid
key), with nothing changed; 130 interrupted, nothing written.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import sys
from collections.abc import Sequence

from .._cli import run_command
from ..audit import AuditLog, audit_actor
from ..audit.pg import PostgresSink, audit_table_exists
from ..db import create_pool, embedded_database_url, resolve_database_url
from ..encryption import KeyRing
from ..errors import ConfigurationError, EncryptionKeyMissingError
from ..keys.envelope import keyring_from_env
from ..models import TENANTS
from ..repository import validate_tenant_id
from . import (
    SecretInputError,
    SecretWritten,
    TenantView,
    check_secret_column,
    read_secret_value,
    set_secret,
    show_tenant,
    stored_secret,
)

__all__ = ["main"]

logger = logging.getLogger("tenantstore")

_SETTINGS = {"application_name": "tenantstore-tenants"}


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--database-url",
        metavar="URL",
        help="PostgreSQL URL (overrides DATABASE_URL; unset: the embedded development server)",
    )
    parser = argparse.ArgumentParser(
        prog="python -m tenantstore.tenants",
        description="Inspect a tenant's secrets and re-enter one.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser(
        "show",
        parents=[common],
        help="print a tenant with every secret masked and its state",
    )
    show.add_argument("tenant_id", metavar="TENANT_ID")
    show.add_argument("--json", action="store_true", help="print the tenant as JSON")
    # No argument of set-secret takes the secret: it comes from a prompt or stdin.
    set_ = commands.add_parser(
        "set-secret",
        parents=[common],
        help="re-enter one secret: a hidden prompt on a terminal, else stdin",
        description="Re-enter one secret of a tenant. The value is never an argument (ps and "
        "shell history would show it): on a terminal it is asked for twice at a hidden prompt, "
        "otherwise stdin is read to its end and one trailing line break dropped. It is "
        "encrypted under ENCRYPTION_KEY and written only if the stored value has not changed "
        "since it was read.",
    )
    set_.add_argument("tenant_id", metavar="TENANT_ID")
    set_.add_argument("column", metavar="COLUMN", help=f"one of: {', '.join(TENANTS.secrets)}")
    set_.add_argument(
        "--clear", action="store_true", help="store NULL (no secret) instead of reading a value"
    )
    set_.add_argument(
        "--no-confirm", action="store_true", help="on a terminal, ask for the value once"
    )
    set_.add_argument(
        "--allow-empty", action="store_true", help="accept an empty value (stored encrypted)"
    )
    return parser


async def _show(url: str, tenant_id: str) -> tuple[TenantView, bool]:
    pool = await create_pool(url, min_size=0, max_size=1, server_settings=_SETTINGS)
    try:
        try:
            keyring: KeyRing | None = await keyring_from_env(pool)
        except EncryptionKeyMissingError:
            keyring = None  # show still works: tokens are "encrypted (key unknown)"
        return await show_tenant(pool, tenant_id, keyring), keyring is not None
    finally:
        await pool.close()


async def _prepare(url: str, tenant_id: str, column: str) -> tuple[KeyRing, str | None]:
    """The key ring (either mode) and the stored value, before anyone types a secret."""
    pool = await create_pool(url, min_size=0, max_size=1, server_settings=_SETTINGS)
    try:
        keyring = await keyring_from_env(pool)
        return keyring, await stored_secret(pool, tenant_id, column)
    finally:
        await pool.close()


async def _write(
    url: str, keyring: KeyRing, tenant_id: str, column: str, value: str | None,
    expected: str | None,
) -> SecretWritten:  # fmt: skip
    pool = await create_pool(url, min_size=0, max_size=2, server_settings=_SETTINGS)
    try:
        # An operator's change is what an audit log is for: into tenantstore_audit when
        # migration 0006 made it, else the `tenantstore.audit` logger.
        audit = AuditLog(PostgresSink(pool)) if await audit_table_exists(pool) else AuditLog()
        try:
            with audit_actor(_actor()):
                return await set_secret(
                    pool, keyring, tenant_id, column, value, expected=expected, audit=audit
                )
        finally:
            await audit.aclose()
    finally:
        await pool.close()


def _actor() -> str:
    try:
        return f"operator:{getpass.getuser()}"
    except (KeyError, OSError):  # no user name for this uid (a bare container)
        return "operator"


def _database_url(args: argparse.Namespace) -> str:
    url = resolve_database_url(args.database_url)
    return url if url is not None else embedded_database_url()


def _run(args: argparse.Namespace) -> int:
    validate_tenant_id(args.tenant_id)
    if args.command == "show":
        view, keys_configured = asyncio.run(_show(_database_url(args), args.tenant_id))
        if args.json:
            print(json.dumps(view.to_dict()))
        else:
            print("\n".join(view.lines()))
        if not keys_configured:
            print(
                "note: ENCRYPTION_KEY not set: which key made each token is not checked "
                "(shown as `encrypted (key unknown)`; an undecryptable one looks the same)",
                file=sys.stderr,
            )
        return 0

    check_secret_column(args.column)
    if args.clear and (args.allow_empty or args.no_confirm):
        raise ConfigurationError("--clear reads no value: drop --allow-empty and --no-confirm")
    url = _database_url(args)
    # Keys and stored value before asking: a missing key or tenant fails before
    # anyone types a secret, and the compare-and-swap covers the time spent typing.
    # The prompt runs outside any event loop, so Ctrl-C ends it and getpass
    # restores the terminal.
    ring, expected = asyncio.run(_prepare(url, args.tenant_id, args.column))
    value: str | None = None
    if not args.clear:
        if sys.stdin is None:
            raise SecretInputError("no stdin to read the value from")
        value = read_secret_value(
            args.tenant_id,
            args.column,
            stdin=sys.stdin,
            stderr=sys.stderr,
            confirm=not args.no_confirm,
            allow_empty=args.allow_empty,
        )
    written = asyncio.run(_write(url, ring, args.tenant_id, args.column, value, expected))
    print(written.summary())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the tenants CLI and return its exit code (0 ok, 1 failed, 2 usage/configuration)."""
    args, unexpected = _parser().parse_known_args(argv)
    if unexpected:
        # Not echoed: a stray argument here is most likely a secret typed on the command line.
        print(
            f"error: {len(unexpected)} unexpected argument(s), not shown. A secret is never "
            "given on the command line: set-secret reads it from a hidden prompt or stdin.",
            file=sys.stderr,
        )
        return 2
    return run_command(
        lambda: _run(args),
        level=logging.WARNING,
        hide="tenantstore.audit",
        interrupted=f"{args.command} stopped; nothing was written.",
    )


if __name__ == "__main__":
    sys.exit(main())
