"""Key files: the dotenv files `python -m tenantstore.keys generate --write PATH` writes.

A lost key means lost secrets: every token made with it becomes unreadable.
Back the printed key up in your secrets manager before you use it.

How `--write PATH` treats the file (the same for `--rotate`):

- a symbolic link as the last path component is refused (the file is opened
  with `O_NOFOLLOW`), and so is anything that is not a regular file;
- an existing file that its group or others may read, write or execute is
  refused, not silently fixed: whoever could read it may already have the key,
  so the owner decides (`chmod 600 PATH`, and a new key if it leaked);
- a new file is created with `O_CREAT | O_EXCL` and given mode 0600 exactly,
  whatever the umask;
- every check is made with `fstat` on the opened descriptor, after taking an
  exclusive `flock` on it and confirming the path still names that file, and
  the key goes through that same descriptor (or, for `--rotate`, into a new
  0600 file renamed over it), so nothing can swap the file in between;
- errors are `ConfigurationError`s (exit code 2) and never contain a key.

The text transformations (`append_key_text`, `rotate_env_text`) are pure; the
descriptor handling lives in the private `_KeyFile` helpers.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..config import ENCRYPTION_KEY, OLD_ENCRYPTION_KEY, parse_env_text
from ..encryption import KeyRing
from ..errors import ConfigurationError, InvalidEncryptionKeyError

__all__ = [
    "BACKUP_ADVICE",
    "KeyFileError",
    "KeyFileExistsError",
    "NothingToRotateError",
    "UnsafeKeyFileError",
    "append_key",
    "append_key_text",
    "check_key_file_stat",
    "rotate_env_text",
    "rotate_key_file",
]

BACKUP_ADVICE = (
    "Back this key up in your secrets manager now: if it is lost, "
    "every secret encrypted with it is lost too."
)

# O_NONBLOCK and O_NOCTTY: opening a FIFO or a terminal someone put at the path
# must neither hang nor grab it before fstat shows it is not a regular file.
_OPEN_FLAGS = os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_FILE_MODE = 0o600
# Each retry means another process replaced the file while we waited for its lock.
_MAX_OPEN_ATTEMPTS = 20


class KeyFileError(ConfigurationError):
    """An env file cannot be used to hold keys; the message says why, never what it holds."""


class UnsafeKeyFileError(KeyFileError):
    """The path is a symlink, not a regular file, or open to group or others."""


class KeyFileExistsError(KeyFileError):
    """The env file already holds an `ENCRYPTION_KEY`; overwriting it would lose secrets."""


class NothingToRotateError(KeyFileError):
    """`--rotate` found no `ENCRYPTION_KEY` to move to `OLD_ENCRYPTION_KEY`."""


class _KeyFileMissingError(KeyFileError):
    """The file does not exist and the caller did not ask to create it."""


# -- pure helpers -------------------------------------------------------------


def check_key_file_stat(st: os.stat_result, file: str | os.PathLike[str]) -> None:
    """Refuse a file that is not a regular file or that group or others can access.

    Args:
        st: `os.fstat` of the opened descriptor (not a stat of the path).
        file: the path, for the message.

    Raises:
        UnsafeKeyFileError: not a regular file, or any group/other permission bit is set.
    """
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeKeyFileError(f"{file} is not a regular file; refusing to write a key to it")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise UnsafeKeyFileError(
            f"{file} is accessible to group or others (mode {mode:04o}); refusing to use it "
            f"for keys. Run `chmod 600 {file}` and retry (and treat a key already in it as "
            "exposed)"
        )


def append_key_text(text: str, key: str) -> str:
    """Return what to append to dotenv `text` so that it ends with `ENCRYPTION_KEY=<key>`."""
    separator = "\n" if text and not text.endswith("\n") else ""
    return f"{separator}{ENCRYPTION_KEY}={key}\n"


def rotate_env_text(text: str, new_key: str, *, source: str = "<string>") -> str:
    """Make `new_key` the primary key of dotenv `text`, keeping the current one as previous.

    The current `ENCRYPTION_KEY` goes to the front of `OLD_ENCRYPTION_KEY`
    (comma-separated), followed by the previous keys already there, without
    duplicates. Only the `ENCRYPTION_KEY=` and `OLD_ENCRYPTION_KEY=` lines change
    (keeping their indentation, `export ` prefix and quote character, dropping an
    inline comment); when there is no `OLD_ENCRYPTION_KEY=` line, one is added
    right after the `ENCRYPTION_KEY=` line. Every other line stays byte for byte.

    Args:
        text: the env file's content.
        new_key: the new primary key (a Fernet key not already in `text`).
        source: names the file in error messages.

    Raises:
        ConfigurationError: a line is malformed.
        NothingToRotateError: `text` sets no (or an empty) `ENCRYPTION_KEY`.
        KeyFileError: `text` assigns one of the two settings on more than one
            line, or a key in it is malformed (rotating that would leave a file
            tenantstore cannot load); the message names the setting, not the key.
        InvalidEncryptionKeyError: `new_key` is malformed.
        ValueError: `new_key` is already one of the keys.

    Returns:
        The new text.
    """
    settings = parse_env_text(text, source=source)
    current = settings.get(ENCRYPTION_KEY, "").strip()
    if not current:
        raise NothingToRotateError(f"{source} does not set {ENCRYPTION_KEY}: nothing to rotate")
    previous = [key.strip() for key in settings.get(OLD_ENCRYPTION_KEY, "").split(",")]
    previous = [key for key in previous if key]
    try:
        KeyRing(current, previous)  # rotating a bad key would leave a file from_env rejects
    except InvalidEncryptionKeyError as exc:
        invalid: InvalidEncryptionKeyError | None = exc
    else:
        invalid = None
    if invalid is not None:  # outside the handler: keep the key's parse error out of the chain
        raise KeyFileError(f"{source}: {invalid}; fix it before rotating")
    KeyRing(new_key)
    if new_key in (current, *previous):
        raise ValueError("the new key is already one of the file's keys")
    old = ",".join(dict.fromkeys([current, *previous]))

    lines = text.splitlines(keepends=True)
    key_at = _assigning_lines(lines, ENCRYPTION_KEY, source)
    old_at = _assigning_lines(lines, OLD_ENCRYPTION_KEY, source)
    key_line = lines[key_at[0]]
    lines[key_at[0]] = _assignment_like(key_line, ENCRYPTION_KEY, new_key)
    if old_at:
        lines[old_at[0]] = _assignment_like(lines[old_at[0]], OLD_ENCRYPTION_KEY, old)
    else:
        lines.insert(key_at[0] + 1, _assignment_like(key_line, OLD_ENCRYPTION_KEY, old))
    result = "".join(lines)

    # Read it back as from_env will: a key file is the wrong place to find a bug later.
    expected = {**settings, ENCRYPTION_KEY: new_key, OLD_ENCRYPTION_KEY: old}
    if parse_env_text(result, source=source) != expected:
        raise RuntimeError(f"rewriting {source} would not give the intended settings")
    return result


def _assigning_lines(lines: list[str], name: str, source: str) -> list[int]:
    """Indexes of the lines that assign `name` (at most one, else KeyFileError)."""
    found = [i for i, line in enumerate(lines) if name in parse_env_text(line, source=source)]
    if len(found) > 1:
        numbers = ", ".join(str(i + 1) for i in found)
        raise KeyFileError(
            f"{source} sets {name} on more than one line ({numbers}); keep one and retry"
        )
    return found


def _assignment_like(line: str, name: str, value: str) -> str:
    """`name=value` written in the style of `line` (indent, `export `, quotes, line end)."""
    content = line.splitlines()[0] if line.splitlines() else ""
    ending = line[len(content) :] or "\n"
    indent = content[: len(content) - len(content.lstrip())]
    body = content.strip()
    export = "export " if body.startswith("export ") else ""
    raw_value = body[len(export) :].partition("=")[2].strip()
    parsed = parse_env_text(content).get(name, "")
    # Keep the quote only where the parser honoured it (the parsed value lost it).
    quote = (
        raw_value[:1]
        if raw_value[:1] in ("'", '"') and not parsed.startswith(raw_value[:1])
        else ""
    )
    return f"{indent}{export}{name}={quote}{value}{quote}{ending}"


# -- file handling --------------------------------------------------------------


@dataclass(frozen=True)
class _KeyFile:
    """An env file opened, locked and checked; `fd` and `dir_fd` close on leaving."""

    path: Path
    dir_fd: int
    name: str
    fd: int
    st: os.stat_result
    created: bool


@contextlib.contextmanager
def _locked_key_file(file: Path, *, create: bool) -> Iterator[_KeyFile]:
    """Open `file` (creating it 0600 if `create`), lock it, check it with fstat.

    The lock is taken before the last check, and the path must still name the
    locked file afterwards: a `--rotate` in another process renames a new file
    over it, and whoever waited on the old one must start again on the new one.

    Raises:
        UnsafeKeyFileError, KeyFileError, OSError.
    """
    if file.name in ("", ".", ".."):
        raise UnsafeKeyFileError(f"{file} is not a regular file; refusing to write a key to it")
    dir_fd = os.open(file.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for _ in range(_MAX_OPEN_ATTEMPTS):
            opened = _open_or_create(dir_fd, file, create=create)
            if opened is None:
                continue  # another process created it first: open theirs
            fd, created = opened
            try:
                check_key_file_stat(os.fstat(fd), file)  # before blocking on someone's lock
                fcntl.flock(fd, fcntl.LOCK_EX)
                st = os.fstat(fd)
                check_key_file_stat(st, file)
                if _still_at_path(dir_fd, file.name, st):
                    yield _KeyFile(file, dir_fd, file.name, fd, st, created)
                    return
            finally:
                os.close(fd)
        raise KeyFileError(f"{file} kept being replaced while waiting for its lock; try again")
    finally:
        os.close(dir_fd)


def _open_or_create(dir_fd: int, file: Path, *, create: bool) -> tuple[int, bool] | None:
    """Open the existing file, or create it (O_EXCL, mode 0600); None if we lost a race."""
    try:
        return os.open(file.name, _OPEN_FLAGS, dir_fd=dir_fd), False
    except FileNotFoundError:
        if not create:
            raise _KeyFileMissingError(f"{file} does not exist") from None
    try:
        fd = os.open(file.name, _OPEN_FLAGS | os.O_CREAT | os.O_EXCL, _FILE_MODE, dir_fd=dir_fd)
    except FileExistsError:
        return None
    try:
        os.fchmod(fd, _FILE_MODE)  # the umask may have removed bits the owner needs
    except BaseException:
        os.close(fd)
        raise
    return fd, True


def _still_at_path(dir_fd: int, name: str, st: os.stat_result) -> bool:
    """Whether `name` in the directory is still the file `st` describes (not a new one)."""
    try:
        now = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


def _read_text(key_file: _KeyFile) -> str:
    """The whole file, decoded; refuses non-UTF-8 without echoing its bytes."""
    chunks: list[bytes] = []
    while chunk := os.read(key_file.fd, 1 << 16):
        chunks.append(chunk)
    try:
        text: str | None = b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None:  # raised outside the handler: the decode error holds the bytes
        raise KeyFileError(f"{key_file.path} is not UTF-8 text")
    return text


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _replace(key_file: _KeyFile, data: bytes) -> None:
    """Replace the locked file by a new 0600 file holding `data`: old or new, never half.

    The new file is written and fsynced under a temporary name in the same
    directory, renamed over the old one, and the directory is fsynced.
    """
    temp = f".{key_file.name}.{secrets.token_hex(8)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temp, flags, _FILE_MODE, dir_fd=key_file.dir_fd)
    try:
        try:
            os.fchmod(fd, _FILE_MODE)
            _keep_owner(fd, key_file)
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temp, key_file.name, src_dir_fd=key_file.dir_fd, dst_dir_fd=key_file.dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp, dir_fd=key_file.dir_fd)
        raise
    os.fsync(key_file.dir_fd)


def _keep_owner(fd: int, key_file: _KeyFile) -> None:
    """Give the new file the old one's owner, so root rotating it does not lock the app out."""
    new = os.fstat(fd)
    old = key_file.st
    if (new.st_uid, new.st_gid) == (old.st_uid, old.st_gid):
        return
    try:
        os.fchown(fd, old.st_uid, old.st_gid)
    except PermissionError:
        raise KeyFileError(
            f"cannot give the rotated {key_file.path} its current owner; run this as that user"
        ) from None


