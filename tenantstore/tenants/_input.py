"""The new value of a secret, from a hidden terminal prompt or stdin, never the command line."""

from __future__ import annotations

import getpass
from typing import Final, TextIO

from ..errors import ConfigurationError, describe_driver_error, printable
from ..models import TENANTS

__all__ = ["MAX_SECRET_BYTES", "SecretInputError", "parse_piped_value", "read_secret_value"]

MAX_SECRET_BYTES: Final = 65_536
"""The longest value `set-secret` accepts on stdin: more is a wrong file piped in."""


class SecretInputError(ConfigurationError):
    """The value given for a secret is refused (empty, NUL, not UTF-8, entries differ, ...).

    The message says why, never what the value is.
    """


def parse_piped_value(data: bytes, *, allow_empty: bool = False) -> str:
    """The secret in what was piped to stdin.

    Exactly one trailing line break (`\\n` or `\\r\\n`) is removed, as
    `echo` and editors add one; every other character, whitespace
    included, is part of the value.

    Args:
        data: everything read from stdin.
        allow_empty: accept an empty value (stored as a token of `""`).

    Returns:
        The value.

    Raises:
        SecretInputError: more than `MAX_SECRET_BYTES`, not UTF-8, a NUL
            character, or empty without `allow_empty`.
    """
    if len(data) > MAX_SECRET_BYTES:
        raise SecretInputError(
            f"stdin holds more than {MAX_SECRET_BYTES} bytes: not a secret (a wrong file?)"
        )
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    try:
        value = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SecretInputError("the value on stdin is not valid UTF-8") from None
    return _check_value(value, allow_empty=allow_empty, where="on stdin")


def _check_value(value: str, *, allow_empty: bool, where: str) -> str:
    if "\x00" in value:
        raise SecretInputError(
            f"the value {where} holds a NUL character, which PostgreSQL text cannot hold"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise SecretInputError(f"the value {where} is not valid unicode") from None
    if not value and not allow_empty:
        raise SecretInputError(
            f"the value {where} is empty (pass --allow-empty to store an empty secret, "
            "or --clear to remove it)"
        )
    return value


def read_secret_value(
    tenant_id: str,
    column: str,
    *,
    stdin: TextIO,
    stderr: TextIO,
    confirm: bool = True,
    allow_empty: bool = False,
) -> str:
    """Read a new secret: a hidden prompt on a terminal, else everything on stdin.

    On a terminal the value is read with `getpass` (no echo), the prompt on
    `stderr` naming the tenant and the column's label; with `confirm` it is
    asked twice and both entries must match. Otherwise stdin is read to its
    end (see `parse_piped_value`). Blocking: call it outside the event loop,
    so Ctrl-C interrupts the prompt and `getpass` restores the terminal.

    Args:
        tenant_id: the tenant, for the prompt.
        column: the secret column, for the prompt's label.
        stdin: where the value comes from.
        stderr: where the prompts go.
        confirm: on a terminal, ask twice.
        allow_empty: accept an empty value.

    Returns:
        The value.

    Raises:
        SecretInputError: the value is refused, the entries differ, or the
            input ended before a value.
    """
    if not stdin.isatty():
        try:
            data = stdin.buffer.read(MAX_SECRET_BYTES + 1)
        except OSError as exc:
            raise SecretInputError(f"cannot read stdin: {describe_driver_error(exc)}") from None
        return parse_piped_value(data, allow_empty=allow_empty)
    what = f"{TENANTS.label(column)} for tenant {printable(tenant_id)}"
    try:
        value = getpass.getpass(f"New {what}: ", stream=stderr)
        _check_value(value, allow_empty=allow_empty, where="entered")
        if confirm and getpass.getpass(f"Repeat the {what}: ", stream=stderr) != value:
            raise SecretInputError("the two entries differ; nothing was written")
    except EOFError:
        raise SecretInputError("the input ended before a value was entered") from None
    return value
