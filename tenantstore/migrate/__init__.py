"""Schema migrations and the secrets batch runner.

Command line: `python -m tenantstore.migrate up | down [N] | status |
encrypt | decrypt | rotate | verify`. From Python::

    await upgrade(pool, keyring)
    report = await rotate_secrets(pool, keyring, progress=print)
"""

from .files import Migration, load_migrations
from .schema import MigrationReport, StatusReport, downgrade, migration_status, upgrade
from .secrets import (
    RunOptions,
    SecretsReport,
    decrypt_secrets,
    encrypt_secrets,
    rotate_secrets,
    verify_secrets,
)

__all__ = [
    "Migration",
    "MigrationReport",
    "RunOptions",
    "SecretsReport",
    "StatusReport",
    "decrypt_secrets",
    "downgrade",
    "encrypt_secrets",
    "load_migrations",
    "migration_status",
    "rotate_secrets",
    "upgrade",
    "verify_secrets",
]
