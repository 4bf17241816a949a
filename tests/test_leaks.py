"""No secret in any output: database error details, asyncio debug logs, forged log lines.

Each test plants known plaintexts and tokens, makes PostgreSQL (a CHECK
constraint, a unique index, a trigger raising with the value) or asyncio
(debug mode, slow-callback logging) put them where they could reach an
operator, and then searches every output for them: the raised error's
`str`/`repr`, its rendered traceback, its `driver_error`, the logs of every
logger at DEBUG, and the CLI's stdout and stderr (a real subprocess).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import reprlib
import subprocess
import sys
import traceback
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest
from cryptography.fernet import Fernet

from tenantstore import (
    AsyncCrypto,
    DatabaseError,
    EncryptionKeyMissingError,
    KeyRing,
    MigrationError,
    PlaintextSecretError,
    TenantDecryptionError,
    TenantExistsError,
    TenantNotFoundError,
    TenantRepository,
)
from tenantstore.audit import AuditLog
from tenantstore.migrate import (
    decrypt_secrets,
    downgrade,
    encrypt_secrets,
    load_migrations,
    rotate_secrets,
    upgrade,
    verify_secrets,
)
from tenantstore.migrate.__main__ import main
from tenantstore.migrate.files import parse_migrations

PLAIN = "AIzaSyPLANTED-gemini-secret-7f3a9c1e5b2d8046"
LEGACY = "ya29.PLANTED-legacy-oauth-token-51c0e9d7b3a2"
NEW_PLAIN = "AIzaSyPLANTED-new-gemini-key-0c6e2a9f4b7d1358"
TOKEN_SHAPE = re.compile(r"gAAAAA[A-Za-z0-9_=-]{6,}")
# Shorter than asked for (16): asyncio's debug log and a future's repr abbreviate
# with reprlib, which keeps the first 13 and last 14 characters of a value.
FRAGMENT = 12


def leaked(text: str, secrets: Iterable[str]) -> list[str]:
    """What of `secrets` (or a 12-character piece of one, or any Fernet token) is in `text`."""
    found = [m[0][:24] + "..." for m in TOKEN_SHAPE.finditer(text)]
    for secret in secrets:
        if secret in text:
            found.append(f"the whole of {secret[:8]}...")
            continue
        for start in range(len(secret) - FRAGMENT + 1):
            if secret[start : start + FRAGMENT] in text:
                found.append(f"a fragment of {secret[:8]}...")
                break
    return found


def error_texts(error: BaseException) -> dict[str, str]:
    """Every way an error becomes text: str, repr, rendered traceback, its driver_error."""
    texts = {
        "str": str(error),
        "repr": repr(error),
        "traceback": "".join(traceback.format_exception(error)),
    }
    driver = getattr(error, "driver_error", None)
    if driver is not None:
        texts["driver_error"] = f"{driver!s} {driver!r} {driver.as_dict()!r}"
        texts["driver_error traceback"] = "".join(traceback.format_exception(driver))
    return texts


def assert_no_leak(texts: dict[str, str], secrets: Iterable[str]) -> None:
    secrets = list(secrets)
    leaks = {where: found for where, text in texts.items() if (found := leaked(text, secrets))}
    assert not leaks, leaks


def test_the_leak_finder_finds_what_it_looks_for(key: str) -> None:
    """The checks below would catch a value, a fragment of one, and a token of any key."""
    token = KeyRing(key).encrypt(PLAIN)
    assert leaked(f"row contains ({PLAIN})", [PLAIN])
    assert leaked(f"...{PLAIN[5:17]}...", [PLAIN])
    assert leaked(reprlib.repr(PLAIN), [PLAIN])  # as asyncio's debug log abbreviates
    assert leaked(f"Key (k)=({token})", []) and leaked(reprlib.repr(token), [])
    assert not leaked(f"{PLAIN[:11]} and {PLAIN[-11:]}", [PLAIN])


# -- the guards: what makes PostgreSQL quote a secret in an error ------------------------


@dataclass(frozen=True)
class Guard:
    """Statements run after the rows are planted, and what the error must still name."""

    name: str
    sql: tuple[str, ...]
    names: str
    sqlstate: str


def trigger(body: str, events: str = "INSERT OR UPDATE", row: str = "NEW") -> tuple[str, ...]:
    function = (
        "CREATE FUNCTION reject_secret() RETURNS trigger LANGUAGE plpgsql AS $$ "
        f"BEGIN {body.replace('NEW.', row + '.')}; RETURN {row}; END $$"
    )
    return (
        function,
        f"CREATE TRIGGER reject BEFORE {events} ON tenants "
        "FOR EACH ROW EXECUTE FUNCTION reject_secret()",
    )


CHECK = Guard(
    "check",
    # NOT VALID: the planted rows stay; any row written with a Gemini key fails.
    ("ALTER TABLE tenants ADD CONSTRAINT secret_guard CHECK (gemini_api_key IS NULL) NOT VALID",),
    "secret_guard",
    "23514",
)
# Triggers raising with the row's values: in the message, with a SQLSTATE of
# class 23 (whose server messages are otherwise kept), and in DETAIL and HINT.
RAISES = {
    "raise": ("RAISE EXCEPTION 'rejected %', NEW.gemini_api_key", "P0001"),
    "raise-errcode": (
        "RAISE EXCEPTION 'rejected %', NEW.gemini_api_key USING ERRCODE = 'check_violation'",
        "23514",
    ),
    "raise-detail": (
        "RAISE EXCEPTION 'rejected' USING DETAIL = NEW.gemini_api_key, "
        "HINT = coalesce(NEW.oauth_access_token, '')",
        "P0001",
    ),
    # Not a RAISE: a value used as a name makes the server's own message quote it
    # (`relation "ya29..." does not exist`), in a class whose messages name objects.
    "dynamic-name": (
        "EXECUTE format('SELECT 1 FROM %I', "
        "coalesce(NEW.oauth_access_token, NEW.oauth_refresh_token))",
        "42P01",
    ),
}
TRIGGERS = [
    Guard(name, trigger(body), "reject_secret", sqlstate)
    for name, (body, sqlstate) in RAISES.items()
]
# The same, refusing a DELETE and raising with the row being deleted.
DELETE_TRIGGERS = [
    Guard(name, trigger(body, "DELETE", "OLD"), "reject_secret", sqlstate)
    for name, (body, sqlstate) in RAISES.items()
]
# decrypt: two tenants share a Gemini key (two tokens of it); once both are
# plaintext, the index finds the duplicate and quotes it in DETAIL.
UNIQUE = Guard(
    "unique",
    ("CREATE UNIQUE INDEX secret_unique ON tenants (gemini_api_key)",),
    "secret_unique",
    "23505",
)
# encrypt and the repository: writing the victim's Gemini key as a token puts
# its plaintext OAuth token into a partial unique index that already holds
# the twin's, and DETAIL quotes it. (Fresh tokens never collide, so this is
# how a unique index can quote a secret when the write stores tokens.)
UNIQUE_PARTIAL = Guard(
    "unique",
    (
        "CREATE UNIQUE INDEX secret_unique ON tenants (oauth_access_token) "
        "WHERE gemini_api_key LIKE 'gAAAA%'",
    ),
    "secret_unique",
    "23505",
)


@dataclass
class Planted:
    """The rows a case planted: every secret and token in them, and the keys."""

    secrets: list[str] = field(default_factory=list)

    def add(self, *values: str) -> None:
        self.secrets.extend(values)


async def plant(pool: asyncpg.Pool, planted: Planted, tenant_id: str, **values: str) -> None:
    columns = ["tenant_id", "name", *values]
    params = ", ".join(f"${i}" for i in range(1, len(columns) + 1))
    await pool.execute(
        f"INSERT INTO tenants ({', '.join(columns)}) VALUES ({params})",
        tenant_id,
        tenant_id.title(),
        *values.values(),
    )
    planted.add(*values.values())


async def guard(pool: asyncpg.Pool, how: Guard) -> None:
    for statement in how.sql:
        await pool.execute(statement)


@pytest.fixture
async def schema(pool: asyncpg.Pool, keyring: KeyRing) -> asyncpg.Pool:
    await upgrade(pool, keyring)
    return pool


async def snapshot(pool: asyncpg.Pool) -> list[tuple[object, ...]]:
    return [tuple(r) for r in await pool.fetch("SELECT * FROM tenants ORDER BY tenant_id")]


# -- the batch runner: encrypt, decrypt, rotate (Python and CLI) -----------------------


RUNNER_CASES = [
    *[("encrypt", g) for g in [CHECK, UNIQUE_PARTIAL, *TRIGGERS]],
    *[("decrypt", g) for g in [CHECK, UNIQUE, *TRIGGERS]],
    # A rotate writes fresh tokens only: no unique index over a secret can newly match.
    *[("rotate", g) for g in [CHECK, *TRIGGERS]],
]


def run_cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tenantstore.migrate", *args],
        env={**os.environ, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(("operation", "how"), RUNNER_CASES, ids=lambda v: getattr(v, "name", v))
async def test_runner_errors_name_the_constraint_and_never_quote_a_secret(
    schema: asyncpg.Pool, database_url: str, key: str, old_key: str, operation: str, how: Guard,
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """A write refused by a constraint or trigger stops the run with the constraint's
    (or raising function's) name and SQLSTATE, changes nothing, and prints no secret:
    not in the error, its traceback, the DEBUG logs, nor the CLI's output."""
    ring = KeyRing(key)
    planted = Planted([key, old_key])
    env = {"ENCRYPTION_KEY": key}
    columns: list[str] = []
    if operation == "encrypt":
        await plant(schema, planted, "victim", gemini_api_key=PLAIN, oauth_access_token=LEGACY)
        if how.name == "unique":
            await plant(schema, planted, "twin", gemini_api_key=ring.encrypt("other"),
                        oauth_access_token=LEGACY)  # fmt: skip
            columns = ["gemini_api_key"]  # the OAuth token stays plaintext, in the index
    elif operation == "decrypt":
        await plant(schema, planted, "victim", gemini_api_key=ring.encrypt(PLAIN),
                    oauth_access_token=ring.encrypt(LEGACY))  # fmt: skip
        if how.name == "unique":
            await plant(schema, planted, "twin", gemini_api_key=ring.encrypt(PLAIN))
    else:
        ring = KeyRing(key, [old_key])
        env["OLD_ENCRYPTION_KEY"] = old_key
        await plant(schema, planted, "victim", gemini_api_key=KeyRing(old_key).encrypt(PLAIN),
                    oauth_access_token=LEGACY)  # fmt: skip
    planted.add(PLAIN, LEGACY)
    await guard(schema, how)
    before = await snapshot(schema)
    run = {"encrypt": encrypt_secrets, "decrypt": decrypt_secrets, "rotate": rotate_secrets}

    with caplog.at_level(logging.DEBUG), pytest.raises(MigrationError) as info:
        await run[operation](schema, ring, columns=columns or None)
    message = str(info.value)
    assert how.names in message and f"SQLSTATE {how.sqlstate}" in message, message
    assert await snapshot(schema) == before
    assert_no_leak({**error_texts(info.value), "logs": caplog.text}, planted.secrets)
    # Recorded as failed: `status` must not call it interrupted and promise a rerun finishes it.
    last_run = "SELECT status FROM tenantstore_secret_runs ORDER BY run_id DESC LIMIT 1"
    assert await schema.fetchval(last_run) == "failed"

    args = [operation, "--database-url", database_url]
    args += [part for column in columns for part in ("--column", column)]
    result = await asyncio.to_thread(run_cli, args, env, tmp_path)
    assert result.returncode == 1, result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and how.names in error[0] and how.sqlstate in error[0], result.stderr
    assert "Traceback" not in result.stderr
    assert_no_leak({"stdout": result.stdout, "stderr": result.stderr}, planted.secrets)
    assert await snapshot(schema) == before


# -- the repository: set_gemini_api_key, set_secrets, create_tenant ----------------------


RepositoryCall = Callable[[TenantRepository], Awaitable[object]]
REPOSITORY_CALLS: dict[str, tuple[str, RepositoryCall]] = {
    "delete_tenant": ("twin", lambda r: r.delete_tenant("twin")),
    "set_gemini_api_key": ("victim", lambda r: r.set_gemini_api_key("victim", NEW_PLAIN)),
    "set_secrets": (
        "victim",
        lambda r: r.set_secrets("victim", gemini_api_key=NEW_PLAIN, webhook_signing_secret=PLAIN),
    ),
    "create_tenant": (
        "newbie",
        lambda r: r.create_tenant(
            "newbie", "Newbie", gemini_api_key=NEW_PLAIN, oauth_refresh_token=PLAIN
        ),
    ),
}
REPOSITORY_CASES = [
    *[(call, g) for call in ("set_gemini_api_key", "set_secrets") for g in [CHECK, UNIQUE_PARTIAL]],
    *[("create_tenant", CHECK)],
    *[(call, g) for call in REPOSITORY_CALLS if call != "delete_tenant" for g in TRIGGERS],
    *[("delete_tenant", g) for g in DELETE_TRIGGERS],
]


@pytest.mark.parametrize(("call", "how"), REPOSITORY_CASES, ids=lambda v: getattr(v, "name", v))
async def test_repository_errors_name_the_constraint_and_tenant_never_a_secret(
    schema: asyncpg.Pool, key: str, call: str, how: Guard, caplog: pytest.LogCaptureFixture
) -> None:
    """A write refused by the database raises `DatabaseError` naming the constraint or
    trigger function, the SQLSTATE and the tenant; no value of the row (the new
    token, a legacy plaintext in another column, the plaintext passed in) anywhere."""
    ring = KeyRing(key)
    planted = Planted([key, PLAIN, LEGACY, NEW_PLAIN])
    await plant(schema, planted, "victim", oauth_access_token=LEGACY)
    await plant(schema, planted, "twin", gemini_api_key=ring.encrypt(PLAIN),
                oauth_access_token=LEGACY)  # fmt: skip
    await guard(schema, how)
    before = await snapshot(schema)
    tenant_id, act = REPOSITORY_CALLS[call]
    repo = TenantRepository(schema, ring)

    with caplog.at_level(logging.DEBUG), pytest.raises(DatabaseError) as info:
        await act(repo)
    error = info.value
    message = str(error)
    assert how.names in message and f"SQLSTATE {how.sqlstate}" in message, message
    assert f"tenant {tenant_id}" in message and error.tenant_id == tenant_id
    assert error.sqlstate == how.sqlstate
    assert error.driver_error is not None and getattr(error.driver_error, "detail", None) is None
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)
    assert await snapshot(schema) == before
    assert_no_leak({**error_texts(error), "logs": caplog.text}, planted.secrets)


