"""tenantstore: per-tenant secrets for asyncio services, encrypted at rest in PostgreSQL.

pool = await tenantstore.create_pool()
repo = tenantstore.TenantRepository(pool, tenantstore.KeyRing.from_env())
tenant = await repo.get_tenant("acme")
tenant.gemini_api_key.get_secret_value()
"""

from importlib import metadata as _metadata

from .crypto import AsyncCrypto
from .db import create_pool
from .encryption import KeyRing
from .errors import (
    ConfigurationError,
    DatabaseError,
    DecryptionError,
    DestructiveMigrationError,
    EmptySettingError,
    EncryptionError,
    EncryptionKeyMissingError,
    InvalidEncryptionKeyError,
    InvalidTenantIdError,
    MigrationChecksumError,
    MigrationError,
    PlaintextSecretError,
    SqlFileError,
    TableDefinitionError,
    TenantDecryptionError,
    TenantExistsError,
    TenantNotFoundError,
    TenantStoreError,
    UnknownSecretError,
)
from .live_cache import LiveCache
from .models import Tenant
from .repository import TenantRepository
from .tables import EncryptedTable

try:
    __version__ = _metadata.version("tenantstore")
except _metadata.PackageNotFoundError:  # pragma: no cover - an uninstalled checkout
    __version__ = "0.0.0"

__all__ = [
    "AsyncCrypto",
    "ConfigurationError",
    "DatabaseError",
    "DecryptionError",
    "DestructiveMigrationError",
    "EmptySettingError",
    "EncryptedTable",
    "EncryptionError",
    "EncryptionKeyMissingError",
    "InvalidEncryptionKeyError",
    "InvalidTenantIdError",
    "KeyRing",
    "LiveCache",
    "MigrationChecksumError",
    "MigrationError",
    "PlaintextSecretError",
    "SqlFileError",
    "TableDefinitionError",
    "Tenant",
    "TenantDecryptionError",
    "TenantExistsError",
    "TenantNotFoundError",
    "TenantRepository",
    "TenantStoreError",
    "UnknownSecretError",
    "__version__",
    "create_pool",
]
