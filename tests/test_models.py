"""The Tenant model: secrets masked everywhere but get_secret_value, aware datetimes only."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone

import pytest
from pydantic import SecretStr, ValidationError

from tenantstore import Tenant

SECRET = "AIzaSyModelSecret0123456789abcdefghijklm"
CREATED = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
UPDATED = datetime(2024, 6, 7, 8, 9, 10, tzinfo=timezone(timedelta(hours=2)))


def make_tenant(**overrides: object) -> Tenant:
    data: dict[str, object] = {
        "tenant_id": "acme",
        "name": "Acme Corp",
        "gemini_api_key": SECRET,
        "created_at": CREATED,
        "updated_at": UPDATED,
    }
    data.update(overrides)
    return Tenant.model_validate(data)


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
    for tenant in (make_tenant(), Tenant.from_row("acme", "Acme", SECRET, CREATED, UPDATED)):
        text = render(tenant)
        assert SECRET not in text
        assert SECRET[4:20] not in text
        assert "**********" in text


def test_model_dump_json_masks_but_keeps_the_other_fields() -> None:
    data = json.loads(make_tenant().model_dump_json())
    assert data["tenant_id"] == "acme"
    assert data["name"] == "Acme Corp"
    assert data["gemini_api_key"] == "**********"
    assert data["created_at"] == "2024-01-02T03:04:05Z"


def test_key_may_be_absent() -> None:
    tenant = make_tenant(gemini_api_key=None)
    assert tenant.gemini_api_key is None
    assert Tenant.from_row("acme", "Acme Corp", None, CREATED, UPDATED).gemini_api_key is None


@pytest.mark.parametrize("key", [SECRET, None])
def test_from_row_builds_the_same_tenant_as_validation(key: str | None) -> None:
    built = Tenant.from_row("acme", "Acme Corp", key, CREATED, UPDATED)
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
    data["gemini_api_key"] = SECRET
    del data[missing]
    with pytest.raises(ValidationError):
        Tenant.model_validate(data)


def test_validation_errors_do_not_echo_the_secret() -> None:
    with pytest.raises(ValidationError) as info:
        make_tenant(created_at="not a date")
    assert SECRET not in str(info.value)