def _os_error(exc: OSError, file: Path) -> KeyFileError:
    """Our error for an OS error on `file` (it names the path only, never content)."""
    if exc.errno == errno.ELOOP:
        return UnsafeKeyFileError(
            f"{file} is a symbolic link; refusing to follow it (key files are opened with "
            "O_NOFOLLOW): pass the path of the file itself"
        )
    if exc.errno in (errno.EISDIR, errno.ENXIO):
        return UnsafeKeyFileError(f"{file} is not a regular file; refusing to write a key to it")
    return KeyFileError(f"cannot use {file} for keys: {exc.strerror or type(exc).__name__}")


# -- public operations -----------------------------------------------------------


def append_key(path: str | os.PathLike[str], key: str, *, if_missing: bool = False) -> bool:
    """Append `ENCRYPTION_KEY=<key>` to a dotenv file, creating it with mode 0600.

    The check and the append happen under an exclusive lock on the file, so two
    runs at once cannot both add a key. The file is refused rather than fixed
    when it is a symlink, not a regular file, or open to group or others (see
    the module docstring). Returns whether the key was written.

    Raises:
        KeyFileExistsError: the file already sets `ENCRYPTION_KEY` (unless `if_missing`,
            which returns False instead).
        UnsafeKeyFileError: the file is refused as above.
        KeyFileError: the file cannot be opened, read or written, or is not UTF-8.
        ConfigurationError: a line of the file is malformed.
    """
    file = Path(path)
    try:
        with _locked_key_file(file, create=True) as key_file:
            text = _read_text(key_file)
            if ENCRYPTION_KEY in parse_env_text(text, source=str(file)):
                if if_missing:
                    return False
                raise KeyFileExistsError(
                    f"{file} already sets {ENCRYPTION_KEY}; refusing to replace it "
                    "(to rotate, run `python -m tenantstore.keys generate --rotate "
                    f"--write {file}`)"
                )
            _write_all(key_file.fd, append_key_text(text, key).encode())
            os.fsync(key_file.fd)
            if key_file.created:
                os.fsync(key_file.dir_fd)
    except OSError as exc:
        raise _os_error(exc, file) from None
    return True


def rotate_key_file(path: str | os.PathLike[str], key: str) -> None:
    """Rotate the keys of a dotenv file: `key` becomes primary, the old primary previous.

    Under the same lock as `append_key`, the file is rewritten by
    `rotate_env_text` and replaced atomically (see `_replace`).

    Raises:
        NothingToRotateError: the file does not exist or sets no `ENCRYPTION_KEY`.
        UnsafeKeyFileError: the file is a symlink, not a regular file, or open to
            group or others.
        KeyFileError: the file cannot be read or replaced, is not UTF-8, or sets a
            key on more than one line.
        ConfigurationError: a line is malformed or a key in the file is invalid.
    """
    file = Path(path)
    try:
        with _locked_key_file(file, create=False) as key_file:
            text = rotate_env_text(_read_text(key_file), key, source=str(file))
            _replace(key_file, text.encode())
    except _KeyFileMissingError:
        raise NothingToRotateError(f"{file} does not exist: nothing to rotate") from None
    except OSError as exc:
        raise _os_error(exc, file) from None
