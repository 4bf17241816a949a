"""Settings from the process environment and dotenv files.

Only the `from_env()` constructors elsewhere call into this module; nothing
here is cached at import time. The process environment always wins over a
file, and a missing file is simply empty.

Settings read: `DATABASE_URL` (from `.env`), `ENCRYPTION_KEYS`, or
`ENCRYPTION_KEY` and `OLD_ENCRYPTION_KEY` (from `.env.secrets`, or `.env`),
each also as `NAME_FILE`: the path of a file holding the value (a Docker or
Kubernetes secret mount), read by `file_setting`.

A setting that is present but blank (`ENCRYPTION_KEY=`, or what
`export OLD_ENCRYPTION_KEY="$UNSET"` leaves) is an `EmptySettingError`, never
taken for an absent one: `nonblank_setting` and `list_setting` say which.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

from .errors import ConfigurationError, EmptySettingError, EncryptionKeyMissingError

__all__ = [
    "DEFAULT_ENV_FILES",
    "EmptySecretFileError",
    "EmptySettingError",
    "UnsafeSecretFileError",
    "configured_keys",
    "fernet_setting",
    "file_setting",
    "list_setting",
    "load_settings",
    "nonblank_setting",
    "parse_env_text",
    "read_env_file",
    "read_secret_file",
    "split_list",
]

DEFAULT_ENV_FILES: tuple[str, ...] = (".env", ".env.secrets")

ENCRYPTION_KEY = "ENCRYPTION_KEY"
OLD_ENCRYPTION_KEY = "OLD_ENCRYPTION_KEY"
ENCRYPTION_KEYS = "ENCRYPTION_KEYS"
TENANTSTORE_FERNET = "TENANTSTORE_FERNET"

FernetImplementation = Literal["batch", "pyca"]

FILE_SUFFIX = "_FILE"
# A secret file holds one key or a short list: anything larger is not one.
_MAX_SECRET_FILE = 64 * 1024


class UnsafeSecretFileError(ConfigurationError):
    """A `NAME_FILE` setting names a file group or others can access, or not a regular file."""


class EmptySecretFileError(EmptySettingError):
    """A `NAME_FILE` setting names a file that holds nothing but whitespace.

    Attributes:
        setting: the `NAME_FILE` setting.
    """

    def __init__(self, setting: str, path: str) -> None:
        self.setting = setting
        ConfigurationError.__init__(
            self, f"{path} (from {setting}) is empty: put the value in it or remove the setting"
        )


def parse_env_text(text: str, *, source: str = "<string>") -> dict[str, str]:
    """Parse dotenv text: `KEY=VALUE` lines, `#` comments, optional `export` and quotes.

    Raises:
        ConfigurationError: a line is not `KEY=VALUE`; the message names the
            source and line number but never echoes the line, which may hold a key.
    """
    values: dict[str, str] = {}
    text = text.removeprefix("\ufeff")  # a byte order mark, as some Windows editors write
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        name, sep, value = line.partition("=")
        name = name.strip()
        if not sep or not name.replace("_", "").isalnum():
            raise ConfigurationError(f"malformed line (expected KEY=VALUE) at {source}:{lineno}")
        values[name] = _unquote(value.strip())
    return values


def _unquote(value: str) -> str:
    """`"v" # note` -> `v`; `'v'` -> `v`; `v # note` -> `v`."""
    if value[:1] in ("'", '"'):
        end = value.find(value[0], 1)
        if end > 0 and (value[end + 1 :].strip() == "" or value[end + 1 :].lstrip()[:1] == "#"):
            return value[1:end]
    if " #" in value:
        value = value.split(" #", 1)[0].rstrip()
    return value


def read_env_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read one dotenv file; a file that does not exist yields no settings."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except UnicodeDecodeError:
        text = None
    if text is None:
        # Raised outside the handler: the decode error carries the file's bytes,
        # keys included, and would stay reachable as __context__.
        raise ConfigurationError(f"{file} is not UTF-8 text")
    return parse_env_text(text, source=str(file))


def load_settings(
    environ: Mapping[str, str] | None = None,
    env_files: Iterable[str | os.PathLike[str]] = DEFAULT_ENV_FILES,
) -> dict[str, str]:
    """Merge dotenv files (later files win) under the environment (which wins over all).

    Args:
        environ: the process environment; `None` means `os.environ`.
        env_files: dotenv files to read, in increasing priority.
    """
    merged: dict[str, str] = {}
    for path in env_files:
        merged.update(read_env_file(path))
    merged.update(os.environ if environ is None else environ)
    return merged


def nonblank_setting(settings: Mapping[str, str], name: str) -> str | None:
    """Return setting `name` without surrounding whitespace, or None when it is absent.

    Args:
        settings: merged settings, as `load_settings` returns them.
        name: the setting to read.

    Raises:
        EmptySettingError: the setting is present but blank.
    """
    value = settings.get(name)
    if value is None:
        return None
    value = value.strip()
    if not value:
        raise EmptySettingError(name)
    return value


def list_setting(settings: Mapping[str, str], name: str) -> list[str]:
    """Return the comma-separated entries of setting `name`; none when it is absent.

    Args:
        settings: merged settings, as `load_settings` returns them.
        name: the setting to read.

    Raises:
        EmptySettingError: the setting is blank (`" , "` included), or one
            entry is (`a,,b`: named `NAME[1]`), which is how a variable that
            expanded to nothing looks inside a list.
    """
    value = settings.get(name)
    if value is None:
        return []
    return split_list(value, name)


def split_list(value: str, name: str) -> list[str]:
    """The comma-separated entries of `value`, each stripped; see `list_setting`.

    Raises:
        EmptySettingError: `value` or one of its entries is blank (`NAME[1]`).
    """
    entries = [entry.strip() for entry in value.split(",")]
    if not any(entries):
        raise EmptySettingError(name)
    for index, entry in enumerate(entries):
        if not entry:
            raise EmptySettingError(f"{name}[{index}]")
    return entries


def file_setting(settings: Mapping[str, str], name: str) -> tuple[str, str] | None:
    """Return `(value, where)` of setting `name`, given directly or as `NAME_FILE`.

    `NAME_FILE` holds the path of a file whose whole content, stripped of
    surrounding whitespace, is the value (a Docker or Kubernetes secret
    mount). The file must be a regular file that neither group nor others may
    read, write or execute; a symbolic link to one is followed (Kubernetes
    mounts secrets as links) and the target's mode is what counts.
    `where` names the source for messages: `NAME` or `NAME_FILE`.

    Args:
        settings: merged settings, as `load_settings` returns them.
        name: the setting to read (`ENCRYPTION_KEY`).

    Raises:
        ConfigurationError: both `NAME` and `NAME_FILE` are set, or the file
            cannot be read or is not UTF-8 text; messages never hold the content.
        EmptySettingError: `NAME` or `NAME_FILE` is set but blank, or the file
            holds only whitespace (`EmptySecretFileError`).
        UnsafeSecretFileError: the file is open to group or others, or is not
            a regular file.
    """
    file_name = name + FILE_SUFFIX
    value = nonblank_setting(settings, name)
    path = nonblank_setting(settings, file_name)
    if path is None:
        return None if value is None else (value, name)
    if value is not None:
        raise ConfigurationError(f"both {name} and {file_name} are set: keep one of them")
    return read_secret_file(path, file_name), file_name


def read_secret_file(path: str, setting: str) -> str:
    """The stripped content of the secret file at `path` (see `file_setting`)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigurationError(f"cannot read {path} (from {setting}): {reason}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeSecretFileError(f"{path} (from {setting}) is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise UnsafeSecretFileError(
                f"{path} (from {setting}) is accessible to group or others (mode "
                f"{mode:04o}); refusing to read a key from it. Run `chmod 600 {path}` (for a "
                "Kubernetes secret volume, set defaultMode: 0400) and treat its key as exposed"
            )
        data = os.read(fd, _MAX_SECRET_FILE + 1)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigurationError(f"cannot read {path} (from {setting}): {reason}") from None
    finally:
        os.close(fd)
    if len(data) > _MAX_SECRET_FILE:
        raise ConfigurationError(f"{path} (from {setting}) is too large for a key file")
    try:
        text: str | None = data.decode("utf-8").removeprefix("\ufeff").strip()
    except UnicodeDecodeError:
        text = None
    if text is None:  # raised outside the handler: the decode error holds the bytes
        raise ConfigurationError(f"{path} (from {setting}) is not UTF-8 text")
    if not text:
        raise EmptySecretFileError(setting, path)
    return text


def configured_keys(settings: Mapping[str, str]) -> list[tuple[str, str]]:
    """The configured keys as `(key, setting)` pairs, primary first.

    From `ENCRYPTION_KEYS`, or `ENCRYPTION_KEY` and `OLD_ENCRYPTION_KEY`, each
    given directly or as `NAME_FILE` (see `config.file_setting`). The setting
    names the key in messages: `ENCRYPTION_KEYS[2]`, `OLD_ENCRYPTION_KEY[0]`.

    Raises:
        EncryptionKeyMissingError, EmptySettingError, ConfigurationError: as
            `KeyRing.from_env` says.
    """
    keys = file_setting(settings, ENCRYPTION_KEYS)
    primary = file_setting(settings, ENCRYPTION_KEY)
    previous = file_setting(settings, OLD_ENCRYPTION_KEY)
    if keys is not None:
        for other in (primary, previous):
            if other is not None:
                raise ConfigurationError(
                    f"both {keys[1]} and {other[1]} are set: give every key in "
                    f"{ENCRYPTION_KEYS} (primary first) or use {ENCRYPTION_KEY} and "
                    f"{OLD_ENCRYPTION_KEY}, not both"
                )
        return [(key, f"{ENCRYPTION_KEYS}[{i}]") for i, key in enumerate(split_list(*keys))]
    if primary is None:
        raise EncryptionKeyMissingError(ENCRYPTION_KEY)
    found = [(primary[0], ENCRYPTION_KEY)]
    if previous is not None:
        entries = split_list(previous[0], previous[1])
        found += [(key, f"{OLD_ENCRYPTION_KEY}[{i}]") for i, key in enumerate(entries)]
    return found


def fernet_setting(settings: Mapping[str, str]) -> FernetImplementation:
    """The Fernet implementation `TENANTSTORE_FERNET` picks: `batch` (default) or `pyca`.

    Raises:
        EmptySettingError: the setting is blank.
        ConfigurationError: it names another implementation.
    """
    value = nonblank_setting(settings, TENANTSTORE_FERNET)
    if value is None or value == "batch":
        return "batch"
    if value == "pyca":
        return "pyca"
    raise ConfigurationError(f"{TENANTSTORE_FERNET} must be batch or pyca")
