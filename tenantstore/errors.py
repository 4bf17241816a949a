"""Every error tenantstore raises, under one root.

Catch `TenantStoreError` to catch them all. The tree::

    TenantStoreError
    ├── ConfigurationError (ValueError)
    │   ├── EncryptionKeyMissingError
    │   ├── InvalidEncryptionKeyError
    │   └── InvalidTenantIdError
    ├── EncryptionError (ValueError)
    ├── DecryptionError
    │   └── TenantDecryptionError
    ├── PlaintextSecretError
    ├── TenantExistsError
    ├── TenantNotFoundError (LookupError)
    ├── DatabaseError
    ├── SqlFileError
    └── MigrationError
        ├── MigrationChecksumError
        └── DestructiveMigrationError

Messages and attributes carry names (settings, tenant ids, files), never a
key or a secret value.
"""

from __future__ import annotations

__all__ = [
    "ConfigurationError",
    "DatabaseError",
    "DecryptionError",
    "DestructiveMigrationError",
    "EncryptionError",
    "EncryptionKeyMissingError",
    "InvalidEncryptionKeyError",
    "InvalidTenantIdError",
    "MigrationChecksumError",
    "MigrationError",
    "PlaintextSecretError",
    "SqlFileError",
    "TenantDecryptionError",
    "TenantExistsError",
    "TenantNotFoundError",
    "TenantStoreError",
]


class TenantStoreError(Exception):
    """Root of every error raised by tenantstore."""


class ConfigurationError(TenantStoreError, ValueError):
    """A setting or argument is missing or malformed."""


class EncryptionKeyMissingError(ConfigurationError):
    """No primary encryption key is configured: tenantstore fails closed."""

    def __init__(self, setting: str = "ENCRYPTION_KEY") -> None:
        self.setting = setting
        super().__init__(
            f"{setting} environment variable not set: refusing to read or write secrets "
            "without a key (generate one with `python -m tenantstore.keys generate`)"
        )


class InvalidEncryptionKeyError(ConfigurationError):
    """A configured key is not a 32-byte url-safe base64 Fernet key.

    The message names the setting, never the key itself.
    """

    def __init__(self, setting: str) -> None:
        self.setting = setting
        super().__init__(
            f"{setting} is not a valid Fernet key: expected 44 characters of url-safe "
            "base64 encoding 32 bytes"
        )


class InvalidTenantIdError(ConfigurationError):
    """A tenant id cannot be stored in PostgreSQL (empty, NUL byte, invalid unicode, too long)."""


class EncryptionError(TenantStoreError, ValueError):
    """A secret cannot be encrypted or stored; the message says why, never what it is."""

    def __init__(self, reason: str = "it is not valid unicode (lone surrogate)") -> None:
        self.reason = reason
        super().__init__(f"Value cannot be encrypted: {reason}")


class DecryptionError(TenantStoreError):
    """A token is corrupt or was encrypted under none of the configured keys."""

    def __init__(self, message: str = "Invalid encrypted data or wrong encryption key") -> None:
        super().__init__(message)


class TenantDecryptionError(DecryptionError):
    """A tenant's stored secret could not be decrypted; `tenant_id` says whose."""

    def __init__(self, tenant_id: str) -> None:
        self.tenant_id = tenant_id
        super().__init__(f"Failed to decrypt Gemini API key for tenant {tenant_id}")


class PlaintextSecretError(TenantStoreError):
    """A stored secret is plaintext and the repository was told not to accept that."""

    def __init__(self, tenant_id: str) -> None:
        self.tenant_id = tenant_id
        super().__init__(
            f"Gemini API key for tenant {tenant_id} is stored as plaintext "
            "(run `python -m tenantstore.migrate encrypt`)"
        )


class TenantExistsError(TenantStoreError):
    """A tenant with this id already exists."""

    def __init__(self, tenant_id: str) -> None:
        self.tenant_id = tenant_id
        super().__init__(f"Tenant {tenant_id} already exists")


class TenantNotFoundError(TenantStoreError, LookupError):
    """No tenant has this id."""

    def __init__(self, tenant_id: str) -> None:
        self.tenant_id = tenant_id
        super().__init__(f"Tenant {tenant_id} not found")


class DatabaseError(TenantStoreError):
    """PostgreSQL or the connection to it failed; the driver's error is chained as the cause."""


class MigrationError(TenantStoreError):
    """A schema or data migration could not be applied."""


class SqlFileError(TenantStoreError):
    """A migration or named-query file is malformed; the message names file and line."""


class MigrationChecksumError(MigrationError):
    """An applied migration file has changed since it was applied."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        super().__init__(
            f"Migration {filename} was changed after it was applied (checksum differs); "
            "restore the original file and add a new migration instead"
        )


class DestructiveMigrationError(MigrationError):
    """A down step would drop a table that still holds rows."""

    def __init__(self, filename: str, table: str, rows: int) -> None:
        self.filename = filename
        self.table = table
        self.rows = rows
        super().__init__(
            f"Refusing {filename}: it drops table {table}, which holds {rows} rows "
            "(pass --yes / confirm=True to drop them)"
        )
