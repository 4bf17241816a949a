"""Database URLs: checked before any connection, and never shown with a password.

A password holding an unencoded `/`, `?`, `#` or `@` used to reach asyncpg,
whose URL parser moved parts of it into the host, database or query and then
quoted them in errors; `redact_url` used to split at the first `?`, even one
inside a password.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import traceback
from pathlib import Path
from urllib.parse import quote, unquote

import asyncpg
import pytest
from asyncpg.connect_utils import _parse_connect_dsn_and_args
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from tenantstore import ConfigurationError, DatabaseError, create_pool
from tenantstore.db import check_database_url, redact_url, resolve_database_url
from tenantstore.migrate.__main__ import main

# Each password has long runs of letters and digits, so a fragment of it in
# an output is easy to spot; the specials split them up.
PASSWORDS = [
    "ab?TopSecretChunk42#z",  # the issue's: `bad query field: 'TopSecretChunk42'`
    "Alpha7/Bravo8Secret",
    "Charlie9@Delta0Secret",
    "Echo1#Foxtrot2Secret",
    "Golf3?Hotel4=Secret5",
    "Ind/ia6@Jul?iet7#Kilo8",
]
# The listener on port 1 never exists: had a URL got through, the attempt fails fast.
URL_FORMS = [
    "postgresql://app:{}@127.0.0.1:1/appdb",
    "postgres://app:{}@127.0.0.1:1,127.0.0.2:1/appdb?sslmode=disable",
    "postgresql://127.0.0.1:1/appdb?password={}",
    "postgresql://app@127.0.0.1:1/appdb?sslmode=disable&password={}&application_name=x",
]


def fragments(password: str) -> list[str]:
    """Every 5-character window of the password's letter-and-digit runs."""
    runs = re.findall(r"[A-Za-z0-9]{5,}", password)
    return [run[i : i + 5] for run in runs for i in range(len(run) - 4)]


def error_texts(error: BaseException) -> str:
    """What a traceback or a logging handler would print, plus the repr."""
    return "".join(traceback.format_exception(error)) + repr(error)


def assert_no_fragment(text: str, password: str) -> None:
    for fragment in fragments(password):
        assert fragment not in text, fragment


