"""Settings: dotenv parsing, file reading and environment-over-file precedence."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tenantstore import ConfigurationError, EncryptionKeyMissingError, KeyRing, TenantStoreError
from tenantstore.config import (
    DEFAULT_ENV_FILES,
    EmptySettingError,
    list_setting,
    load_settings,
    nonblank_setting,
    parse_env_text,
    read_env_file,
)

FERNET_KEY = "AZUpefU1A9gAFD8DbPlHPYnNg-_50MaKr6ObYFI6YRY="


# -- parse_env_text --------------------------------------------------------------


def test_parse_reads_key_value_lines() -> None:
    assert parse_env_text("A=1\nB=two\n") == {"A": "1", "B": "two"}


def test_parse_skips_comments_and_blank_lines() -> None:
    text = "# a comment\n\n   \n  # indented comment\nA=1\n\n"
    assert parse_env_text(text) == {"A": "1"}


def test_parse_accepts_an_export_prefix() -> None:
    assert parse_env_text("export A=1\nexport   B=2") == {"A": "1", "B": "2"}


@pytest.mark.parametrize(
    ("line", "value"),
    [
        ('A="double quoted"', "double quoted"),
        ("A='single quoted'", "single quoted"),
        ('A="has # hash"', "has # hash"),
        ('A=""', ""),
        ("A=''", ""),
        ("A=\"mismatched'", "\"mismatched'"),
        ('A="', '"'),
    ],
)
def test_parse_strips_one_pair_of_matching_quotes(line: str, value: str) -> None:
    assert parse_env_text(line) == {"A": value}


def test_parse_drops_an_inline_comment_after_whitespace() -> None:
    assert parse_env_text("A=value # note\nB=a#b") == {"A": "value", "B": "a#b"}


def test_parse_strips_quotes_before_an_inline_comment() -> None:
    assert parse_env_text('A="value" # note') == {"A": "value"}


def test_parse_keeps_equals_signs_in_the_value() -> None:
    assert parse_env_text(f"ENCRYPTION_KEY={FERNET_KEY}") == {"ENCRYPTION_KEY": FERNET_KEY}


def test_parse_strips_whitespace_around_name_and_value() -> None:
    assert parse_env_text("  A  =  spaced value  \r\n") == {"A": "spaced value"}


def test_parse_allows_an_empty_value() -> None:
    assert parse_env_text("A=") == {"A": ""}


def test_parse_later_line_wins_for_a_repeated_name() -> None:
    assert parse_env_text("A=1\nA=2") == {"A": "2"}


@pytest.mark.parametrize(
    ("text", "lineno"),
    [
        ("no equals sign", 1),
        ("A=1\n\n# c\nENCRYPTION_KEY " + FERNET_KEY, 4),
        (f"={FERNET_KEY}", 1),
        (f"BAD-NAME={FERNET_KEY}", 1),
        (f"A=1\nENCRYPTION_KEY: {FERNET_KEY}", 2),
        (f"A B={FERNET_KEY}", 1),
    ],
)
def test_malformed_line_names_source_and_line_without_echoing_it(text: str, lineno: int) -> None:
    with pytest.raises(ConfigurationError) as info:
        parse_env_text(text, source="conf/.env.secrets")
    message = str(info.value)
    assert message.endswith(f" at conf/.env.secrets:{lineno}")
    assert FERNET_KEY[:20] not in message
    bad_line = text.splitlines()[lineno - 1]
    assert bad_line not in message
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, TenantStoreError)


def test_parse_accepts_a_leading_byte_order_mark() -> None:
    """Some Windows editors start UTF-8 files with U+FEFF; it is not part of line 1's name."""
    assert parse_env_text("\ufeffA=1\nB=2") == {"A": "1", "B": "2"}
    assert parse_env_text("\ufeff# keys\nA=1") == {"A": "1"}


def test_parse_still_rejects_a_byte_order_mark_inside_the_text() -> None:
    with pytest.raises(ConfigurationError, match=r"at <string>:2$"):
        parse_env_text("A=1\n\ufeffB=2")


def test_malformed_line_default_source_is_string() -> None:
    with pytest.raises(ConfigurationError, match=r"at <string>:1$"):
        parse_env_text("oops")


