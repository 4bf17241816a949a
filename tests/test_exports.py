"""The public surface: `__all__` is exactly the public names, sorted, and all importable."""

from __future__ import annotations

import importlib
import types

import pytest

import tenantstore
import tenantstore.migrate

PACKAGES = [tenantstore, tenantstore.migrate]


def public_attributes(module: types.ModuleType) -> set[str]:
    """Names a user sees on the module: not private, not a submodule."""
    return {
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }


@pytest.mark.parametrize("module", PACKAGES, ids=lambda m: m.__name__)
def test_all_is_sorted_and_has_no_duplicates(module: types.ModuleType) -> None:
    assert module.__all__ == sorted(module.__all__)
    assert len(set(module.__all__)) == len(module.__all__)


@pytest.mark.parametrize("module", PACKAGES, ids=lambda m: m.__name__)
def test_every_name_in_all_is_importable(module: types.ModuleType) -> None:
    for name in module.__all__:
        assert hasattr(module, name), name
        namespace: dict[str, object] = {}
        exec(f"from {module.__name__} import {name}", namespace)  # noqa: S102
        assert namespace[name] is getattr(module, name)


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from tenantstore import *", namespace)  # noqa: S102
    assert set(namespace) - {"__builtins__"} == set(tenantstore.__all__)


def test_migrate_public_attributes_are_all_in_all() -> None:
    assert public_attributes(tenantstore.migrate) == set(tenantstore.migrate.__all__)


def test_package_public_attributes_are_all_in_all() -> None:
    assert public_attributes(tenantstore) == set(tenantstore.__all__) - {"__version__"}


def test_package_exports_the_repository_model_keyring_pool_and_errors() -> None:
    assert {"TenantRepository", "Tenant", "KeyRing", "create_pool", "TenantStoreError"} <= set(
        tenantstore.__all__
    )
    errors = importlib.import_module("tenantstore.errors")
    assert set(errors.__all__) <= set(tenantstore.__all__)


def test_every_exported_error_derives_from_the_root_error() -> None:
    for name in tenantstore.__all__:
        value = getattr(tenantstore, name)
        if isinstance(value, type) and issubclass(value, BaseException):
            assert issubclass(value, tenantstore.TenantStoreError), name


def test_version_is_a_non_empty_string() -> None:
    assert isinstance(tenantstore.__version__, str)
    assert tenantstore.__version__
    assert "__version__" in tenantstore.__all__


def test_version_matches_the_installed_distribution() -> None:
    from importlib.metadata import version

    assert tenantstore.__version__ == version("tenantstore")
