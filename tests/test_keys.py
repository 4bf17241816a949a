"""The key CLI: `python -m tenantstore.keys generate [--write PATH]`."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tenantstore import KeyRing
from tenantstore.config import read_env_file
from tenantstore.keys import main

KEY_LINE = re.compile(r"ENCRYPTION_KEY=(?P<key>[A-Za-z0-9_-]{43}=)")


def _usable(key: str) -> None:
    keyring = KeyRing(key)
    assert keyring.decrypt(keyring.encrypt("probe")) == "probe"


def test_generate_prints_one_usable_key_line_on_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate"]) == 0
    out, err = capsys.readouterr()
    match = KEY_LINE.fullmatch(out.rstrip("\n"))
    assert match is not None, out
    assert out.count("\n") == 1
    _usable(match["key"])
    assert "Back this key up" in err
    assert match["key"] not in err


def test_generate_prints_a_new_key_each_run(capsys: pytest.CaptureFixture[str]) -> None:
    main(["generate"])
    first = capsys.readouterr().out
    main(["generate"])
    assert capsys.readouterr().out != first


def test_generate_write_creates_the_file_with_mode_0600(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / ".env.secrets"
    assert main(["generate", "--write", str(path)]) == 0
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    text = path.read_text()
    match = KEY_LINE.fullmatch(text.rstrip("\n"))
    assert match is not None, text
    assert text.endswith("\n")
    _usable(match["key"])
    out, err = capsys.readouterr()
    assert match["key"] not in out
    assert match["key"] not in err
    assert str(path) in err


def test_generate_write_key_is_what_from_env_reads() -> None:
    assert main(["generate", "--write", ".env.secrets"]) == 0
    key = read_env_file(".env.secrets")["ENCRYPTION_KEY"]
    assert KeyRing(key).decrypt(KeyRing.from_env().encrypt("x")) == "x"


@pytest.mark.parametrize(
    "existing",
    [
        "ENCRYPTION_KEY=AZUpefU1A9gAFD8DbPlHPYnNg-_50MaKr6ObYFI6YRY=\n",
        "# keys\nexport ENCRYPTION_KEY='AZUpefU1A9gAFD8DbPlHPYnNg-_50MaKr6ObYFI6YRY='\n",
        "DATABASE_URL=x\nENCRYPTION_KEY=\n",
    ],
)
def test_generate_write_refuses_a_file_that_already_has_a_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], existing: str
) -> None:
    path = tmp_path / ".env.secrets"
    path.write_text(existing)
    before = path.read_bytes()
    assert main(["generate", "--write", str(path)]) == 2
    assert path.read_bytes() == before
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("error: ")
    assert str(path) in err
    assert "already sets ENCRYPTION_KEY" in err
    assert "AZUpefU1A9gAFD8DbPlHPYnNg" not in err


def test_generate_write_appends_to_a_file_without_a_key_preserving_it(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    original = "# settings\nDATABASE_URL=postgresql://u@h/db\nOLD_ENCRYPTION_KEY=\n"
    path.write_text(original)
    assert main(["generate", "--write", str(path)]) == 0
    text = path.read_text()
    assert text.startswith(original)
    match = KEY_LINE.fullmatch(text[len(original) :].rstrip("\n"))
    assert match is not None, text
    _usable(match["key"])
    settings = read_env_file(path)
    assert settings["DATABASE_URL"] == "postgresql://u@h/db"
    assert settings["ENCRYPTION_KEY"] == match["key"]


def test_generate_write_starts_a_new_line_when_the_file_lacks_a_final_newline(
    tmp_path: Path,
) -> None:
    path = tmp_path / ".env"
    path.write_text("DATABASE_URL=x")
    assert main(["generate", "--write", str(path)]) == 0
    lines = path.read_text().splitlines()
    assert lines[0] == "DATABASE_URL=x"
    assert KEY_LINE.fullmatch(lines[1])
    assert read_env_file(path)["DATABASE_URL"] == "x"


def test_generate_write_reports_a_malformed_file_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / ".env"
    path.write_text("A=1\nnot a setting\n")
    assert main(["generate", "--write", str(path)]) == 2
    assert path.read_text() == "A=1\nnot a setting\n"
    assert f"{path}:2" in capsys.readouterr().err


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_module_runs_as_a_script_and_prints_a_key() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tenantstore.keys", "generate"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    match = KEY_LINE.fullmatch(result.stdout.rstrip("\n"))
    assert match is not None, result.stdout
    _usable(match["key"])


def test_if_missing_keeps_an_existing_key_and_exits_0(tmp_path: Path) -> None:
    """`--if-missing` makes the set-up command safe to rerun: the first key stays."""
    target = tmp_path / ".env.secrets"
    assert main(["generate", "--write", str(target), "--if-missing"]) == 0
    first = target.read_text()
    assert main(["generate", "--write", str(target), "--if-missing"]) == 0
    assert target.read_text() == first
    assert first.count("ENCRYPTION_KEY=") == 1


def test_if_missing_without_write_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as info:
        main(["generate", "--if-missing"])
    assert info.value.code == 2


def test_write_refuses_a_file_that_is_not_utf8_without_echoing_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / ".env.secrets"
    target.write_bytes(b"OTHER=\xff\xfesecret-bytes\n")
    assert main(["generate", "--write", str(target)]) == 2
    err = capsys.readouterr().err
    assert "not UTF-8" in err and "secret-bytes" not in err
    assert target.read_bytes() == b"OTHER=\xff\xfesecret-bytes\n"
