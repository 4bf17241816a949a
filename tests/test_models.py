"""The Tenant model: secrets masked everywhere but get_secret_value, aware datetimes only."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone

import pytest
from pydantic import SecretStr, ValidationError

from tenantstore import EncryptedTable, Tenant
from tenantstore.models import TENANTS, secret_fields

SECRET = "AIzaSyModelSecret0123456789abcdefghijklm"
SECRETS = {
    "gemini_api_key": SECRET,
    "oauth_access_token": "ya29.access-token-secret-0123456789",
    "oauth_refresh_token": "1//refresh-token-secret-0123456789",
    "webhook_signing_secret": "whsec_signing-secret-0123456789",
}
CREATED = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
UPDATED = datetime(2024, 6, 7, 8, 9, 10, tzinfo=timezone(timedelta(hours=2)))


def make_tenant(**overrides: object) -> Tenant:
    data: dict[str, object] = {
        "tenant_id": "acme",
        "name": "Acme Corp",
        **SECRETS,
        "created_at": CREATED,
        "updated_at": UPDATED,
    }
    data.update(overrides)
    return Tenant.model_validate(data)


def from_row(**overrides: object) -> Tenant:
    values: dict[str, object] = {
        "tenant_id": "acme",
        "name": "Acme Corp",
        **SECRETS,
        "created_at": CREATED,
        "updated_at": UPDATED,
    }
    values.update(overrides)
    return Tenant.from_row(values)


def test_the_tenants_table_is_derived_from_the_model_secret_fields() -> None:
    """Each secret is declared once, as a SecretStr field; TENANTS follows the model."""
    assert (
        EncryptedTable(
            "tenants", key="tenant_id", secrets=tuple(SECRETS), labels=secret_fields(Tenant)
        )
        == TENANTS
    )
    assert TENANTS.label("gemini_api_key") == "Gemini API key"
    assert TENANTS.label("oauth_refresh_token") == "oauth_refresh_token"


def test_validated_key_is_a_secret_str_with_the_plaintext_inside() -> None:
    tenant = make_tenant()
    assert isinstance(tenant.gemini_api_key, SecretStr)
    assert tenant.gemini_api_key.get_secret_value() == SECRET


@pytest.mark.parametrize(
    "render",
    [
        pytest.param(repr, id="repr"),
        pytest.param(str, id="str"),
        pytest.param(lambda t: str(t.model_dump()), id="model_dump"),
        pytest.param(lambda t: str(t.model_dump(mode="json")), id="model_dump-json-mode"),
        pytest.param(lambda t: t.model_dump_json(), id="model_dump_json"),
        pytest.param(lambda t: f"{t.gemini_api_key}", id="field-format"),
        pytest.param(lambda t: repr(t.gemini_api_key), id="field-repr"),
    ],
)
def test_secret_is_hidden_in_every_rendering(render: Callable[[Tenant], str]) -> None:
    for tenant in (make_tenant(), from_row()):
        text = render(tenant)
        for secret in SECRETS.values():
            assert secret not in text
            assert secret[4:20] not in text
        assert "**********" in text


def test_model_dump_json_masks_but_keeps_the_other_fields() -> None:
    data = json.loads(make_tenant().model_dump_json())
    assert data["tenant_id"] == "acme"
    assert data["name"] == "Acme Corp"
    for column in SECRETS:
        assert data[column] == "**********"
    assert data["created_at"] == "2024-01-02T03:04:05Z"


def test_every_secret_may_be_absent() -> None:
    absent = dict.fromkeys(SECRETS)
    for tenant in (make_tenant(**absent), from_row(**absent)):
        assert all(getattr(tenant, column) is None for column in SECRETS)
    bare = Tenant(tenant_id="a", name="A", created_at=CREATED, updated_at=UPDATED)
    assert all(getattr(bare, column) is None for column in SECRETS)


@pytest.mark.parametrize("key", [SECRET, None])
def test_from_row_builds_the_same_tenant_as_validation(key: str | None) -> None:
    built = from_row(gemini_api_key=key)
    validated = make_tenant(gemini_api_key=key)
    assert built == validated
    assert built.model_dump() == validated.model_dump()
    assert built.model_dump_json() == validated.model_dump_json()
    if key is not None:
        assert built.gemini_api_key is not None
        assert built.gemini_api_key.get_secret_value() == key
    assert built.model_fields_set == validated.model_fields_set


def test_tenant_is_frozen() -> None:
    tenant = make_tenant()
    with pytest.raises(ValidationError):
        tenant.name = "other"  # type: ignore[misc]


@pytest.mark.parametrize("field", ["created_at", "updated_at"])
def test_naive_datetimes_are_rejected_on_validation(field: str) -> None:
    with pytest.raises(ValidationError) as info:
        make_tenant(**{field: datetime(2024, 1, 2, 3, 4, 5)})
    assert info.value.errors()[0]["loc"] == (field,)
    assert info.value.errors()[0]["type"] == "timezone_aware"


def test_aware_datetimes_keep_their_offset() -> None:
    tenant = make_tenant()
    assert tenant.updated_at.utcoffset() == timedelta(hours=2)
    assert tenant.created_at == CREATED


@pytest.mark.parametrize("missing", ["tenant_id", "name", "created_at", "updated_at"])
def test_required_fields_are_required(missing: str) -> None:
    data = make_tenant().model_dump()
    data.update(SECRETS)
    del data[missing]
    with pytest.raises(ValidationError):
        Tenant.model_validate(data)


def test_validation_errors_do_not_echo_the_secret() -> None:
    with pytest.raises(ValidationError) as info:
        make_tenant(created_at="not a date")
    assert SECRET not in str(info.value)


@pytest.mark.parametrize("field", ["tenant_id", "name", "created_at", *SECRETS])
def test_validation_errors_never_echo_their_input(field: str) -> None:
    """A secret given where it does not fit (wrong type) is not repeated by the error's text.

    (`errors()` still carries the input for code that asks for it; `str()` and
    `repr()`, which is what reaches a log, do not.)
    """
    bad: object = [SECRET] if field != "created_at" else SECRET
    with pytest.raises(ValidationError) as info:
        make_tenant(**{field: bad})
    errors = json.dumps(info.value.errors(include_input=False), default=str)
    for text in (str(info.value), repr(info.value), errors):
        assert SECRET not in text and SECRET[4:20] not in text
