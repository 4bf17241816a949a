"""Migration files: pairing, ordering, checksums and directives, parsed without a database."""

from __future__ import annotations

import hashlib

import pytest

from tenantstore import SqlFileError, TenantStoreError
from tenantstore.migrate import Migration, load_migrations
from tenantstore.migrate.files import DATA_STEPS, Step, parse_migrations, parse_step

CREATE = "CREATE TABLE a (id int);\n"
DROP = "-- tenantstore: drops a\nDROP TABLE a;\n"


# -- pairing and ordering ----------------------------------------------------------


def test_up_and_down_files_pair_into_one_migration() -> None:
    [migration] = parse_migrations({"0001_create_a.up.sql": CREATE, "0001_create_a.down.sql": DROP})
    assert isinstance(migration, Migration)
    assert (migration.version, migration.name, migration.label) == (1, "create_a", "0001_create_a")
    assert migration.up.filename == "0001_create_a.up.sql"
    assert migration.up.sql == CREATE
    assert migration.down is not None
    assert migration.down.filename == "0001_create_a.down.sql"
    assert migration.down.sql == DROP


def test_down_file_is_optional() -> None:
    [migration] = parse_migrations({"0003_seed.up.sql": "SELECT 1;"})
    assert migration.down is None
    assert migration.label == "0003_seed"


def test_migrations_are_ordered_by_version_not_input_order() -> None:
    files = {
        "0010_ten.up.sql": "SELECT 10;",
        "0002_two.up.sql": "SELECT 2;",
        "0001_one.up.sql": "SELECT 1;",
        "0002_two.down.sql": "SELECT -2;",
    }
    migrations = parse_migrations(files)
    assert [m.version for m in migrations] == [1, 2, 10]
    assert [m.label for m in migrations] == ["0001_one", "0002_two", "0010_ten"]


def test_no_files_gives_no_migrations() -> None:
    assert parse_migrations({}) == []


# -- checksums ---------------------------------------------------------------------


def test_checksum_is_the_sha256_of_the_up_file() -> None:
    [migration] = parse_migrations({"0001_a.up.sql": CREATE})
    assert migration.checksum == hashlib.sha256(CREATE.encode("utf-8")).hexdigest()


def test_checksum_is_stable_across_parses_and_ignores_the_down_file() -> None:
    first = parse_migrations({"0001_a.up.sql": CREATE})[0].checksum
    again = parse_migrations({"0001_a.up.sql": CREATE, "0001_a.down.sql": DROP})[0].checksum
    assert first == again


@pytest.mark.parametrize(
    "edited",
    [CREATE + "\n", CREATE.replace("int", "bigint"), "-- a comment\n" + CREATE],
)
def test_checksum_changes_when_the_up_file_changes(edited: str) -> None:
    original = parse_migrations({"0001_a.up.sql": CREATE})[0].checksum
    assert parse_migrations({"0001_a.up.sql": edited})[0].checksum != original


# -- directives --------------------------------------------------------------------


def test_plain_step_is_transactional_with_no_directives() -> None:
    step = parse_step("0001_a.up.sql", CREATE)
    assert step == Step("0001_a.up.sql", CREATE, True, (), None)


def test_no_transaction_directive_makes_the_step_non_transactional() -> None:
    text = "-- tenantstore: no-transaction\nCREATE INDEX CONCURRENTLY i ON a (id);\n"
    step = parse_step("0002_i.up.sql", text)
    assert step.transactional is False
    assert step.sql == text


def test_drops_directives_collect_every_table_in_order() -> None:
    text = "-- tenantstore: drops a\n--tenantstore:drops b\nDROP TABLE a;\nDROP TABLE b;\n"
    assert parse_step("0001_a.down.sql", text).drops == ("a", "b")


@pytest.mark.parametrize("name", sorted(DATA_STEPS))
def test_data_step_directive_names_the_batch_runner(name: str) -> None:
    step = parse_step("0002_x.up.sql", f"-- Explain.\n-- tenantstore: data-step {name}\n")
    assert step.data_step == name
    assert step.transactional is True


def test_data_steps_are_encrypt_and_decrypt_secrets() -> None:
    assert frozenset({"encrypt_secrets", "decrypt_secrets"}) == DATA_STEPS


def test_ordinary_comments_are_not_directives() -> None:
    text = "-- tenantstore creates this table\n-- drops: nothing\n" + CREATE
    step = parse_step("0001_a.up.sql", text)
    assert (step.transactional, step.drops, step.data_step) == (True, (), None)


