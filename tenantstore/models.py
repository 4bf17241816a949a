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
        """Build a tenant from trusted, already-typed database values, skipping validation.

        asyncpg returns `text` as str and `timestamptz` as aware datetimes, so
        validating again would only cost time on every request.
        """
        return cls.model_construct(
            tenant_id=tenant_id,
            name=name,
            gemini_api_key=None if gemini_api_key is None else SecretStr(gemini_api_key),
            created_at=created_at,
            updated_at=updated_at,
        )
