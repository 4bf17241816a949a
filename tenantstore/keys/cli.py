"""`python -m tenantstore.keys`: generate, list, check, retire keys; envelope data keys.

Exit codes, as the migration CLI's: 0 success; 1 a problem found (a key the
database uses is missing, a canary does not decrypt, secrets are still
under a key to retire) or the database failed; 2 usage or configuration
error (a bad key setting, a wrong PIN, an absent token or KEK), with nothing
changed; 130 interrupted. No command prints a key, a PIN or a secret, except
`generate` without `--write`, whose whole point is printing a new key.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

import anyio.to_thread

from .._cli import run_command
from ..config import load_settings, nonblank_setting
from ..db import create_pool, embedded_database_url, resolve_database_url
from ..encryption import ENCRYPTION_KEY, OLD_ENCRYPTION_KEY, KeyRing, generate_encryption_key
from ..errors import ConfigurationError, TenantStoreError, printable
from . import pkcs11 as _pkcs11_settings
from .check import DEFAULT_SAMPLE, check_keys
from .envelope import env_keys, import_keys, keyring_from_env, new_data_key, rewrap
from .files import BACKUP_ADVICE, append_key, rotate_key_file
from .providers import KeyProvider, provider_from_env, provider_name
from .store import KnownKey, Q, check_key_id, keys_table_exists, list_known_keys

__all__ = ["main"]

_T = TypeVar("_T")

logger = logging.getLogger("tenantstore")


class _Refused(TenantStoreError):
    """A command found a problem and changed nothing (exit 1)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tenantstore.keys", description="Manage tenantstore encryption keys."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    database = argparse.ArgumentParser(add_help=False)
    database.add_argument(
        "--database-url",
        metavar="URL",
        help="PostgreSQL URL (overrides DATABASE_URL; unset: the embedded development server)",
    )
    _generate_parser(commands)
    listing = commands.add_parser(
        "list",
        parents=[database],
        help="show the configured key ids and the keys the database knows",
        description=(
            "Show the id and role (primary/previous) of each configured key and, when a "
            "database is configured (--database-url or DATABASE_URL; always in pkcs11 mode), "
            "each key id the database knows: state, first and last use, wrapping KEK. "
            "Never a key."
        ),
    )
    listing.set_defaults(handler=_list)
    check = commands.add_parser(
        "check",
        parents=[database],
        help="check the keys against the database (exit 1 on a problem)",
        description=(
            "Fail (exit 1) when the database uses a key this configuration lacks or a "
            "sampled stored secret does not decrypt; show which KEK wraps each data key."
        ),
    )
    check.add_argument(
        "--sample",
        type=int,
        default=DEFAULT_SAMPLE,
        metavar="N",
        help=f"stored secrets canary-decrypted per column (default {DEFAULT_SAMPLE})",
    )
    check.set_defaults(handler=_check)
    new = commands.add_parser(
        "new-data-key",
        parents=[database],
        help="envelope mode: make a wrapped data key the new primary; prints its id",
        description=(
            "Make a Fernet data key, wrap it with the KEK of TENANTSTORE_KEY_PROVIDER and "
            "store it in tenantstore_keys as the new primary (the previous primary stays for "
            "decryption). Then restart the application and run `migrate rotate`."
        ),
    )
    new.set_defaults(handler=_new_data_key)
    imported = commands.add_parser(
        "import",
        parents=[database],
        help="envelope mode: wrap the keys of ENCRYPTION_KEY(S) and store them",
        description=(
            "Wrap the plain keys configured in ENCRYPTION_KEYS (or ENCRYPTION_KEY and "
            "OLD_ENCRYPTION_KEY) with the KEK and store them, the primary as primary: a "
            "deployment moving to envelope mode keeps reading what they encrypted."
        ),
    )
    imported.set_defaults(handler=_import)
    move = commands.add_parser(
        "rewrap",
        parents=[database],
        help="envelope mode: move every data key to another KEK (no secret row is touched)",
        description=(
            "Unwrap every data key with the configured KEK and wrap it with KEK LABEL of the "
            "same token, one key per transaction. Resumable: a rerun skips the keys already "
            "moved. Afterwards set TENANTSTORE_PKCS11_KEK=LABEL."
        ),
    )
    move.add_argument(
        "--to-kek", required=True, metavar="LABEL", help="label of the new KEK in the same token"
    )
    move.set_defaults(handler=_rewrap)
    retire = commands.add_parser(
        "retire",
        parents=[database],
        help="mark a key retired once no secret is under it (exit 1 otherwise)",
        description=(
            "Count the tenants' secrets per key (as `migrate verify`) and mark KEY_ID retired "
            "in tenantstore_keys only when none is under it and every secret decrypts."
        ),
    )
    retire.add_argument("key_id", metavar="KEY_ID", help="the key id to retire (see `list`)")
    retire.set_defaults(handler=_retire)
    return parser