@pytest.mark.parametrize(
    ("text", "line"),
    [
        pytest.param("-- tenantstore: no-transaction please\nSELECT 1;", 1, id="arg-to-flag"),
        pytest.param("SELECT 1;\n-- tenantstore: drops\n", 2, id="drops-without-table"),
        pytest.param("\n\n-- tenantstore: data-step rotate_secrets\n", 3, id="unknown-data-step"),
        pytest.param("-- tenantstore: data-step\n", 1, id="data-step-without-name"),
        pytest.param("SELECT 1;\n-- tenantstore: transactional\n", 2, id="unknown-word"),
    ],
)
def test_unknown_directive_is_an_error_at_file_and_line(text: str, line: int) -> None:
    with pytest.raises(SqlFileError) as info:
        parse_step("0005_x.up.sql", text)
    assert str(info.value).startswith("unknown directive ")
    assert str(info.value).endswith(f" at 0005_x.up.sql:{line}")
    assert isinstance(info.value, TenantStoreError)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("-- tenantstore: drops a b\nDROP TABLE a, b;\n", id="two-tables"),
        pytest.param("-- tenantstore: Drops a\nDROP TABLE a;\n", id="uppercase"),
    ],
)
def test_a_malformed_directive_line_is_never_silently_ignored(text: str) -> None:
    with pytest.raises(SqlFileError, match=r"at 0001_a\.down\.sql:1$"):
        parse_step("0001_a.down.sql", text)


def test_directive_error_in_a_file_surfaces_from_parse_migrations() -> None:
    with pytest.raises(SqlFileError, match=r"at 0002_b\.down\.sql:2$"):
        parse_migrations(
            {
                "0002_b.up.sql": "SELECT 1;",
                "0002_b.down.sql": "-- ok\n-- tenantstore: drop b\n",
            }
        )


# -- file naming errors ------------------------------------------------------------


@pytest.mark.parametrize(
    "filename",
    [
        "1_a.up.sql",
        "0001-a.up.sql",
        "0001_a.sql",
        "0001_A.up.sql",
        "0001_a.UP.sql",
        "00001_a.up.sql",
        "0001_a.up.sql.bak",
        "README.md",
    ],
)
def test_badly_named_file_is_an_error_naming_it(filename: str) -> None:
    with pytest.raises(SqlFileError) as info:
        parse_migrations({"0001_ok.up.sql": "SELECT 1;", filename: "SELECT 2;"})
    assert str(info.value).startswith("migration file name must look like 0001_name.up.sql")
    assert str(info.value).endswith(f" at {filename}:1")


def test_down_file_without_up_file_is_an_error() -> None:
    with pytest.raises(SqlFileError, match=r"down file without an up file at 0002_b\.down\.sql:1$"):
        parse_migrations({"0001_a.up.sql": "SELECT 1;", "0002_b.down.sql": "SELECT 2;"})


def test_two_up_files_for_one_version_are_an_error() -> None:
    with pytest.raises(SqlFileError, match=r"second up file for version 1 at 0001_b\.up\.sql:1$"):
        parse_migrations({"0001_a.up.sql": "SELECT 1;", "0001_b.up.sql": "SELECT 2;"})


def test_two_down_files_for_one_version_are_an_error() -> None:
    with pytest.raises(SqlFileError, match=r"second down file for version 1 at .*\.down\.sql:1$"):
        parse_migrations(
            {
                "0001_a.up.sql": "SELECT 1;",
                "0001_a.down.sql": "SELECT 2;",
                "0001_b.down.sql": "SELECT 3;",
            }
        )


def test_down_file_with_another_name_than_its_up_file_is_an_error() -> None:
    with pytest.raises(SqlFileError, match=r"differs from its up file at 0001_b\.down\.sql:1$"):
        parse_migrations({"0001_a.up.sql": "SELECT 1;", "0001_b.down.sql": "SELECT 2;"})


# -- shipped migrations ------------------------------------------------------------


def test_shipped_migrations_are_numbered_from_0001() -> None:
    migrations = load_migrations()
    assert [m.label for m in migrations] == [
        "0001_create_tenants",
        "0002_encrypt_gemini_api_keys",
        "0003_add_secret_columns",
        "0004_encrypt_secret_columns",
        "0005_create_keys_table",
        "0006_create_audit_table",
        "0007_notify_tenant_changes",
    ]
    assert all(m.down is not None for m in migrations)


def test_shipped_0001_creates_tenants_and_its_down_step_guards_the_drop() -> None:
    first = load_migrations()[0]
    assert "CREATE TABLE IF NOT EXISTS tenants" in first.up.sql
    assert first.up.transactional
    assert first.up.data_step is None
    assert first.down is not None
    assert first.down.drops == ("tenants",)


def test_shipped_0002_is_the_encrypt_and_decrypt_data_steps() -> None:
    second = load_migrations()[1]
    assert second.up.data_step == "encrypt_secrets"
    assert second.down is not None
    assert second.down.data_step == "decrypt_secrets"
    assert second.up.drops == ()
    assert second.down.drops == ()


def test_shipped_checksums_are_stable_across_loads() -> None:
    assert [m.checksum for m in load_migrations()] == [m.checksum for m in load_migrations()]
