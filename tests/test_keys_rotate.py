"""`python -m tenantstore.keys generate --rotate --write PATH` and `rotate_env_text`."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tenantstore import KeyRing
from tenantstore.config import parse_env_text, read_env_file
from tenantstore.encryption import generate_encryption_key
from tenantstore.errors import ConfigurationError
from tenantstore.keys import KeyFileError, NothingToRotateError, main, rotate_env_text

K0, K1, K2 = (generate_encryption_key() for _ in range(3))


def _private(path: Path, content: str) -> None:
    path.write_text(content)
    path.chmod(0o600)


# -- rotate_env_text (pure) ----------------------------------------------------


def test_rotation_moves_the_key_to_a_new_old_line_right_after_it_and_keeps_the_rest() -> None:
    text = f"# settings\nDATABASE_URL=postgresql://u@h/db\n\nENCRYPTION_KEY={K1}\nOTHER=y # note\n"
    assert rotate_env_text(text, K2) == (
        f"# settings\nDATABASE_URL=postgresql://u@h/db\n\n"
        f"ENCRYPTION_KEY={K2}\nOLD_ENCRYPTION_KEY={K1}\nOTHER=y # note\n"
    )


def test_rotation_puts_the_key_first_among_old_keys_without_duplicates() -> None:
    """Existing previous keys stay, after the one just replaced, each once."""
    text = f"OLD_ENCRYPTION_KEY={K0}, {K1},{K0}\nENCRYPTION_KEY={K1}\n"
    rotated = rotate_env_text(text, K2)
    assert rotated == f"OLD_ENCRYPTION_KEY={K1},{K0}\nENCRYPTION_KEY={K2}\n"
    ring = KeyRing.from_env(environ=parse_env_text(rotated), env_file=None)
    assert ring.previous_count == 2
    assert ring.key_index(KeyRing(K1).encrypt("x")) == 1
    assert ring.key_index(KeyRing(K0).encrypt("x")) == 2


def test_rotation_replaces_an_empty_old_line_in_place() -> None:
    text = f"ENCRYPTION_KEY={K1}\nA=1\nOLD_ENCRYPTION_KEY=\n"
    assert rotate_env_text(text, K2) == f"ENCRYPTION_KEY={K2}\nA=1\nOLD_ENCRYPTION_KEY={K1}\n"


def test_rotation_keeps_indent_export_quotes_and_line_endings_of_the_lines_it_replaces() -> None:
    """Only the value changes (an inline comment on a replaced line goes with the old value)."""
    text = (
        f"  export ENCRYPTION_KEY='{K1}'  # primary\r\nexport OLD_ENCRYPTION_KEY=\"{K0}\"\r\n# end"
    )
    assert rotate_env_text(text, K2) == (
        f"  export ENCRYPTION_KEY='{K2}'\r\nexport OLD_ENCRYPTION_KEY=\"{K1},{K0}\"\r\n# end"
    )


def test_an_added_old_line_follows_the_key_lines_style() -> None:
    text = f'export ENCRYPTION_KEY="{K1}"'
    assert rotate_env_text(text, K2) == (
        f'export ENCRYPTION_KEY="{K2}"\nexport OLD_ENCRYPTION_KEY="{K1}"\n'
    )


@pytest.mark.parametrize("text", ["", "A=1\n", "ENCRYPTION_KEY=\n", "ENCRYPTION_KEY=''\n"])
def test_rotation_without_a_key_is_refused(text: str) -> None:
    with pytest.raises(NothingToRotateError, match="nothing to rotate"):
        rotate_env_text(text, K2, source=".env.secrets")


@pytest.mark.parametrize("name", ["ENCRYPTION_KEY", "OLD_ENCRYPTION_KEY"])
def test_rotation_refuses_a_setting_assigned_on_two_lines(name: str) -> None:
    """Which line to rewrite would be a guess; the message gives the line numbers, no values."""
    text = f"ENCRYPTION_KEY={K1}\nA=1\n{name}={K0}\n"
    if name == "OLD_ENCRYPTION_KEY":
        text += f"{name}={K0}\n"
    with pytest.raises(KeyFileError, match=f" sets {name} on more than one line") as info:
        rotate_env_text(text, K2, source=".env.secrets")
    assert K0 not in str(info.value) and K1 not in str(info.value)


@pytest.mark.parametrize(
    ("text", "setting"),
    [
        ("ENCRYPTION_KEY=not-a-fernet-key\n", "ENCRYPTION_KEY"),
        (f"ENCRYPTION_KEY={K1}\nOLD_ENCRYPTION_KEY={K0},not-a-fernet-key\n", "[1]"),
    ],
)
def test_rotation_refuses_an_invalid_key_naming_the_setting_only(text: str, setting: str) -> None:
    """Rotating a broken key would write a file that KeyRing.from_env rejects."""
    with pytest.raises(KeyFileError, match="fix it before rotating") as info:
        rotate_env_text(text, K2, source=".env.secrets")
    assert setting in str(info.value)
    assert "not-a-fernet-key" not in str(info.value)
    assert info.value.__cause__ is None and info.value.__context__ is None


def test_rotation_refuses_a_new_key_that_is_already_in_the_file() -> None:
    with pytest.raises(ValueError, match="already one of"):
        rotate_env_text(f"ENCRYPTION_KEY={K1}\nOLD_ENCRYPTION_KEY={K0}\n", K0)


def test_rotation_reports_a_malformed_line_by_number_without_echoing_it() -> None:
    pasted = K0.rstrip("=")  # a key pasted without its name: no `=`, so never a setting
    with pytest.raises(ConfigurationError, match=r"\.env\.secrets:2") as info:
        rotate_env_text(f"ENCRYPTION_KEY={K1}\n{pasted}\n", K2, source=".env.secrets")
    assert pasted not in str(info.value)


# -- the command ---------------------------------------------------------------


@pytest.mark.parametrize("args", [["--rotate"], ["--rotate", "--write", "f", "--if-missing"]])
def test_rotate_needs_write_and_excludes_if_missing(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["generate", *args])
    assert info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_rotate_writes_the_file_atomically_with_mode_0600_and_prints_no_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A new 0600 file is renamed over the old one (new inode, no temporary file left),
    whatever the umask; stderr says what happened, stdout stays empty."""
    path = tmp_path / ".env.secrets"
    _private(path, f"# keys\nENCRYPTION_KEY={K1}\n")
    before = os.stat(path).st_ino
    previous_umask = os.umask(0o277)
    try:
        assert main(["generate", "--rotate", "--write", str(path)]) == 0
    finally:
        os.umask(previous_umask)
    assert os.stat(path).st_ino != before
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == [".env.secrets"]
    settings = read_env_file(path)
    assert settings["OLD_ENCRYPTION_KEY"] == K1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(
        "Moved the previous ENCRYPTION_KEY to OLD_ENCRYPTION_KEY and wrote a new "
        f"ENCRYPTION_KEY to {path}. Back this key up"
    )
    assert K1 not in err and settings["ENCRYPTION_KEY"] not in err


