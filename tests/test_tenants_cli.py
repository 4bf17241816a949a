"""`python -m tenantstore.tenants`: show a tenant's secret states, re-enter one secret.

Against a real PostgreSQL; stdin and terminal input through real subprocesses
(a pipe, and a pseudo-terminal for the hidden prompt).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest
from cryptography.fernet import Fernet

from tenantstore import KeyRing, TenantNotFoundError
from tenantstore.audit import AuditLog
from tenantstore.audit.pg import PostgresSink
from tenantstore.encryption import key_id
from tenantstore.migrate import upgrade
from tenantstore.tenants import (
    MASK,
    MAX_SECRET_BYTES,
    SecretChangedError,
    SecretInputError,
    parse_piped_value,
    set_secret,
    stored_secret,
)
from tenantstore.tenants.__main__ import _parser, main

COLUMNS = ("gemini_api_key", "oauth_access_token", "oauth_refresh_token", "webhook_signing_secret")


@pytest.fixture
async def schema(pool: asyncpg.Pool, key: str) -> asyncpg.Pool:
    """The full schema, applied as `migrate up` does."""
    await upgrade(pool, KeyRing(key))
    return pool


async def add_tenant(pool: asyncpg.Pool, tenant_id: str, **stored: str | None) -> None:
    """Insert a tenant with secret columns holding exactly `stored` (tokens or not)."""
    values = [stored.get(column) for column in COLUMNS]
    await pool.execute(
        "INSERT INTO tenants (tenant_id, name, gemini_api_key, oauth_access_token, "
        "oauth_refresh_token, webhook_signing_secret) VALUES ($1, 'Acme Corp', $2, $3, $4, $5)",
        tenant_id,
        *values,
    )


async def stored(pool: asyncpg.Pool, tenant_id: str, column: str) -> str | None:
    value: str | None = await pool.fetchval(
        f"SELECT {column} FROM tenants WHERE tenant_id = $1",
        tenant_id,
    )
    return value


def command(*args: str, url: str) -> list[str]:
    return [sys.executable, "-m", "tenantstore.tenants", *args, "--database-url", url]


async def run_piped(
    args: list[str], stdin: bytes, key: str | None, cwd: Path
) -> subprocess.CompletedProcess[bytes]:
    """Run the CLI in a process of its own with `stdin` piped in."""
    env = dict(os.environ)
    if key is not None:
        env["ENCRYPTION_KEY"] = key
    return await asyncio.to_thread(
        subprocess.run, args, input=stdin, capture_output=True, env=env, cwd=cwd, timeout=60
    )


class Terminal:
    """The CLI on a pseudo-terminal (stdin, stdout and stderr), typed at like a person.

    The child starts a session of its own, so it never reaches the terminal
    pytest runs in: getpass then turns off echo on stdin's terminal, the pty.
    """

    def __init__(self, args: list[str], key: str, cwd: Path) -> None:
        controller, terminal = os.openpty()
        self.proc = subprocess.Popen(
            args,
            stdin=terminal,
            stdout=terminal,
            stderr=terminal,
            env={**os.environ, "ENCRYPTION_KEY": key},
            cwd=cwd,
            start_new_session=True,
        )
        os.close(terminal)
        self.fd = controller
        self.screen = b""
        self.seen = 0

    def _read(self) -> bool:
        """Read what the child wrote; False at the end (EIO once it closed the terminal)."""
        ready, _, _ = select.select([self.fd], [], [], 60)  # a hang guard, not a timing check
        if not ready:
            raise AssertionError(f"the CLI wrote nothing for 60 s; screen so far: {self.screen!r}")
        try:
            chunk = os.read(self.fd, 65536)
        except OSError:
            return False
        self.screen += chunk
        return bool(chunk)

    def expect(self, text: str) -> None:
        """Wait until `text` appears on the screen after what was already expected."""
        wanted = text.encode()
        while (at := self.screen.find(wanted, self.seen)) < 0:
            if not self._read():
                raise AssertionError(f"{text!r} never appeared; screen: {self.screen!r}")
        self.seen = at + len(wanted)

    def type(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def finish(self) -> tuple[int, str]:
        """Read to the end; return the exit code and everything the terminal showed."""
        while self._read():
            pass
        os.close(self.fd)
        return self.proc.wait(timeout=60), self.screen.decode(errors="replace")


# -- set-secret: the value from stdin ----------------------------------------------------


async def test_piped_value_is_encrypted_under_the_primary_key_and_never_printed(
    database_url: str, schema: asyncpg.Pool, key: str, tmp_path: Path
) -> None:
    """stdin's value (one line break dropped) is stored as a token of it; output names the key."""
    await add_tenant(schema, "acme", gemini_api_key="AIza-old-plaintext")
    before = await schema.fetchval("SELECT updated_at FROM tenants WHERE tenant_id = 'acme'")
    secret = "AIza-piped-secret-value-123"
    result = await run_piped(
        command("set-secret", "acme", "gemini_api_key", url=database_url),
        f"{secret}\n".encode(),
        key,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    token = await stored(schema, "acme", "gemini_api_key")
    assert token is not None and KeyRing(key).decrypt_with_key_index(token) == (secret, 0)
    assert result.stdout.decode() == (
        f"Set gemini_api_key for tenant acme (encrypted under key {key_id(key)})\n"
    )
    shown = result.stdout + result.stderr
    assert secret.encode() not in shown and token.encode() not in shown
    assert b"AIza-old-plaintext" not in shown
    after = await schema.fetchval("SELECT updated_at FROM tenants WHERE tenant_id = 'acme'")
    assert after >= before


async def test_set_secret_is_audited_and_records_its_key(
    database_url: str, schema: asyncpg.Pool, key: str, tmp_path: Path
) -> None:
    """An operator's re-entry lands in tenantstore_audit, by operator:<user>, never the value."""
    await add_tenant(schema, "acme")
    secret = "AIza-audited-operator-entry"
    result = await run_piped(
        command("set-secret", "acme", "gemini_api_key", url=database_url),
        f"{secret}\n".encode(),
        key,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    cleared = await run_piped(
        command("set-secret", "acme", "gemini_api_key", "--clear", url=database_url),
        b"",
        key,
        tmp_path,
    )
    assert cleared.returncode == 0, cleared.stderr
    rows = await schema.fetch(
        "SELECT operation, column_name, row_key, key_id, outcome, actor FROM tenantstore_audit "
        "ORDER BY id"
    )
    assert [
        (r["operation"], r["column_name"], r["row_key"], r["key_id"], r["outcome"]) for r in rows
    ] == [
        ("write", "gemini_api_key", "acme", key_id(key), "ok"),
        ("clear", "gemini_api_key", "acme", None, "ok"),
    ]
    assert all(r["actor"].startswith("operator") for r in rows)
    everything = await schema.fetchval("SELECT string_agg(t::text, ' ') FROM tenantstore_audit t")
    assert secret not in everything
    recorded = await schema.fetchval(
        "SELECT last_used_at FROM tenantstore_keys WHERE key_id = $1", key_id(key)
    )
    assert recorded is not None
    # A refused compare-and-swap is audited too, with its outcome.
    ring = KeyRing(key)
    audit = AuditLog(PostgresSink(schema))
    with pytest.raises(SecretChangedError):
        await set_secret(schema, ring, "acme", "gemini_api_key", "v", expected="stale", audit=audit)
    await audit.aclose()
    last = await schema.fetchrow(
        "SELECT operation, outcome FROM tenantstore_audit ORDER BY id DESC LIMIT 1"
    )
    assert (last["operation"], last["outcome"]) == ("write", "changed")


async def test_piped_value_keeps_its_whitespace_but_one_trailing_crlf(
    database_url: str, schema: asyncpg.Pool, key: str, tmp_path: Path
) -> None:
    """Through the process boundary: leading, inner and trailing spaces and tabs are kept."""
    await add_tenant(schema, "acme")
    result = await run_piped(
        command("set-secret", "acme", "webhook_signing_secret", url=database_url),
        b"  two words\t \r\n",
        key,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    token = await stored(schema, "acme", "webhook_signing_secret")
    assert token is not None and KeyRing(key).decrypt(token) == "  two words\t "


@pytest.mark.parametrize(
    ("piped", "value"),
    [
        (b"v", "v"),
        (b"v\n", "v"),
        (b"v\r\n", "v"),
        (b"v\n\n", "v\n"),  # exactly one line break goes
        (b"v\r", "v\r"),  # a lone CR is not a line break here
        (b" \tv w\t \n", " \tv w\t "),
        ("pässwörd\n".encode(), "pässwörd"),
    ],
)
def test_parse_piped_value_drops_exactly_one_trailing_line_break(piped: bytes, value: str) -> None:
    assert parse_piped_value(piped) == value


@pytest.mark.parametrize(
    ("piped", "reason"),
    [
        (b"", "is empty"),
        (b"\n", "is empty"),
        (b"AIza\x00secret", "NUL"),
        (b"AIza\xffsecret", "not valid UTF-8"),
        (b"A" * (MAX_SECRET_BYTES + 1), "more than"),
    ],
)
def test_parse_piped_value_refuses_empty_nul_non_utf8_and_huge_input(
    piped: bytes, reason: str
) -> None:
    """Each refusal says why in words that quote none of the value."""
    with pytest.raises(SecretInputError, match=reason) as info:
        parse_piped_value(piped)
    assert "AIza" not in str(info.value) and "AAAA" not in str(info.value)


def test_parse_piped_value_accepts_empty_only_when_allowed() -> None:
    assert parse_piped_value(b"\n", allow_empty=True) == ""


async def test_refused_piped_values_exit_2_and_write_nothing(
    database_url: str, schema: asyncpg.Pool, key: str, tmp_path: Path
) -> None:
    await add_tenant(schema, "acme", gemini_api_key="AIza-kept")
    args = command("set-secret", "acme", "gemini_api_key", url=database_url)
    for piped in (b"\n", b"AIza-with\x00nul\n"):
        result = await run_piped(args, piped, key, tmp_path)
        assert result.returncode == 2
        assert b"AIza-with" not in result.stdout + result.stderr
    assert await stored(schema, "acme", "gemini_api_key") == "AIza-kept"
    allowed = await run_piped([*args, "--allow-empty"], b"\n", key, tmp_path)
    assert allowed.returncode == 0, allowed.stderr
    token = await stored(schema, "acme", "gemini_api_key")
    assert token is not None and KeyRing(key).decrypt(token) == ""  # a token, not NULL or ""


# -- set-secret: the hidden prompt -------------------------------------------------------


async def test_terminal_prompt_asks_twice_without_echo_and_stores_the_value(
    database_url: str, schema: asyncpg.Pool, key: str, tmp_path: Path
) -> None:
    """On a terminal: two hidden prompts naming tenant and label; the value never shows."""
    await add_tenant(schema, "acme")
    secret = "pty-Secret-value-4242"

    def session() -> tuple[int, str]:
        terminal = Terminal(
            command("set-secret", "acme", "oauth_access_token", url=database_url), key, tmp_path
        )
        terminal.expect("New oauth_access_token for tenant acme: ")
        terminal.type(f"{secret}\n")
        terminal.expect("Repeat the oauth_access_token for tenant acme: ")
        terminal.type(f"{secret}\n")
        return terminal.finish()

    code, screen = await asyncio.to_thread(session)
    assert code == 0, screen
    assert secret not in screen  # not echoed, not printed
    assert f"Set oauth_access_token for tenant acme (encrypted under key {key_id(key)})" in screen
    token = await stored(schema, "acme", "oauth_access_token")
    assert token is not None and KeyRing(key).decrypt(token) == secret
    assert token not in screen


async def test_terminal_entries_that_differ_exit_2_and_write_nothing(
    database_url: str, schema: asyncpg.Pool, key: str, tmp_path: Path
) -> None:
    await add_tenant(schema, "acme", oauth_access_token="AIza-kept")

    def session() -> tuple[int, str]:
        terminal = Terminal(
            command("set-secret", "acme", "oauth_access_token", url=database_url), key, tmp_path
        )
        terminal.expect("New oauth_access_token for tenant acme: ")
        terminal.type("first-entry-value\n")
        terminal.expect("Repeat the oauth_access_token for tenant acme: ")
        terminal.type("second-entry-value\n")
        return terminal.finish()

    code, screen = await asyncio.to_thread(session)
    assert code == 2
    assert "the two entries differ; nothing was written" in screen
    assert "entry-value" not in screen
    assert await stored(schema, "acme", "oauth_access_token") == "AIza-kept"


async def test_no_confirm_asks_once(
    database_url: str, schema: asyncpg.Pool, key: str, tmp_path: Path
) -> None:
    await add_tenant(schema, "acme")

    def session() -> tuple[int, str]:
        args = command("set-secret", "acme", "gemini_api_key", "--no-confirm", url=database_url)
        terminal = Terminal(args, key, tmp_path)
        terminal.expect("New Gemini API key for tenant acme: ")
        terminal.type("typed-once-value\n")
        return terminal.finish()

    code, screen = await asyncio.to_thread(session)
    assert code == 0, screen
    assert "Repeat" not in screen and "typed-once-value" not in screen
    token = await stored(schema, "acme", "gemini_api_key")
    assert token is not None and KeyRing(key).decrypt(token) == "typed-once-value"


async def test_a_change_made_while_the_operator_types_is_kept_and_reported(
    database_url: str, schema: asyncpg.Pool, key: str, tmp_path: Path
) -> None:
    """CAS end to end: the CLI reads before prompting; a write during the prompt wins, exit 1."""
    await add_tenant(schema, "acme", oauth_refresh_token="AIza-before")
    terminal = Terminal(
        command("set-secret", "acme", "oauth_refresh_token", url=database_url), key, tmp_path
    )
    await asyncio.to_thread(terminal.expect, "New oauth_refresh_token for tenant acme: ")
    concurrent = KeyRing(key).encrypt("refreshed-by-the-application")
    await schema.execute(
        "UPDATE tenants SET oauth_refresh_token = $1 WHERE tenant_id = 'acme'", concurrent
    )
    terminal.type("operator-value\n")
    await asyncio.to_thread(terminal.expect, "Repeat the oauth_refresh_token for tenant acme: ")
    terminal.type("operator-value\n")
    code, screen = await asyncio.to_thread(terminal.finish)
    assert code == 1
    assert (
        "oauth_refresh_token of tenant acme was changed by another writer while this command "
        "ran; nothing was written: run the command again" in screen
    )
    assert await stored(schema, "acme", "oauth_refresh_token") == concurrent


async def test_interrupt_at_the_prompt_exits_130_and_writes_nothing(
    database_url: str, schema: asyncpg.Pool, key: str, tmp_path: Path
) -> None:
    """Ctrl-C (SIGINT) while the prompt waits: exit 130, the stored value is untouched."""
    await add_tenant(schema, "acme", gemini_api_key="AIza-kept")

    def session() -> tuple[int, str]:
        terminal = Terminal(
            command("set-secret", "acme", "gemini_api_key", url=database_url), key, tmp_path
        )
        terminal.expect("New Gemini API key for tenant acme: ")
        terminal.type("half-typ")
        terminal.proc.send_signal(signal.SIGINT)
        return terminal.finish()

    code, screen = await asyncio.to_thread(session)
    assert code == 130
    assert "interrupted: set-secret stopped; nothing was written." in screen
    assert "half-typ" not in screen
    assert await stored(schema, "acme", "gemini_api_key") == "AIza-kept"


# -- set-secret: the library's compare-and-swap ------------------------------------------


async def test_set_secret_with_a_stale_expected_value_writes_nothing(
    schema: asyncpg.Pool, key: str
) -> None:
    """The fault injected directly: `expected` no longer matches -> SecretChangedError."""
    ring = KeyRing(key)
    await add_tenant(schema, "acme", webhook_signing_secret="changed-meanwhile")
    with pytest.raises(SecretChangedError) as info:
        await set_secret(
            schema, ring, "acme", "webhook_signing_secret", "new-value", expected="read-earlier"
        )
    assert "new-value" not in str(info.value) and "changed-meanwhile" not in str(info.value)
    assert await stored(schema, "acme", "webhook_signing_secret") == "changed-meanwhile"


async def test_set_secret_swaps_when_expected_matches_including_null(
    schema: asyncpg.Pool, key: str
) -> None:
    ring = KeyRing(key)
    await add_tenant(schema, "acme")
    assert await stored_secret(schema, "acme", "gemini_api_key") is None
    written = await set_secret(schema, ring, "acme", "gemini_api_key", "first", expected=None)
    assert (written.column, written.key_id) == ("gemini_api_key", ring.primary_key_id)
    token = await stored_secret(schema, "acme", "gemini_api_key")
    assert token is not None and ring.decrypt(token) == "first"
    await set_secret(schema, ring, "acme", "gemini_api_key", "second", expected=token)
    with pytest.raises(SecretChangedError):  # the token read first is stale now
        await set_secret(schema, ring, "acme", "gemini_api_key", "third", expected=token)
    current = await stored(schema, "acme", "gemini_api_key")
    assert current is not None and ring.decrypt(current) == "second"
    await set_secret(schema, ring, "acme", "gemini_api_key", None)  # READ_CURRENT, then clear
    assert await stored(schema, "acme", "gemini_api_key") is None


async def test_set_secret_for_a_missing_tenant_is_not_found_not_a_conflict(
    schema: asyncpg.Pool, key: str
) -> None:
    ring = KeyRing(key)
    with pytest.raises(TenantNotFoundError):
        await set_secret(schema, ring, "ghost", "gemini_api_key", "v", expected=None)
    with pytest.raises(TenantNotFoundError):
        await stored_secret(schema, "ghost", "gemini_api_key")


# -- set-secret: refusals and --clear ----------------------------------------------------


async def test_unknown_column_exits_2_naming_the_secret_columns(
    key: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Checked before any I/O: no database is given, none is needed."""
    monkeypatch.setenv("ENCRYPTION_KEY", key)
    assert main(["set-secret", "acme", "name", "--clear"]) == 2
    err = capsys.readouterr().err
    assert "COLUMN is not a secret column of tenants" in err
    assert ", ".join(COLUMNS) in err


async def test_unknown_column_is_not_echoed(
    key: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A secret pasted where COLUMN goes is refused without coming back out."""
    monkeypatch.setenv("ENCRYPTION_KEY", key)
    pasted = "AIzaSy-pasted-into-the-column-slot"
    assert main(["set-secret", "acme", pasted, "--clear"]) == 2
    captured = capsys.readouterr()
    assert pasted not in captured.err + captured.out
    assert "is not a secret column" in captured.err


async def test_missing_tenant_exits_1_before_any_value_is_read(
    database_url: str, schema: asyncpg.Pool, key: str, tmp_path: Path
) -> None:
    result = await run_piped(
        command("set-secret", "ghost", "gemini_api_key", url=database_url),
        b"AIza-never-read\n",
        key,
        tmp_path,
    )
    assert result.returncode == 1
    assert result.stderr.decode().strip() == "error: Tenant ghost not found"
    show = await run_piped(command("show", "ghost", url=database_url), b"", key, tmp_path)
    assert show.returncode == 1 and b"Tenant ghost not found" in show.stderr


async def test_set_secret_without_encryption_key_exits_2_and_writes_nothing(
    database_url: str, schema: asyncpg.Pool, tmp_path: Path
) -> None:
    await add_tenant(schema, "acme", gemini_api_key="AIza-kept")
    result = await run_piped(
        command("set-secret", "acme", "gemini_api_key", url=database_url), b"v\n", None, tmp_path
    )
    assert result.returncode == 2
    assert b"ENCRYPTION_KEY environment variable not set" in result.stderr
    assert await stored(schema, "acme", "gemini_api_key") == "AIza-kept"


async def test_clear_stores_null_without_reading_a_value(
    database_url: str, schema: asyncpg.Pool, key: str, tmp_path: Path
) -> None:
    await add_tenant(schema, "acme", oauth_access_token=KeyRing(key).encrypt("old"))
    result = await run_piped(
        command("set-secret", "acme", "oauth_access_token", "--clear", url=database_url),
        b"AIza-ignored\n",
        key,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode() == "Cleared oauth_access_token for tenant acme\n"
    assert await stored(schema, "acme", "oauth_access_token") is None


def test_no_argument_of_set_secret_can_carry_the_secret() -> None:
    """By construction, nothing `ps` or shell history shows can be the value: the only
    arguments that take a value are the tenant id, the column and --database-url."""
    parser = _parser()
    (subparsers,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    set_secret_parser = subparsers.choices["set-secret"]
    takes_value = {action.dest for action in set_secret_parser._actions if action.nargs != 0}
    assert takes_value == {"tenant_id", "column", "database_url"}


@pytest.mark.parametrize(
    "extra", [["AIza-on-the-command-line"], ["--value=AIza-on-the-command-line"]]
)
def test_a_value_given_on_the_command_line_is_refused_and_not_echoed(
    extra: list[str], key: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.setenv("ENCRYPTION_KEY", key)
    assert main(["set-secret", "acme", "gemini_api_key", *extra]) == 2
    out = capsys.readouterr()
    assert "AIza" not in out.out + out.err
    assert "never given on the command line" in out.err


# -- show --------------------------------------------------------------------------------


@pytest.fixture
async def every_state(schema: asyncpg.Pool, key: str, old_key: str) -> dict[str, str]:
    """Two tenants whose eight secrets cover every state; returns the stored values."""
    values = {
        "plain": "AIza-plaintext-value",
        "primary": KeyRing(key).encrypt("primary-value"),
        "old": KeyRing(old_key).encrypt("old-value"),
        "foreign": KeyRing(Fernet.generate_key().decode()).encrypt("foreign-value"),
        "newline": KeyRing(key).encrypt("newline-value") + "\n",
    }
    await add_tenant(
        schema,
        "acme",
        gemini_api_key=None,
        oauth_access_token="",
        oauth_refresh_token=values["plain"],
        webhook_signing_secret=values["primary"],
    )
    await add_tenant(
        schema,
        "beta",
        gemini_api_key=values["old"],
        oauth_access_token=values["foreign"],
        oauth_refresh_token=values["newline"],
    )
    return values


def assert_nothing_revealed(text: str, values: dict[str, str]) -> None:
    for value in values.values():
        assert value.strip() not in text
    for plaintext in ("primary-value", "old-value", "foreign-value", "newline-value"):
        assert plaintext not in text


async def test_show_names_each_secrets_state_and_masks_it(
    database_url: str, every_state: dict[str, str], key: str, old_key: str,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """absent (NULL, ""), plaintext, primary, previous key, undecryptable, token + newline."""
    monkeypatch.setenv("ENCRYPTION_KEY", key)
    monkeypatch.setenv("OLD_ENCRYPTION_KEY", old_key)
    assert await asyncio.to_thread(main, ["show", "acme", "--database-url", database_url]) == 0
    acme = capsys.readouterr().out
    lines = acme.splitlines()
    assert lines[:2] == ["Tenant:  acme", "Name:    Acme Corp"]
    assert lines[2].startswith("Created: ") and lines[3].startswith("Updated: ")
    assert lines[4:] == [
        "Secrets:",
        "  gemini_api_key (Gemini API key): absent",
        "  oauth_access_token: absent",
        f"  oauth_refresh_token: {MASK}  plaintext",
        f"  webhook_signing_secret: {MASK}  encrypted (key {key_id(key)}, primary)",
    ]
    assert await asyncio.to_thread(main, ["show", "beta", "--database-url", database_url]) == 0
    beta = capsys.readouterr().out
    assert beta.splitlines()[5:] == [
        f"  gemini_api_key (Gemini API key): {MASK}  encrypted (key {key_id(old_key)}, previous)",
        f"  oauth_access_token: {MASK}  undecryptable (none of the configured keys)",
        f"  oauth_refresh_token: {MASK}  encrypted (key {key_id(key)}, primary)",
        "  webhook_signing_secret: absent",
    ]
    assert_nothing_revealed(acme + beta, every_state)


async def test_show_json_gives_state_key_and_mask_per_secret(
    database_url: str, every_state: dict[str, str], key: str, old_key: str,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.setenv("ENCRYPTION_KEY", key)
    monkeypatch.setenv("OLD_ENCRYPTION_KEY", old_key)
    shown = []
    for tenant in ("acme", "beta"):
        args = ["show", tenant, "--json", "--database-url", database_url]
        assert await asyncio.to_thread(main, args) == 0
        shown.append(capsys.readouterr().out)
    acme, beta = (json.loads(text) for text in shown)
    assert (acme["tenant_id"], acme["name"], acme["keys_configured"]) == ("acme", "Acme Corp", True)
    assert acme["created_at"] and acme["updated_at"]
    states = [
        (s["column"], s["state"], s["key_id"], s["key"], s["value"])
        for s in acme["secrets"] + beta["secrets"]
    ]
    assert states == [
        ("gemini_api_key", "absent", None, None, None),
        ("oauth_access_token", "absent", None, None, None),
        ("oauth_refresh_token", "plaintext", None, None, MASK),
        ("webhook_signing_secret", "encrypted", key_id(key), "primary", MASK),
        ("gemini_api_key", "encrypted", key_id(old_key), "previous", MASK),
        ("oauth_access_token", "undecryptable", None, None, MASK),
        ("oauth_refresh_token", "encrypted", key_id(key), "primary", MASK),
        ("webhook_signing_secret", "absent", None, None, None),
    ]
    assert [s["label"] for s in acme["secrets"]] == [
        "Gemini API key", "oauth_access_token", "oauth_refresh_token", "webhook_signing_secret",
    ]  # fmt: skip
    assert_nothing_revealed("".join(shown), every_state)


async def test_show_without_encryption_key_reports_tokens_as_key_unknown(
    database_url: str, every_state: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """No key: exit 0, plaintext and absent still told apart, tokens `encrypted (key unknown)`."""
    assert await asyncio.to_thread(main, ["show", "beta", "--database-url", database_url]) == 0
    out = capsys.readouterr()
    assert out.out.splitlines()[5:] == [
        f"  gemini_api_key (Gemini API key): {MASK}  encrypted (key unknown)",
        f"  oauth_access_token: {MASK}  encrypted (key unknown)",
        f"  oauth_refresh_token: {MASK}  encrypted (key unknown)",
        "  webhook_signing_secret: absent",
    ]
    assert "ENCRYPTION_KEY not set" in out.err
    args = ["show", "acme", "--json", "--database-url", database_url]
    assert await asyncio.to_thread(main, args) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["keys_configured"] is False
    assert [s["state"] for s in data["secrets"]] == ["absent", "absent", "plaintext", "encrypted"]
    assert data["secrets"][3]["key_id"] is None


async def test_show_with_an_invalid_key_exits_2(
    database_url: str, every_state: dict[str, str], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """Only a missing key is tolerated: a malformed or blank one is a configuration error."""
    for value in ("not-a-fernet-key", " "):
        monkeypatch.setenv("ENCRYPTION_KEY", value)
        assert await asyncio.to_thread(main, ["show", "acme", "--database-url", database_url]) == 2
        err = capsys.readouterr().err
        assert "ENCRYPTION_KEY" in err and "not-a-fernet-key" not in err


async def test_show_escapes_control_characters_in_ids_and_names(
    database_url: str, schema: asyncpg.Pool, capsys: pytest.CaptureFixture[str]
) -> None:
    await schema.execute(
        "INSERT INTO tenants (tenant_id, name) VALUES ($1, $2)", "a\nb", "Evil\r\nTenant: x"
    )
    assert await asyncio.to_thread(main, ["show", "a\nb", "--database-url", database_url]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["Tenant:  a\\nb", "Name:    Evil\\r\\nTenant: x"]
    assert await asyncio.to_thread(main, ["show", "x\ny", "--database-url", database_url]) == 1
    assert capsys.readouterr().err == "error: Tenant x\\ny not found\n"


async def test_commands_before_the_schema_exits_2_saying_to_migrate(
    database_url: str, pool: asyncpg.Pool, key: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.setenv("ENCRYPTION_KEY", key)
    assert await asyncio.to_thread(main, ["show", "acme", "--database-url", database_url]) == 2
    err = capsys.readouterr().err
    assert "table tenants does not exist" in err and "migrate up" in err
