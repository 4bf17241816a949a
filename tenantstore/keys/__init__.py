"""Keys: key files, key ids in the database, the start-up check, envelope data keys.

- `files`: the dotenv key files `keys generate --write` writes and rotates.
- `store`: `tenantstore_keys`, which key ids the database has seen
  (`record_key_use`, `KeyUseRecorder`).
- `check`: `check_keys`, for start-up and readiness probes.
- `providers`, `pkcs11`, `envelope`: envelope mode, data keys wrapped by a
  KEK in an HSM; `keyring_from_env(pool)` gives an application its key ring
  in either mode.

Command line: `python -m tenantstore.keys generate | list | check |
new-data-key | import | rewrap | retire` (see `tenantstore.keys.cli`).
"""

from __future__ import annotations

from collections.abc import Sequence

from .check import ColumnCanary, KeyCheckError, KeyCheckReport, check_keys
from .envelope import (
    RewrapReport,
    import_keys,
    keyring_from_env,
    load_keyring,
    new_data_key,
    rewrap,
)
from .files import (
    KeyFileError,
    KeyFileExistsError,
    NothingToRotateError,
    UnsafeKeyFileError,
    append_key,
    append_key_text,
    check_key_file_stat,
    rotate_env_text,
    rotate_key_file,
)
from .providers import KeyProvider, KeyProviderError, UnwrapError, provider_from_env
from .store import KeyUseRecorder, KnownKey, list_known_keys, record_key_use

__all__ = [
    "ColumnCanary",
    "KeyCheckError",
    "KeyCheckReport",
    "KeyFileError",
    "KeyFileExistsError",
    "KeyProvider",
    "KeyProviderError",
    "KeyUseRecorder",
    "KnownKey",
    "NothingToRotateError",
    "RewrapReport",
    "UnsafeKeyFileError",
    "UnwrapError",
    "append_key",
    "append_key_text",
    "check_key_file_stat",
    "check_keys",
    "import_keys",
    "keyring_from_env",
    "list_known_keys",
    "load_keyring",
    "main",
    "new_data_key",
    "provider_from_env",
    "record_key_use",
    "rewrap",
    "rotate_env_text",
    "rotate_key_file",
]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the key CLI (`tenantstore.keys.cli.main`); return the exit code.

    Imported on call: the CLI pulls in `tenantstore.migrate` (for `retire`),
    which writers importing `tenantstore.keys.store` must not need.
    """
    from .cli import main as cli_main

    return cli_main(argv)
