"""The `Tenant` model and the `tenants` table's declaration, derived from it.

Pure data. Every secret field is a `SecretStr | None`: `repr()`, `str()`,
`model_dump()`, `model_dump_json()` and validation errors never show it.
`TENANTS` is derived from the model: its secret columns are the model's
`SecretStr` fields, in order, so a secret is declared once, here.
"""

from __future__ import annotations

import types
import typing

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, SecretStr

from .tables import EncryptedTable

__all__ = ["TENANTS", "Tenant", "secret_fields"]


class Tenant(BaseModel):
    """A tenant with its secrets decrypted.

    A secret's plaintext is `tenant.gemini_api_key.get_secret_value()` (and
    likewise for each secret field); None means the tenant has none. A field's
    title is the name messages use for it (the seed's "Gemini API key");
    others are named by their column.
    """

    model_config = ConfigDict(frozen=True, hide_input_in_errors=True)

    tenant_id: str
    name: str
    gemini_api_key: SecretStr | None = Field(default=None, title="Gemini API key")
    oauth_access_token: SecretStr | None = None
    oauth_refresh_token: SecretStr | None = None
    webhook_signing_secret: SecretStr | None = None
    created_at: AwareDatetime
    updated_at: AwareDatetime

    @classmethod
    def from_row(cls, values: dict[str, object]) -> Tenant:
        """Build a tenant from database values, secrets already decrypted (validated:
        in pydantic-core this is faster than `model_construct`)."""
        return cls.model_validate(values)


def _is_secret(annotation: object) -> bool:
    if annotation is SecretStr:
        return True
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return SecretStr in typing.get_args(annotation)
    return False


def secret_fields(model: type[BaseModel]) -> dict[str, str]:
    """The `SecretStr` fields of a model, in order, each with its title (or its name)."""
    return {
        name: info.title or name
        for name, info in model.model_fields.items()
        if _is_secret(info.annotation)
    }


TENANTS = EncryptedTable(
    "tenants",
    key="tenant_id",
    secrets=tuple(secret_fields(Tenant)),
    labels=secret_fields(Tenant),
)
"""The `tenants` table: keyed by `tenant_id`, a secret column per `SecretStr` field of `Tenant`."""