class FailingSink:
    """An audit sink that is down: every emit raises."""

    enabled = True

    async def emit(self, events: object) -> None:
        raise RuntimeError("the audit sink is down")

    async def aclose(self) -> None:
        pass


@pytest.mark.parametrize("call", ["set_secrets", "create_tenant"])
async def test_an_audit_failure_after_a_refused_write_carries_no_driver_error(
    schema: asyncpg.Pool, key: str, call: str
) -> None:
    """Auditing a failed write inside the `except` would chain the driver's error
    (its DETAIL quoting the row) to whatever the audit raised, unsuppressed."""
    ring = KeyRing(key)
    planted = Planted([key, PLAIN, LEGACY, NEW_PLAIN])
    await plant(schema, planted, "victim", oauth_access_token=LEGACY)
    await guard(schema, TRIGGERS[2])  # raise-detail: DETAIL and HINT hold the row's values
    repo = TenantRepository(schema, ring, audit=AuditLog(FailingSink()))
    with pytest.raises(RuntimeError, match="audit sink is down") as info:
        await REPOSITORY_CALLS[call][1](repo)
    assert info.value.__context__ is None
    assert_no_leak(error_texts(info.value), planted.secrets)


# -- the schema runner: a migration that trips over a row holding a secret ---------------


def with_extra(files: dict[str, str]) -> list:  # type: ignore[type-arg]
    shipped = {m.up.filename: m.up.sql for m in load_migrations()}
    shipped.update({m.down.filename: m.down.sql for m in load_migrations() if m.down})
    shipped.update(files)
    return parse_migrations(shipped)