def run_status(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tenantstore.migrate", "status", *args],
        env={**os.environ, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


# -- the command line, real subprocesses -------------------------------------------


@pytest.mark.parametrize("via", ["DATABASE_URL", "--database-url"])
@pytest.mark.parametrize("password", PASSWORDS[:4])
def test_cli_rejects_an_unencoded_password_with_exit_2_and_shows_none_of_it(
    tmp_path: Path, password: str, via: str
) -> None:
    url = URL_FORMS[0].format(password)
    # A URL that lost its host to a misparse would fall back on these: fail fast there too.
    env = {"PGHOST": "/nonexistent", "PGPORT": "1"}
    if via == "DATABASE_URL":
        result = run_status([], {**env, "DATABASE_URL": url}, tmp_path)
    else:
        result = run_status(["--database-url", url], env, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert result.stderr.startswith("error: invalid database URL postgresql://"), output
    assert "percent-encode the password" in result.stderr
    assert "Traceback" not in output
    assert_no_fragment(output, password)


@pytest.mark.parametrize(
    "url",
    [
        "not a url",
        "mysql://app:Kilo8Secret@127.0.0.1:1/appdb",
        "postgresql+asyncpg://app:Kilo8Secret@127.0.0.1:1/appdb",
        "host=127.0.0.1 port=1 password=Kilo8Secret dbname=appdb",
        "postgresql://app:Kilo8Secret@127.0.0.1:port/appdb",
        "postgresql://app:Kilo8Secret@127.0.0.1:1/appdb?port=first",
        "postgresql://app:Kilo8Secret@127.0.0.1:1,,127.0.0.2:1/appdb",
        "postgresql://app:Kilo8%zzSecret@127.0.0.1:1/appdb",
    ],
)
def test_cli_reports_a_malformed_url_as_a_configuration_error(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """No scheme, another scheme, key=value, a word for a port: exit 2, not 1 or a traceback."""
    assert main(["status", "--database-url", url]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("error: invalid database URL "), err
    assert "Kilo8" not in out + err


# -- create_pool and resolve_database_url, in process -------------------------------


@pytest.mark.parametrize(
    ("form", "password"),
    [(form, password) for form in URL_FORMS[:2] for password in PASSWORDS]
    # In a query value only `#`, `&`, `@` and `%` are misread; `/`, `?` and `=` are not.
    + [
        (form, password)
        for form in URL_FORMS[2:]
        for password in PASSWORDS
        if "#" in password or "@" in password
    ],
)
async def test_create_pool_rejects_an_unencoded_password_before_connecting(
    form: str, password: str
) -> None:
    """The error, its chain and its traceback hold no fragment of the password."""
    url = form.format(password)
    for call in (
        lambda: create_pool(url, min_size=1),
        lambda: create_pool(min_size=1, environ={"DATABASE_URL": url}),
    ):
        with pytest.raises(ConfigurationError) as info:
            await call()
        error = info.value
        assert "percent-encode the password" in str(error)
        assert error.__cause__ is None and error.__context__ is None
        assert_no_fragment(error_texts(error), password)


def test_resolve_database_url_checks_the_url_from_a_dotenv_file() -> None:
    Path(".env").write_text("DATABASE_URL=postgresql://app:Lima9/Secret@db.example.com/appdb\n")
    with pytest.raises(ConfigurationError) as info:
        resolve_database_url()
    assert "Lima9" not in error_texts(info.value) and "Secret" not in error_texts(info.value)
    assert resolve_database_url("postgresql://app:Lima9%2FSecret@db.example.com/appdb")


async def test_create_pool_connects_with_a_percent_encoded_password_of_every_special(
    database_url: str,
) -> None:
    """The check turns away no well-formed URL (the test server does not ask for passwords)."""
    password = quote("a/b?c#d@e:f%g&h=i j+k,l", safe="")
    assert database_url.startswith("postgresql://postgres:@")
    url = database_url.replace("postgres:@", f"postgres:{password}@", 1)
    pool = await create_pool(url, min_size=1, max_size=1)
    try:
        assert await pool.fetchval("SELECT current_user") == "postgres"
    finally:
        await pool.close()


async def test_create_pool_describes_a_refused_connection_without_the_drivers_values(
    database_url: str,
) -> None:
    """A bad server setting: the message names the error class, never the value sent."""
    with pytest.raises(DatabaseError) as info:
        await create_pool(
            database_url, min_size=1, max_size=1, server_settings={"work_mem": "Mike0Secret"}
        )
    error = info.value
    assert str(error).startswith("cannot connect to PostgreSQL at postgresql://postgres:***@/")
    assert "InvalidParameterValueError (SQLSTATE 22023)" in str(error)
    assert error.sqlstate == "22023"
    assert isinstance(error.driver_error, asyncpg.InvalidParameterValueError)
    assert error.__context__ is None
    assert "Mike0" not in error_texts(error)


# -- check_database_url ---------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://app:s3cret@db.example.com:5432/appdb",
        "postgres://app:a%2Fb%3Fc%23d%40e%25f@db.example.com/appdb",
        "POSTGRESQL://app@db.example.com/appdb",
        "postgresql://app:pa:ss@h1:5432,h2:5433/appdb?target_session_attrs=read-write",
        "postgresql:///appdb?host=/var/run/postgresql",
        "postgresql://%2Fvar%2Frun%2Fpostgresql/appdb",
        "postgresql://app@[::1]:5432/appdb",
        "postgresql://app@db.example.com/appdb?password=a%26b%3Dc%23d&sslmode=require",
        "postgresql://me%40corp:x@db.example.com/appdb?port=5432",
        "postgresql://",
    ],
)
def test_check_database_url_accepts_well_formed_urls_unchanged(url: str) -> None:
    assert check_database_url(url) == url


# -- redact_url -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "secret"),
    [
        ("postgresql://app:?x=S3cret@host/db", "S3cret"),
        ("postgresql://app:ab?TopSecretChunk42#z@host/db", "TopSecretChunk42"),
        ("postgresql://app:a#S3cret@host/db", "S3cret"),
        ("postgresql://app:a@b/c?d#S3cret@host/db", "S3cret"),
        ("postgresql://app:S3cret%40x@host/db", "S3cret"),
        ("postgresql://host/db?password=S3cret", "S3cret"),
        ("postgresql://host/db?PassWord=S3cret", "S3cret"),
        ("postgresql://host/db?pass%77ord=S3cret", "S3cret"),
        ("postgresql://host/db?password=a&S3cret=b", "S3cret"),
        ("postgresql://host/db?password=a@S3cret", "S3cret"),
        ("postgresql://host/db?password=a?S3cret", "S3cret"),
        ("postgresql://host/db?sslmode=require&sslpassword=S3cret&application_name=x", "S3cret"),
        ("postgresql://host/db?passfile=/home/app/S3cret.pgpass", "S3cret"),
        ("postgresql://app:S3cret@h1:5432,h2:5433/db", "S3cret"),
        ("postgresql://app:S3cret@/db?host=/var/run/postgresql", "S3cret"),
        ("postgresql://app:S3cret/db", "S3cret"),  # the `@host` forgotten: libpq's port
        ("postgres://app:S3cret@%2Fvar%2Frun/db", "S3cret"),
        ("host=h password=S3cret", "S3cret"),
        ("host=h password='a b\\'S3cret'", "S3cret"),
        ("host = h  password = S3cret", "S3cret"),
        ("dbname=x://y@z password=S3cret", "S3cret"),
    ],
)
def test_redact_url_hides_the_password_in_every_form_libpq_reads(url: str, secret: str) -> None:
    assert secret not in redact_url(url)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://app:s3cret@h1:5432,h2:5433/db", "postgresql://app:***@h1:5432,h2:5433/db"),
        ("postgresql:///db?host=/var/run/postgresql", "postgresql:///db?host=/var/run/postgresql"),
        ("postgresql://%2Fvar%2Frun/db", "postgresql://%2Fvar%2Frun/db"),
        ("postgres://app@[::1]:5432/db", "postgres://app@[::1]:5432/db"),
        (
            "postgresql://app@h/db?sslmode=require&password=x&application_name=api",
            "postgresql://app@h/db?sslmode=require&password=***&***",
        ),
        ("postgresql://app:?x=S3cret@host/db", "postgresql://***"),
    ],
)
def test_redact_url_still_shows_where_a_well_formed_url_points(url: str, shown: str) -> None:
    assert redact_url(url) == shown


