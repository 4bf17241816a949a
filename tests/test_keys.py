"""The key CLI: `python -m tenantstore.keys generate [--write PATH]`, and how it treats PATH."""

from __future__ import annotations

import fcntl
import os
import re
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tenantstore import KeyRing
from tenantstore.config import read_env_file
from tenantstore.encryption import generate_encryption_key
from tenantstore.keys import main

KEY_LINE = re.compile(r"ENCRYPTION_KEY=(?P<key>[A-Za-z0-9_-]{43}=)")


def _private(path: Path, content: str | bytes) -> None:
    """Write a key file as `keys generate --write` would accept it: mode 0600."""
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    path.chmod(0o600)


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
    _private(path, existing)
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
    _private(path, original)
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
    _private(path, "DATABASE_URL=x")
    assert main(["generate", "--write", str(path)]) == 0
    lines = path.read_text().splitlines()
    assert lines[0] == "DATABASE_URL=x"
    assert KEY_LINE.fullmatch(lines[1])
    assert read_env_file(path)["DATABASE_URL"] == "x"


def test_generate_write_reports_a_malformed_file_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / ".env"
    _private(path, "A=1\nnot a setting\n")
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
    _private(target, b"OTHER=\xff\xfesecret-bytes\n")
    assert main(["generate", "--write", str(target)]) == 2
    err = capsys.readouterr().err
    assert "not UTF-8" in err and "secret-bytes" not in err
    assert target.read_bytes() == b"OTHER=\xff\xfesecret-bytes\n"


# -- what --write accepts ------------------------------------------------------


def _generate(*args: str) -> subprocess.CompletedProcess[str]:
    # The timeout only stops a hung run from hanging the suite; nothing is timed.
    return subprocess.run(
        [sys.executable, "-m", "tenantstore.keys", "generate", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_write_refuses_a_symlink_and_leaves_its_target_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A symlink at PATH is refused (O_NOFOLLOW): the key never lands in the link's target."""
    target = tmp_path / "elsewhere"
    _private(target, "A=1\n")
    link = tmp_path / ".env.secrets"
    link.symlink_to(target)
    assert main(["generate", "--write", str(link)]) == 2
    assert target.read_text() == "A=1\n"
    assert link.is_symlink()
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"error: {link} is a symbolic link")
    assert "O_NOFOLLOW" in err


def test_write_refuses_a_dangling_symlink_instead_of_creating_its_target(tmp_path: Path) -> None:
    """O_CREAT through a dangling link would create the file wherever the link points."""
    link = tmp_path / ".env.secrets"
    link.symlink_to(tmp_path / "planted")
    assert main(["generate", "--write", str(link), "--if-missing"]) == 2
    assert not (tmp_path / "planted").exists()


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o620, 0o602, 0o610])
@pytest.mark.parametrize("extra", [[], ["--if-missing"]])
def test_write_refuses_a_file_open_to_group_or_others_and_says_how_to_fix_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: int, extra: list[str]
) -> None:
    """Refused, not fixed: the file and its mode stay as they were; the error says `chmod 600`."""
    path = tmp_path / ".env.secrets"
    path.write_text("DATABASE_URL=x\n")
    path.chmod(mode)
    assert main(["generate", "--write", str(path), *extra]) == 2
    assert path.read_text() == "DATABASE_URL=x\n"
    assert _mode(path) == mode
    out, err = capsys.readouterr()
    assert out == ""
    assert f"mode {mode:04o}" in err
    assert f"`chmod 600 {path}`" in err