@pytest.mark.parametrize("content", [None, "DATABASE_URL=x\n", "ENCRYPTION_KEY=\n"])
def test_rotate_with_nothing_to_rotate_exits_2_and_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None
) -> None:
    path = tmp_path / ".env.secrets"
    if content is not None:
        _private(path, content)
    assert main(["generate", "--rotate", "--write", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"error: {path} ")
    assert "nothing to rotate" in err
    if content is None:
        assert not path.exists()
    else:
        assert path.read_text() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if content is None else [path.name])


def test_rotate_refuses_a_symlink_and_a_file_open_to_others(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same refusals as `--write` alone: nothing is read from or renamed over them."""
    exposed = tmp_path / "exposed"
    exposed.write_text(f"ENCRYPTION_KEY={K1}\n")
    exposed.chmod(0o644)
    assert main(["generate", "--rotate", "--write", str(exposed)]) == 2
    assert f"chmod 600 {exposed}" in capsys.readouterr().err
    target = tmp_path / "target"
    _private(target, f"ENCRYPTION_KEY={K1}\n")
    link = tmp_path / ".env.secrets"
    link.symlink_to(target)
    assert main(["generate", "--rotate", "--write", str(link)]) == 2
    assert "symbolic link" in capsys.readouterr().err
    assert link.is_symlink()
    assert exposed.read_text() == target.read_text() == f"ENCRYPTION_KEY={K1}\n"


def _keys_cli(*args: str) -> subprocess.CompletedProcess[str]:
    # The timeout only keeps a hung run from hanging the suite; nothing is timed.
    return subprocess.run(
        [sys.executable, "-m", "tenantstore.keys", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_readme_set_up_then_rotation_from_the_env_file(tmp_path: Path) -> None:
    """As the README does it: generate into .env.secrets, then rotate that file.

    The application's KeyRing then has a new primary, the old key as first
    previous key (so tokens made before still decrypt), and the file stays 0600.
    """
    secrets = tmp_path / ".env.secrets"
    created = _keys_cli("generate", "--write", ".env.secrets", "--if-missing")
    assert created.returncode == 0, created.stderr
    original_key = read_env_file(secrets)["ENCRYPTION_KEY"]
    before = KeyRing.from_env(env_file=secrets)
    token = before.encrypt("gemini-key")

    rotated = _keys_cli("generate", "--rotate", "--write", ".env.secrets")
    assert rotated.returncode == 0, rotated.stderr
    assert rotated.stdout == ""
    assert "Moved the previous ENCRYPTION_KEY to OLD_ENCRYPTION_KEY" in rotated.stderr

    settings = read_env_file(secrets)
    assert settings["ENCRYPTION_KEY"] != original_key
    assert settings["OLD_ENCRYPTION_KEY"] == original_key
    assert original_key not in rotated.stderr and settings["ENCRYPTION_KEY"] not in rotated.stderr
    after = KeyRing.from_env(env_file=secrets)
    assert after.previous_count == 1
    assert after.decrypt_with_key_index(token) == ("gemini-key", 1)
    assert after.key_index(after.encrypt("new")) == 0
    assert stat.S_IMODE(os.stat(secrets).st_mode) == 0o600

    again = _keys_cli("generate", "--rotate", "--write", ".env.secrets")
    assert again.returncode == 0, again.stderr
    twice = read_env_file(secrets)
    assert twice["OLD_ENCRYPTION_KEY"] == f"{settings['ENCRYPTION_KEY']},{original_key}"
    assert KeyRing.from_env(env_file=secrets).decrypt_with_key_index(token) == ("gemini-key", 2)