# -- properties -----------------------------------------------------------------------

SPECIALS = "/#?@:%&=+ ;,'\"\\[]$!"
# '*' is left out: redact_url writes `***`, and a password made of stars would
# be "shown" by a correct redaction. Separators other than the space are not
# printable, so they are left out too.
passwords = st.text(
    st.one_of(
        st.sampled_from(SPECIALS),
        st.characters(categories=["L", "N", "P", "S"], exclude_characters="*"),
    ),
    min_size=4,
    max_size=24,
)
schemes = st.sampled_from(["postgresql", "postgres"])
users = st.sampled_from(["app", "", "u.ser", "me%40corp"])
hostlists = st.sampled_from(
    ["db.example.com", "h1:5432,h2:5433", "", "%2Fvar%2Frun%2Fpostgresql", "[::1]:5432"]
)
databases = st.sampled_from(["appdb", "", "my%20db"])
queries = st.sampled_from(
    ["", "?sslmode=require", "?host=/var/run/postgresql&application_name=api"]
)
secret_names = st.sampled_from(["password", "passfile", "sslpassword"]).flatmap(
    lambda name: st.tuples(*(st.sampled_from([c.lower(), c.upper()]) for c in name)).map("".join)
)
encodings = st.sampled_from(["raw", "percent-encoded"])


def encode(password: str, encoding: str) -> str:
    return password if encoding == "raw" else quote(password, safe="")


def assert_redacted(left: str, inserted: str, right: str, password: str) -> str:
    """`redact_url(left + inserted + right)` shows neither form of the password.

    Only passwords found nowhere else in the URL count: a match in the host
    name would be a correct redaction that still "shows" the password.
    """
    for form in {password, inserted}:
        assume(form not in left and form not in right)
    redacted = redact_url(left + inserted + right)
    assert password not in redacted
    assert inserted not in redacted
    return redacted