def _generate_parser(commands: Any) -> None:
    generate = commands.add_parser(
        "generate",
        help="make a new Fernet key: print it, or write it to an env file",
        description=(
            "Make a new Fernet key. Without --write, print ENCRYPTION_KEY=<key> on stdout. "
            "With --write, the key goes only to the file; the file must be a regular file "
            "(not a symlink) that only its owner can access, or not exist yet (it is then "
            "created with mode 0600)."
        ),
    )
    generate.add_argument(
        "--write",
        metavar="PATH",
        help=(
            "add ENCRYPTION_KEY=<key> to this env file instead of printing the key: create "
            "it with mode 0600, or append to it; refuses a file that already sets "
            "ENCRYPTION_KEY, a symlink, and a file group or others can access"
        ),
    )
    mode = generate.add_mutually_exclusive_group()
    mode.add_argument(
        "--if-missing",
        action="store_true",
        help="with --write: do nothing (exit 0) when the file already sets ENCRYPTION_KEY",
    )
    mode.add_argument(
        "--rotate",
        action="store_true",
        help=(
            "with --write: move the file's ENCRYPTION_KEY to the front of OLD_ENCRYPTION_KEY "
            "and write the new key as ENCRYPTION_KEY, keeping every other line; the file is "
            "replaced atomically"
        ),
    )
    generate.set_defaults(handler=None)


def _generate(args: argparse.Namespace) -> int:
    key = generate_encryption_key()
    if args.write is None:
        print(f"{ENCRYPTION_KEY}={key}")
        print(BACKUP_ADVICE, file=sys.stderr)
        return 0
    if args.rotate:
        rotate_key_file(args.write, key)
        print(
            f"Moved the previous {ENCRYPTION_KEY} to {OLD_ENCRYPTION_KEY} and wrote a new "
            f"{ENCRYPTION_KEY} to {args.write}. {BACKUP_ADVICE} Deploy both keys, then "
            "re-encrypt with `python -m tenantstore.migrate rotate`.",
            file=sys.stderr,
        )
        return 0
    if not append_key(args.write, key, if_missing=args.if_missing):
        print(f"{args.write} already sets {ENCRYPTION_KEY}; keeping it.", file=sys.stderr)
        return 0
    print(f"Wrote a new {ENCRYPTION_KEY} to {args.write}. {BACKUP_ADVICE}", file=sys.stderr)
    return 0


# -- commands over a database ------------------------------------------------------


async def _with_pool(
    args: argparse.Namespace, work: Callable[[Any], Coroutine[Any, Any, _T]]
) -> _T:
    url = resolve_database_url(args.database_url)
    if url is None:
        url = await anyio.to_thread.run_sync(embedded_database_url)
    pool = await create_pool(
        url, min_size=0, max_size=2, server_settings={"application_name": "tenantstore-keys"}
    )
    try:
        return await work(pool)
    finally:
        await pool.close()


def _known_line(known: KnownKey) -> str:
    used = "never used"
    if known.first_used_at is not None and known.last_used_at is not None:
        first, last = known.first_used_at, known.last_used_at
        used = f"first used {first:%Y-%m-%d %H:%M}, last {last:%Y-%m-%d %H:%M}"
    line = f"  {printable(known.key_id)}  {known.state:<12}  {used}"
    if known.wrapped_by is not None:
        line += f"  wrapped by {printable(known.wrapped_by)}"
    return line


async def _list(args: argparse.Namespace) -> int:
    settings = load_settings(None, [".env.secrets"])
    envelope = provider_name(settings) != "env"
    if envelope:
        token = nonblank_setting(settings, _pkcs11_settings.TOKEN)
        kek = nonblank_setting(settings, _pkcs11_settings.KEK)
        if token is None or kek is None:
            raise ConfigurationError(
                f"{_pkcs11_settings.TOKEN} and {_pkcs11_settings.KEK} must be set in pkcs11 mode"
            )
        print(f"provider pkcs11: KEK pkcs11:token={token};key={kek} (data keys below)")
    else:
        from ..config import configured_keys

        KeyRing.from_env()  # every key must load before any is listed
        print("configured keys:")
        for index, (key, setting) in enumerate(configured_keys(settings)):
            role = "primary" if index == 0 else "previous"
            print(f"  {KeyRing(key).primary_key_id}  {role:<8}  {setting}")
    if not envelope and resolve_database_url(args.database_url) is None:
        return 0

    async def show(pool: Any) -> int:
        if not await keys_table_exists(pool):
            print(
                "database: tenantstore_keys does not exist (run `python -m tenantstore.migrate up`)"
            )
            return 0
        known = await list_known_keys(pool)
        print("database keys:" if known else "database keys: none recorded yet")
        for row in known:
            print(_known_line(row))
        return 0

    return await _with_pool(args, show)


