"""Settings from the process environment and dotenv files.

Only the `from_env()` constructors elsewhere call into this module; nothing
here is cached at import time. The process environment always wins over a
file, and a missing file is simply empty.

Settings read: `DATABASE_URL` (from `.env`), `ENCRYPTION_KEY` and
`OLD_ENCRYPTION_KEY` (from `.env.secrets`, or `.env`).

A setting that is present but blank (`ENCRYPTION_KEY=`, or what
`export OLD_ENCRYPTION_KEY="$UNSET"` leaves) is an `EmptySettingError`, never
taken for an absent one: `nonblank_setting` and `list_setting` say which.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from .errors import ConfigurationError, EmptySettingError

__all__ = [
    "DEFAULT_ENV_FILES",
    "EmptySettingError",
    "list_setting",
    "load_settings",
    "nonblank_setting",
    "parse_env_text",
    "read_env_file",
]

DEFAULT_ENV_FILES: tuple[str, ...] = (".env", ".env.secrets")


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
    entries = [entry.strip() for entry in value.split(",")]
    if not any(entries):
        raise EmptySettingError(name)
    for index, entry in enumerate(entries):
        if not entry:
            raise EmptySettingError(f"{name}[{index}]")
    return entries