def test_write_refuses_a_world_readable_file_that_already_has_a_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--if-missing` does not quietly accept an exposed key file: exit 2, not "keeping it"."""
    path = tmp_path / ".env.secrets"
    path.write_text("ENCRYPTION_KEY=AZUpefU1A9gAFD8DbPlHPYnNg-_50MaKr6ObYFI6YRY=\n")
    path.chmod(0o644)
    assert main(["generate", "--write", str(path), "--if-missing"]) == 2
    err = capsys.readouterr().err
    assert "chmod 600" in err and "AZUpefU1A9gAFD8DbPlHPYnNg" not in err


@pytest.mark.parametrize("kind", ["directory", "device"])
def test_write_refuses_what_is_not_a_regular_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    path = tmp_path / "dir" if kind == "directory" else Path(os.devnull)
    if kind == "directory":
        path.mkdir(mode=0o700)
    assert main(["generate", "--write", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert f"{path} is not a regular file" in err
    assert KEY_LINE.search(err) is None


def test_write_refuses_a_fifo_without_blocking_on_it(tmp_path: Path) -> None:
    """Opened with O_NONBLOCK and checked with fstat before any read: a FIFO cannot hang it."""
    path = tmp_path / ".env.secrets"
    os.mkfifo(path, 0o600)
    result = _generate("--write", str(path))
    assert result.returncode == 2
    assert f"{path} is not a regular file" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("umask", [0o277, 0o000, 0o022])
def test_write_creates_the_file_with_mode_0600_whatever_the_umask(
    tmp_path: Path, umask: int
) -> None:
    """0o277 would make it 0400 and 0o000 cannot widen it: the mode is set on the descriptor."""
    path = tmp_path / ".env.secrets"
    previous = os.umask(umask)
    try:
        assert main(["generate", "--write", str(path)]) == 0
    finally:
        os.umask(previous)
    assert _mode(path) == 0o600
    assert KEY_LINE.fullmatch(path.read_text().rstrip("\n"))


def test_write_to_a_missing_directory_is_an_error_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "missing" / ".env.secrets"
    assert main(["generate", "--write", str(path)]) == 2
    assert f"cannot use {path} for keys" in capsys.readouterr().err


# -- locking: checks and writes happen on the locked file ------------------------


@contextmanager
def _locked(path: Path) -> Iterator[int]:
    """Hold an exclusive flock on `path` (as another key command would); yields its inode."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield os.fstat(fd).st_ino
    finally:
        os.close(fd)


def _wait_until_waiting_for_lock(process: subprocess.Popen[str], inode: int) -> None:
    """Poll /proc/locks until `process` is blocked on a lock of `inode`.

    A condition, not a delay: the deadline only turns a bug into a failure.
    """
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"exited before waiting for the lock: {process.communicate()}")
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if "->" in fields and str(process.pid) in fields and fields[-3].endswith(f":{inode}"):
                return
        time.sleep(0.01)
    process.kill()
    pytest.fail("the key command never waited for the lock")


@contextmanager
def _started(*args: str) -> Iterator[subprocess.Popen[str]]:
    """A `keys generate` process, killed on the way out if a failed test left it running."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tenantstore.keys", "generate", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    with process:
        try:
            yield process
        finally:
            if process.poll() is None:
                process.kill()


def test_if_missing_runs_at_once_add_one_key_between_them(tmp_path: Path) -> None:
    """Both runs check under the lock: the second sees the first one's key and keeps it."""
    path = tmp_path / ".env.secrets"
    path.touch(mode=0o600)
    with (
        _started("--write", str(path), "--if-missing") as one,
        _started("--write", str(path), "--if-missing") as two,
    ):
        with _locked(path) as inode:
            _wait_until_waiting_for_lock(one, inode)
            _wait_until_waiting_for_lock(two, inode)
        results = [one.communicate(timeout=60), two.communicate(timeout=60)]
    assert [one.returncode, two.returncode] == [0, 0], results
    assert path.read_text().count("ENCRYPTION_KEY=") == 1
    assert sorted("keeping it" in err for _, err in results) == [False, True]


def test_write_rechecks_a_file_swapped_in_while_it_waited_for_the_lock(tmp_path: Path) -> None:
    """The key goes only into the file it checked: a 0644 file renamed over PATH is refused,
    and the file it first opened (now unlinked) gets nothing either."""
    path = tmp_path / ".env.secrets"
    _private(path, "A=1\n")
    first = os.open(path, os.O_RDONLY)
    try:
        with _started("--write", str(path)) as run:
            with _locked(path) as inode:
                _wait_until_waiting_for_lock(run, inode)
                swapped = tmp_path / "swapped"
                swapped.write_text("B=2\n")
                swapped.chmod(0o644)
                swapped.rename(path)
            _, err = run.communicate(timeout=60)
        assert run.returncode == 2, err
        assert "chmod 600" in err
        assert path.read_text() == "B=2\n"
        assert os.pread(first, 4096, 0) == b"A=1\n"
    finally:
        os.close(first)


def test_rotate_waits_for_the_lock_and_rotates_the_file_it_finds_after(tmp_path: Path) -> None:
    """A rotation that waited while another replaced the file rotates the new file,
    so the key the other one wrote is kept as a previous key, not lost."""
    path = tmp_path / ".env.secrets"
    first_key, second_key = (generate_encryption_key() for _ in range(2))
    _private(path, f"ENCRYPTION_KEY={first_key}\n")
    with _started("--rotate", "--write", str(path)) as run:
        with _locked(path) as inode:
            _wait_until_waiting_for_lock(run, inode)
            rotated = tmp_path / "rotated"
            _private(rotated, f"ENCRYPTION_KEY={second_key}\nOLD_ENCRYPTION_KEY={first_key}\n")
            rotated.rename(path)  # what a concurrent --rotate does, under the lock we hold
        _, err = run.communicate(timeout=60)
    assert run.returncode == 0, err
    settings = read_env_file(path)
    assert settings["ENCRYPTION_KEY"] not in (first_key, second_key)
    assert settings["OLD_ENCRYPTION_KEY"] == f"{second_key},{first_key}"


# -- help ----------------------------------------------------------------------


def test_help_says_what_every_option_does(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["generate", "--help"])
    assert info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    for option, says in [
        ("--write PATH", "add ENCRYPTION_KEY=<key> to this env file"),
        (
            "--if-missing",
            "with --write: do nothing (exit 0) when the file already sets ENCRYPTION_KEY",
        ),
        (
            "--rotate",
            "with --write: move the file's ENCRYPTION_KEY to the front of OLD_ENCRYPTION_KEY",
        ),
    ]:
        assert f"{option} {says}" in help_text, option
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "generate make a new Fernet key" in " ".join(capsys.readouterr().out.split())