async def _check(args: argparse.Namespace) -> int:
    if args.sample < 0:
        raise ConfigurationError("--sample must be zero or greater")

    async def run(pool: Any) -> int:
        keyring = await keyring_from_env(pool)
        from .check import KeyCheckError

        try:
            report = await check_keys(pool, keyring, sample=args.sample)
        except KeyCheckError as exc:
            print("\n".join(exc.report.lines()))
            return 1
        print("\n".join(report.lines()))
        return 0

    return await _with_pool(args, run)


def _provider(command: str) -> KeyProvider:
    provider = provider_from_env()
    if provider is None:
        raise ConfigurationError(
            f"`{command}` needs a KEK: set TENANTSTORE_KEY_PROVIDER=pkcs11 and its settings "
            "(in env mode, make a key with `python -m tenantstore.keys generate`)"
        )
    return provider


async def _new_data_key(args: argparse.Namespace) -> int:
    provider = await anyio.to_thread.run_sync(_provider, "new-data-key")
    try:
        kid = await _with_pool(args, lambda pool: new_data_key(pool, provider))
    finally:
        provider.close()
    print(kid)
    print(
        f"Data key {kid} is the new primary, wrapped by {printable(provider.kek_id)}. Restart "
        "the application, then re-encrypt with `python -m tenantstore.migrate rotate`.",
        file=sys.stderr,
    )
    return 0


async def _import(args: argparse.Namespace) -> int:
    KeyRing.from_env()  # every key must load before any is wrapped
    keys = env_keys(load_settings(None, [".env.secrets"]))
    provider = await anyio.to_thread.run_sync(_provider, "import")
    try:
        done = await _with_pool(args, lambda pool: import_keys(pool, provider, keys))
    finally:
        provider.close()
    for kid, stored in done:
        print(f"{kid}  {'stored' if stored else 'already stored'}")
    print(
        f"Wrapped by {printable(provider.kek_id)}. Remove {ENCRYPTION_KEY} (and the other key "
        "settings) from the environment before starting the application in pkcs11 mode.",
        file=sys.stderr,
    )
    return 0


async def _rewrap(args: argparse.Namespace) -> int:
    from .pkcs11 import Pkcs11Provider

    source = await anyio.to_thread.run_sync(_provider, "rewrap")
    try:
        if not isinstance(source, Pkcs11Provider):  # pragma: no cover - one provider today
            raise ConfigurationError("rewrap --to-kek needs the pkcs11 provider")
        target = await anyio.to_thread.run_sync(source.with_kek, args.to_kek)
        report = await _with_pool(
            args, lambda pool: rewrap(pool, source, target, progress=logger.info)
        )
    finally:
        source.close()
    print(report.summary())
    return 0


async def _retire(args: argparse.Namespace) -> int:
    try:
        kid = check_key_id(args.key_id)
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None

    async def run(pool: Any) -> int:
        from ..migrate import verify_secrets

        keyring = await keyring_from_env(pool)
        if kid == keyring.primary_key_id:
            raise _Refused(f"key {kid} is this configuration's primary key: it cannot retire")
        report = await verify_secrets(pool, keyring)
        under = report.keys.get(kid, 0)
        if under:
            counts = ", ".join(
                f"{printable(name)} {c.keys[kid]}"
                for name, c in report.columns.items()
                if c.keys[kid]
            )
            raise _Refused(
                f"{under} secrets are still under key {kid} ({counts}): run "
                "`python -m tenantstore.migrate rotate`, then retire it"
            )
        if report.failed:
            raise _Refused(
                f"{report.failed} secrets decrypt with no configured key: any of them may be "
                f"under key {kid}; fix them first (`migrate verify --json` lists them)"
            )
        async with pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(Q["key_state"].sql, kid)
            if row is not None and row["state"] == "primary":
                raise _Refused(f"the database records key {kid} as primary: it cannot retire")
            if row is None and kid not in keyring.key_ids:
                raise _Refused(
                    f"key {kid} is neither configured nor recorded in tenantstore_keys: "
                    "check the id (`python -m tenantstore.keys list`)"
                )
            await conn.execute(Q["retire_key"].sql, kid)
        print(f"Key {kid} is retired: no secret of {report.table} is under it.")
        return 0

    return await _with_pool(args, run)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the key CLI; return the process exit code (see the module docstring)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "generate":
        if args.if_missing and args.write is None:
            parser.error("--if-missing needs --write PATH")
        if args.rotate and args.write is None:
            parser.error("--rotate needs --write PATH")

    def body() -> int:
        if args.handler is None:
            return _generate(args)
        code: int = asyncio.run(args.handler(args))
        return code

    return run_command(body, interrupted=f"{args.command} stopped; run it again to resume.")