# -- read_env_file ---------------------------------------------------------------


def test_read_missing_file_gives_no_settings(tmp_path: Path) -> None:
    assert read_env_file(tmp_path / "absent.env") == {}


def test_read_file_parses_it(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text("# db\nDATABASE_URL=postgresql://u@h/db\n", encoding="utf-8")
    assert read_env_file(path) == {"DATABASE_URL": "postgresql://u@h/db"}


def test_read_file_error_names_the_file_path(tmp_path: Path) -> None:
    path = tmp_path / ".env.secrets"
    path.write_text("A=1\nbroken line\n", encoding="utf-8")
    with pytest.raises(ConfigurationError) as info:
        read_env_file(path)
    assert str(info.value).endswith(f" at {path}:2")
    assert "broken line" not in str(info.value)


def test_read_file_accepts_a_utf8_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / ".env.secrets"
    path.write_bytes(b"\xef\xbb\xbfENCRYPTION_KEY=" + FERNET_KEY.encode() + b"\n")
    assert read_env_file(path) == {"ENCRYPTION_KEY": FERNET_KEY}


# -- load_settings ---------------------------------------------------------------


def test_default_env_files_are_env_then_env_secrets() -> None:
    assert DEFAULT_ENV_FILES == (".env", ".env.secrets")


def test_load_settings_later_file_wins_over_earlier(tmp_path: Path) -> None:
    first, second = tmp_path / "a.env", tmp_path / "b.env"
    first.write_text("A=first\nONLY_FIRST=1\n")
    second.write_text("A=second\nONLY_SECOND=2\n")
    settings = load_settings({}, [first, second])
    assert settings == {"A": "second", "ONLY_FIRST": "1", "ONLY_SECOND": "2"}


def test_load_settings_environment_wins_over_every_file(tmp_path: Path) -> None:
    first, second = tmp_path / "a.env", tmp_path / "b.env"
    first.write_text("A=first\n")
    second.write_text("A=second\nB=file\n")
    settings = load_settings({"A": "env"}, [first, second])
    assert settings == {"A": "env", "B": "file"}


def test_load_settings_empty_environment_value_still_wins(tmp_path: Path) -> None:
    path = tmp_path / "a.env"
    path.write_text("A=file\n")
    assert load_settings({"A": ""}, [path])["A"] == ""


def test_load_settings_skips_missing_files(tmp_path: Path) -> None:
    assert load_settings({"A": "1"}, [tmp_path / "nope", tmp_path / "nope2"]) == {"A": "1"}


def test_load_settings_defaults_to_os_environ_and_cwd_files(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    Path(".env").write_text("DATABASE_URL=from-dotenv\nA=env-file\n")
    Path(".env.secrets").write_text("A=secrets-file\nENCRYPTION_KEY=from-file\n")
    monkeypatch.setenv("ENCRYPTION_KEY", "from-process")
    settings = load_settings()
    assert settings["DATABASE_URL"] == "from-dotenv"
    assert settings["A"] == "secrets-file"
    assert settings["ENCRYPTION_KEY"] == "from-process"


def test_load_settings_does_not_modify_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "a.env"
    path.write_text("A=file\n")
    environ = {"B": "env"}
    load_settings(environ, [path])
    assert environ == {"B": "env"}
    monkeypatch.delenv("A", raising=False)
    load_settings(None, [path])
    assert "A" not in os.environ


# -- set but empty ---------------------------------------------------------------


@pytest.mark.parametrize("value", ["", "   ", "\t"])
def test_nonblank_setting_refuses_a_blank_value_and_names_the_setting(value: str) -> None:
    with pytest.raises(EmptySettingError) as info:
        nonblank_setting({"ENCRYPTION_KEY": value}, "ENCRYPTION_KEY")
    assert str(info.value).startswith("ENCRYPTION_KEY is set but empty")
    assert info.value.setting == "ENCRYPTION_KEY"
    assert isinstance(info.value, ConfigurationError)
    assert not isinstance(info.value, EncryptionKeyMissingError)


def test_nonblank_setting_tells_absent_from_present() -> None:
    assert nonblank_setting({}, "A") is None
    assert nonblank_setting({"A": " v "}, "A") == "v"


@pytest.mark.parametrize(
    ("value", "setting"),
    [("", "OLD"), (" , ", "OLD"), (",", "OLD"), ("k1,", "OLD[1]"), ("k1,,k2", "OLD[1]")],
)
def test_list_setting_refuses_a_blank_list_or_entry(value: str, setting: str) -> None:
    with pytest.raises(EmptySettingError) as info:
        list_setting({"OLD": value}, "OLD")
    assert info.value.setting == setting
    assert str(info.value).startswith(f"{setting} is set but empty")


def test_list_setting_reads_entries_and_an_absent_list() -> None:
    assert list_setting({}, "OLD") == []
    assert list_setting({"OLD": " k1 , k2 "}, "OLD") == ["k1", "k2"]


@pytest.mark.parametrize(
    ("environment", "secrets_file", "setting"),
    [
        ({"ENCRYPTION_KEY": ""}, None, "ENCRYPTION_KEY"),
        ({}, "ENCRYPTION_KEY=\n", "ENCRYPTION_KEY"),
        ({}, 'export ENCRYPTION_KEY=""\n', "ENCRYPTION_KEY"),
        ({"ENCRYPTION_KEY": FERNET_KEY, "OLD_ENCRYPTION_KEY": ""}, None, "OLD_ENCRYPTION_KEY"),
        ({"ENCRYPTION_KEY": FERNET_KEY, "OLD_ENCRYPTION_KEY": " , "}, None, "OLD_ENCRYPTION_KEY"),
        ({"ENCRYPTION_KEY": FERNET_KEY}, 'OLD_ENCRYPTION_KEY=""\n', "OLD_ENCRYPTION_KEY"),
        (
            {"ENCRYPTION_KEY": FERNET_KEY, "OLD_ENCRYPTION_KEY": f"{FERNET_KEY},"},
            None,
            "OLD_ENCRYPTION_KEY[1]",
        ),
    ],
)
def test_from_env_refuses_a_key_setting_that_is_set_but_empty(
    monkeypatch: pytest.MonkeyPatch,
    environment: dict[str, str],
    secrets_file: str | None,
    setting: str,
) -> None:
    """Not "not set", and not ignored: `export OLD_ENCRYPTION_KEY="$UNSET"` is a mistake."""
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    if secrets_file is not None:
        Path(".env.secrets").write_text(secrets_file)
    with pytest.raises(EmptySettingError) as info:
        KeyRing.from_env()
    assert info.value.setting == setting
    assert str(info.value).startswith(f"{setting} is set but empty")
    assert "not set" not in str(info.value)
    assert FERNET_KEY[2:40] not in str(info.value)


def test_from_env_still_reports_a_truly_unset_key_as_missing() -> None:
    with pytest.raises(
        EncryptionKeyMissingError, match="ENCRYPTION_KEY environment variable not set"
    ):
        KeyRing.from_env()


def run_status(env: dict[str, str], url: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tenantstore.migrate", "status", "--database-url", url],
        env={**os.environ, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("env", "secrets_file", "setting"),
    [
        ({"ENCRYPTION_KEY": ""}, None, "ENCRYPTION_KEY"),
        ({}, "ENCRYPTION_KEY=\n", "ENCRYPTION_KEY"),
        ({"ENCRYPTION_KEY": FERNET_KEY, "OLD_ENCRYPTION_KEY": ""}, None, "OLD_ENCRYPTION_KEY"),
        ({"ENCRYPTION_KEY": FERNET_KEY, "OLD_ENCRYPTION_KEY": " , "}, None, "OLD_ENCRYPTION_KEY"),
    ],
)
async def test_cli_status_exits_2_on_an_empty_key_setting_instead_of_running_without_it(
    database_url: str,
    tmp_path: Path,
    env: dict[str, str],
    secrets_file: str | None,
    setting: str,
) -> None:
    """`status` tolerates a missing ENCRYPTION_KEY; an empty one is a mistake it reports."""
    if secrets_file is not None:
        (tmp_path / ".env.secrets").write_text(secrets_file)
    result = await asyncio.to_thread(run_status, env, database_url, tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert (
        result.stderr
        == f"error: {setting} is set but empty: give it a value or remove the setting\n"
    )
    assert result.stdout == ""