@settings(max_examples=400, deadline=None)
@given(schemes, users, passwords, encodings, hostlists, databases, queries)
@example("postgresql", "app", "ab?TopSecretChunk42#z", "raw", "host", "db", "")
@example("postgresql", "app", "?x=S3cret", "raw", "host", "db", "")
def test_redact_url_hides_a_password_in_the_login(
    scheme: str, user: str, password: str, encoding: str, hosts: str, db: str, query: str
) -> None:
    left, right = f"{scheme}://{user}:", f"@{hosts}/{db}{query}"
    redacted = assert_redacted(left, encode(password, encoding), right, password)
    assert redacted.startswith(f"{scheme}://")
    if encoding != "raw":  # well-formed: all but the password stays visible
        assert redacted == f"{scheme}://{user}:***{right}"


@settings(max_examples=400, deadline=None)
@given(
    schemes,
    st.sampled_from(["", "app@", "app:other@"]),
    hostlists,
    databases,
    st.sampled_from(["", "sslmode=require&", "host=/tmp&"]),
    secret_names,
    passwords,
    encodings,
    st.sampled_from(["", "&sslmode=require", "&application_name=x"]),
)
@example("postgresql", "", "host", "db", "", "password", "a@S3cret", "raw", "")
def test_redact_url_hides_a_password_in_the_query(
    scheme: str,
    login: str,
    hosts: str,
    db: str,
    before: str,
    name: str,
    password: str,
    encoding: str,
    after: str,
) -> None:
    left, right = f"{scheme}://{login}{hosts}/{db}?{before}{name}=", after
    redacted = assert_redacted(left, encode(password, encoding), right, password)
    assert redacted.startswith(f"{scheme}://")
    if encoding != "raw":
        assert hosts in redacted and f"{name}=***" in redacted


def libpq_quote(password: str) -> str:
    escaped = password.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["host=h ", "host=h port=5432 dbname=app ", ""]),
    st.sampled_from(["password=", "password = ", "password ="]),
    passwords,
    st.booleans(),
    st.sampled_from(["", " sslmode=require", " user=app"]),
)
def test_redact_url_hides_a_password_in_a_key_value_string(
    before: str, keyword: str, password: str, quoted: bool, after: str
) -> None:
    if not quoted:  # libpq ends an unquoted value at whitespace and unescapes backslashes
        assume(not re.search(r"[\s'\\]", password))
    inserted = libpq_quote(password) if quoted else password
    assert_redacted(before + keyword, inserted, after, password)


HOSTS = {
    "db.example.com:5432": [("db.example.com", 5432)],
    "h1:5433,h2:5434": [("h1", 5433), ("h2", 5434)],
    "%2Fvar%2Frun:5435": ["/var/run/.s.PGSQL.5435"],
}


@settings(max_examples=400, deadline=None)
@given(passwords, st.sampled_from(sorted(HOSTS)))
@example("ab?TopSecretChunk42#z", "db.example.com:5432")
@example("a%41b/cd", "db.example.com:5432")
def test_a_url_passes_the_check_only_if_asyncpg_reads_it_as_written(
    password: str, host: str
) -> None:
    """Either the URL is refused, quoting none of the password, or asyncpg finds the
    login, hosts and database where the URL's author put them."""
    url = f"postgresql://app:{password}@{host}/appdb"
    error: ConfigurationError | None = None
    try:
        check_database_url(url)
    except ConfigurationError as exc:
        error = exc
    if error is not None:
        assert not (password.isascii() and password.isalnum()), "a plain password refused"
        assert password not in error_texts(error)
        return
    addrs, params = _parse_connect_dsn_and_args(
        dsn=url, host=None, port=None, user=None, password=None, passfile=None,
        database=None, ssl=None, service=None, servicefile=None, direct_tls=None,
        server_settings=None, target_session_attrs=None, krbsrvname=None, gsslib=None,
    )  # fmt: skip
    assert params.user == "app"
    assert params.password == unquote(password)
    assert params.database == "appdb"
    assert addrs == HOSTS[host]


async def test_cli_status_still_works_with_a_well_formed_database_url(
    database_url: str, tmp_path: Path
) -> None:
    """The check in resolve_database_url lets the CLI's pool and lock URLs through."""
    result = await asyncio.to_thread(run_status, [], {"DATABASE_URL": database_url}, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Schema version: 0" in result.stdout