SCHEMA_CASES = {
    "check": (
        "ALTER TABLE tenants ADD CONSTRAINT tokens_only CHECK (gemini_api_key LIKE 'gAAAA%');\n",
        "tokens_only",
        "23514",
    ),
    "unique": (
        "CREATE UNIQUE INDEX one_oauth_each ON tenants (oauth_access_token);\n",
        "one_oauth_each",
        "23505",
    ),
    "raise": (
        "DO $$ BEGIN RAISE EXCEPTION 'found %', "
        "(SELECT string_agg(gemini_api_key, ',') FROM tenants); END $$;\n",
        "0099_guard.up.sql",
        "P0001",
    ),
}


@pytest.mark.parametrize("case", list(SCHEMA_CASES))
async def test_a_failing_migration_quotes_no_row(
    schema: asyncpg.Pool, database_url: str, key: str, case: str,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """A migration step that a row holding a secret makes fail (a CHECK it violates,
    a unique index over duplicated secrets, a RAISE quoting it) fails with the
    file, the object and SQLSTATE; neither `MigrationError` nor `migrate up` shows a value."""
    planted = Planted([key, PLAIN, LEGACY])
    # Rows an old application version wrote in plaintext after `up`.
    await plant(schema, planted, "legacy1", gemini_api_key=PLAIN, oauth_access_token=LEGACY)
    await plant(schema, planted, "legacy2", gemini_api_key=KeyRing(key).encrypt(PLAIN),
                oauth_access_token=LEGACY)  # fmt: skip
    sql, names, sqlstate = SCHEMA_CASES[case]
    migrations = with_extra({"0099_guard.up.sql": sql, "0099_guard.down.sql": "SELECT 1;\n"})
    with caplog.at_level(logging.DEBUG), pytest.raises(MigrationError) as info:
        await upgrade(schema, KeyRing(key), migrations=migrations)
    message = str(info.value)
    assert "0099_guard.up.sql failed" in message and names in message, message
    assert f"SQLSTATE {sqlstate}" in message
    assert_no_leak({**error_texts(info.value), "logs": caplog.text}, planted.secrets)

    # The CLI's own path for the same failure (in process: it loads the migrations we give).
    monkeypatch.setattr("tenantstore.migrate.schema.load_migrations", lambda: migrations)
    monkeypatch.setenv("ENCRYPTION_KEY", key)
    capsys.readouterr()
    with caplog.at_level(logging.DEBUG):
        code = await asyncio.to_thread(main, ["up", "--database-url", database_url])
    out = capsys.readouterr()
    assert code == 1 and names in out.err
    assert_no_leak({"stdout": out.out, "stderr": out.err, "logs": caplog.text}, planted.secrets)


# -- asyncio debug mode: results travel sealed ---------------------------------------------


async def test_asyncio_debug_logs_show_no_plaintext(
    schema: asyncpg.Pool, key: str, caplog: pytest.LogCaptureFixture
) -> None:
    """With asyncio debug on and every callback reported as slow, the worker's hand-back
    (decrypted values, tokens on their way back) and the futures' results show nothing."""
    ring = KeyRing(key)
    planted = Planted([key])
    secrets = [f"AIzaSyPLANTED-debug-secret-{i:04d}-4b7d1358aa" for i in range(20)]
    for i, secret in enumerate(secrets):
        await plant(schema, planted, f"t{i:02d}", gemini_api_key=ring.encrypt(secret),
                    oauth_access_token=f"legacy-plain-{secret}")  # fmt: skip
    planted.add(*secrets)
    loop = asyncio.get_running_loop()
    debug, slow = loop.get_debug(), loop.slow_callback_duration
    loop.set_debug(True)
    loop.slow_callback_duration = 0
    try:
        with caplog.at_level(logging.DEBUG, logger="asyncio"):
            repo = TenantRepository(schema, ring, cache_size=0)
            one = await repo.get_tenant("t00")
            many = await repo.get_tenants([f"t{i:02d}" for i in range(20)])
            gathered = await asyncio.gather(*(repo.get_tenant(f"t{i:02d}") for i in range(20)))
            crypto = AsyncCrypto(ring, cache_size=0)
            tokens = await crypto.encrypt_many(secrets)
            decrypted = await crypto.decrypt_many(tokens)
            await crypto.decrypt_many([ring.encrypt(s) for s in secrets])
    finally:
        loop.set_debug(debug)
        loop.slow_callback_duration = slow
    assert one is not None and one.gemini_api_key is not None
    assert one.gemini_api_key.get_secret_value() == secrets[0]
    assert len(many) == 20 and all(t is not None for t in gathered)
    assert decrypted == secrets
    planted.add(*(t for t in tokens if t))
    asyncio_records = [r for r in caplog.records if r.name == "asyncio"]
    assert any("Executing" in r.getMessage() for r in asyncio_records), "no slow callback logged"
    text = "\n".join(r.getMessage() for r in asyncio_records)
    assert_no_leak({"asyncio log": text}, planted.secrets)
    assert "<sealed>" in text  # the hand-back was logged, sealed


async def test_keyring_async_helpers_show_no_plaintext_in_asyncio_debug(
    key: str, caplog: pytest.LogCaptureFixture
) -> None:
    """`KeyRing.encrypt_many` / `decrypt_many` under asyncio debug: nothing of the
    plaintexts in the slow-callback log."""
    ring = KeyRing(key)
    secrets = [f"AIzaSyPLANTED-keyring-secret-{i:04d}-4b7d1358aa" for i in range(6)]
    loop = asyncio.get_running_loop()
    debug, slow = loop.get_debug(), loop.slow_callback_duration
    loop.set_debug(True)
    loop.slow_callback_duration = 0
    try:
        with caplog.at_level(logging.DEBUG, logger="asyncio"):
            tokens = await ring.encrypt_many(secrets)
            assert await ring.decrypt_many(tokens) == secrets
    finally:
        loop.set_debug(debug)
        loop.slow_callback_duration = slow
    text = "\n".join(r.getMessage() for r in caplog.records if r.name == "asyncio")
    assert "Executing" in text, "no slow callback logged"
    assert_no_leak({"asyncio log": text}, [key, *secrets, *tokens])


# -- log injection: ids from the database cannot forge a line ---------------------------

FORGED = "x\nINFO Verification complete: 999 current key\r\x1b[2K\x1b[1;31mERROR fake"


def assert_one_line(text: str) -> None:
    assert "\n" not in text and "\r" not in text and "\x1b" not in text, repr(text)


async def test_repository_messages_and_logs_escape_ids_from_the_database(
    schema: asyncpg.Pool, key: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A tenant id holding a newline, a carriage return and ANSI escapes is logged and
    raised escaped (one line, no control character); the error keeps the exact id."""
    foreign = Fernet(Fernet.generate_key()).encrypt(b"lost").decode()
    await schema.execute(
        "INSERT INTO tenants (tenant_id, name, gemini_api_key) VALUES ($1, 'F', $2)",
        FORGED,
        foreign,
    )
    repo = TenantRepository(schema, KeyRing(key))
    errors: list[BaseException] = []
    with caplog.at_level(logging.DEBUG):
        for call in (repo.get_tenant(FORGED), repo.get_tenants([FORGED])):
            with pytest.raises(TenantDecryptionError) as info:
                await call
            assert info.value.tenant_id == FORGED
            errors.append(info.value)
        with pytest.raises(TenantDecryptionError):
            async for _ in repo.iter_tenants():
                pass
        with pytest.raises(TenantExistsError) as exists:
            await repo.create_tenant(FORGED, "F")
        errors.append(exists.value)
        with pytest.raises(TenantNotFoundError) as missing:
            await repo.set_gemini_api_key(FORGED + "-gone", "k")
        errors.append(missing.value)
        await schema.execute("UPDATE tenants SET gemini_api_key = 'legacy'")
        strict = TenantRepository(schema, KeyRing(key), allow_plaintext=False)
        with pytest.raises(PlaintextSecretError) as plaintext:
            await strict.get_tenant(FORGED)
        errors.append(plaintext.value)
    assert caplog.records
    for record in caplog.records:
        assert_one_line(record.getMessage())
    for error in errors:
        assert_one_line(str(error))
        assert "x\\nINFO Verification complete" in str(error)


async def test_runner_logs_escape_ids_from_the_database(
    schema: asyncpg.Pool, key: str, caplog: pytest.LogCaptureFixture
) -> None:
    """`verify` logs an undecryptable secret of a hostile id on one escaped line."""
    foreign = Fernet(Fernet.generate_key()).encrypt(b"lost").decode()
    await schema.execute(
        "INSERT INTO tenants (tenant_id, name, gemini_api_key) VALUES ($1, 'F', $2)",
        FORGED,
        foreign,
    )
    with caplog.at_level(logging.DEBUG, logger="tenantstore"):
        report = await verify_secrets(schema, KeyRing(key))
    assert report.failed_tenant_ids == [FORGED]  # the report keeps the exact id
    messages = [r.getMessage() for r in caplog.records]
    assert any("Failed to decrypt" in m and "x\\nINFO" in m for m in messages), messages
    for message in messages:
        assert_one_line(message)


async def test_schema_runner_escapes_migration_names_from_the_database(
    schema: asyncpg.Pool, key: str
) -> None:
    """An applied migration this tenantstore does not know is named in the error
    escaped: a name holding a newline cannot forge a line."""
    await schema.execute(
        "INSERT INTO tenantstore_migrations (version, name, checksum) VALUES (99, $1, 'x')",
        FORGED,
    )
    with pytest.raises(MigrationError) as info:
        await upgrade(schema, KeyRing(key))
    assert_one_line(str(info.value))
    assert "0099_x\\nINFO Verification complete" in str(info.value)


# -- upgrade/downgrade read ENCRYPTION_KEY as the CLI does -------------------------------


async def test_upgrade_without_a_key_ring_reads_the_environment(
    pool: asyncpg.Pool, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`await upgrade(pool)` with ENCRYPTION_KEY set runs the data steps with it;
    without it, `EncryptionKeyMissingError` before any step is applied."""
    await upgrade(pool, None, target=1)
    await pool.execute(
        "INSERT INTO tenants (tenant_id, name, gemini_api_key) VALUES ('a', 'A', $1)", PLAIN
    )
    with pytest.raises(EncryptionKeyMissingError):
        await upgrade(pool)
    applied = "SELECT array_agg(version ORDER BY version) FROM tenantstore_migrations"
    assert await pool.fetchval(applied) == [1]
    assert await pool.fetchval("SELECT gemini_api_key FROM tenants") == PLAIN

    monkeypatch.setenv("ENCRYPTION_KEY", key)
    report = await upgrade(pool)
    everything = [m.version for m in load_migrations()]
    assert report.version == everything[-1] and report.combined_data() is not None
    assert await pool.fetchval(applied) == everything
    assert KeyRing(key).decrypt(await pool.fetchval("SELECT gemini_api_key FROM tenants")) == PLAIN


async def test_downgrade_without_a_key_ring_reads_the_environment(
    pool: asyncpg.Pool, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`await downgrade(pool)` of a decrypting step: the environment's key, or
    `EncryptionKeyMissingError` with nothing reverted."""
    await upgrade(pool, KeyRing(key), target=4)
    await pool.execute(
        "INSERT INTO tenants (tenant_id, name, gemini_api_key) VALUES ('a', 'A', $1)",
        KeyRing(key).encrypt(PLAIN),
    )
    applied = "SELECT array_agg(version ORDER BY version) FROM tenantstore_migrations"
    with pytest.raises(EncryptionKeyMissingError):
        await downgrade(pool)
    assert await pool.fetchval(applied) == [1, 2, 3, 4]

    monkeypatch.setenv("ENCRYPTION_KEY", key)
    report = await downgrade(pool)
    assert report.applied == ["0004_encrypt_secret_columns"]
    assert await pool.fetchval(applied) == [1, 2, 3]
    assert await pool.fetchval("SELECT gemini_api_key FROM tenants") == PLAIN


# -- counts add up under concurrent application writes -----------------------------------

ROWS = 20_000
SECRETS = ("gemini_api_key", "oauth_access_token", "webhook_signing_secret")
OUTCOMES = ("changed", "skipped", "current", "previous", "plaintext", "failed",
            "changed_concurrently")  # fmt: skip


@pytest.mark.slow
async def test_counts_add_up_under_concurrent_writes(
    database_url: str, key: str, old_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the application rewrites random rows (new plaintext, a new token under
    the primary, a cleared secret), `encrypt` and then `rotate` read each row once
    (`rows` is the table's row count), each column's counts add up to at most the
    rows, and every secret ends as exactly what the application last wrote, or one
    token of it: nothing lost, nothing encrypted twice.

    Besides a free-running writer, the application writes to rows of the page in
    flight just before the runner's write of it (as `interfere` in
    test_migrate_secrets.py), so compare-and-swap conflicts, re-reads and
    "changed concurrently" outcomes happen in every run, not by luck.
    """
    pool = await asyncpg.create_pool(database_url, min_size=2, max_size=6)
    assert pool is not None
    try:
        await upgrade(pool, KeyRing(key), target=3)
        ids = [f"t{i:06d}" for i in range(ROWS)]
        originals = {c: [f"{c[:6]}-orig-{i:06d}" for i in range(ROWS)] for c in SECRETS}
        await pool.execute(
            "INSERT INTO tenants (tenant_id, name, gemini_api_key, oauth_access_token, "
            "webhook_signing_secret) SELECT i, 'n', g, o, w "
            "FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS u(i, g, o, w)",
            ids, *originals.values(),
        )  # fmt: skip
        # What the application last wrote, as plaintext ("" or None: cleared), per cell.
        last: dict[tuple[str, str], str | None] = {}
        primary = KeyRing(key)
        rng = random.Random(7)
        writes = 0

        async def app_write(tenant_id: str) -> None:
            nonlocal writes
            # The Gemini key is never cleared, so every row always holds a secret
            # and each run reads it exactly once.
            column = rng.choice(SECRETS)
            choice = rng.random()
            plaintext: str | None = f"{column[:6]}-app-{writes:06d}"
            writes += 1
            if choice < 0.4:
                stored = plaintext
            elif choice < 0.8 or column == "gemini_api_key":
                stored = primary.encrypt(plaintext)  # type: ignore[arg-type]
            else:
                stored = plaintext = None if choice < 0.9 else ""
            await pool.execute(
                f"UPDATE tenants SET {column} = $2 WHERE tenant_id = $1", tenant_id, stored
            )
            last[tenant_id, column] = plaintext

        async def application(stop: asyncio.Event) -> None:
            while not stop.is_set():
                await app_write(ids[rng.randrange(ROWS)])
                await asyncio.sleep(0)

        rereads = 0
        original_fetch = asyncpg.connection.Connection.fetch

        async def fetch(
            self: asyncpg.Connection, query: str, *args: object, **kw: object
        ) -> object:
            nonlocal rereads
            if query.startswith('UPDATE "public"."tenants" AS t'):
                if rng.random() < 0.5:  # the application got there first
                    keys = list(args[0])  # type: ignore[call-overload]
                    for tenant_id in rng.sample(keys, min(3, len(keys))):
                        await app_write(tenant_id)
            elif "= ANY ($1::" in query:
                rereads += 1
            return await original_fetch(self, query, *args, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr(asyncpg.connection.Connection, "fetch", fetch)
        for operation, ring in (
            ("encrypt", KeyRing(old_key)),
            ("rotate", KeyRing(key, [old_key])),
        ):
            stop = asyncio.Event()
            writer = asyncio.ensure_future(application(stop))
            run = encrypt_secrets if operation == "encrypt" else rotate_secrets
            rereads_before = rereads
            try:
                report = await run(pool, ring, batch_size=200)
            finally:
                stop.set()
                await writer
            assert rereads > rereads_before, "no compare-and-swap conflict happened"
            assert report.rows == ROWS, (operation, report.rows)
            for column, counts in report.columns.items():
                total = sum(getattr(counts, name) for name in OUTCOMES)
                assert total <= report.rows, (operation, column, counts)
        monkeypatch.undo()
        ring = KeyRing(key, [old_key])
        rows = await pool.fetch(
            "SELECT tenant_id, gemini_api_key, oauth_access_token, webhook_signing_secret "
            "FROM tenants"
        )
        assert len(rows) == ROWS
        for row in rows:
            i = int(row[0][1:])
            for c, column in enumerate(SECRETS):
                expected = last.get((row[0], column), originals[column][i])
                stored = row[c + 1]
                if not expected:
                    assert stored == expected, (row[0], column)
                elif stored.startswith("gAAAA"):
                    assert ring.decrypt(stored) == expected, (row[0], column)
                else:
                    assert stored == expected, (row[0], column)  # written after the run passed
    finally:
        await pool.close()
