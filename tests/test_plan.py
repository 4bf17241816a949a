"""plan_cells and SecretsReport: the batch runner's pure half, no database."""

from __future__ import annotations

from cryptography.fernet import Fernet

from tenantstore import KeyRing
from tenantstore.migrate.plan import Cell, SecretsReport, plan_cells


def by_place(cells: list[Cell]) -> dict[tuple[int, int], Cell]:
    return {(cell.row, cell.column): cell for cell in cells}


def test_encrypt_skips_tokens_without_decrypting_and_encrypts_the_rest(key: str) -> None:
    ring = KeyRing(key)
    foreign = Fernet(Fernet.generate_key()).encrypt(b"x").decode()  # no key of ours made it
    cells = by_place(plan_cells("encrypt", ring, [(0, 0, "plain-a"), (1, 0, foreign), (2, 1, "c")]))
    assert cells[1, 0].outcome == "skipped" and cells[1, 0].new is None
    assert cells[0, 0].outcome == cells[2, 1].outcome == "changed"
    assert ring.decrypt(cells[0, 0].new or "") == "plain-a"
    assert ring.decrypt(cells[2, 1].new or "") == "c"


def test_a_token_wrapped_in_whitespace_is_that_token_for_every_operation(key: str) -> None:
    """The one rule: a token with a trailing newline or leading space is a token, not plaintext."""
    ring = KeyRing(key)
    token = ring.encrypt("AIza-secret")
    values = [token + "\n", token + "\r\n", " " + token, "\t" + token + " "]
    cells = [(i, 0, value) for i, value in enumerate(values)]
    assert {c.outcome for c in plan_cells("encrypt", ring, cells)} == {"skipped"}
    assert {c.outcome for c in plan_cells("verify", ring, cells)} == {"current"}
    decrypted = plan_cells("decrypt", ring, cells)
    assert {c.new for c in decrypted} == {"AIza-secret"}


def test_rotate_reencrypts_previous_key_tokens_only(key: str, old_key: str) -> None:
    ring = KeyRing(key, [old_key])
    old_token, new_token = KeyRing(old_key).encrypt("o"), KeyRing(key).encrypt("n")
    foreign = Fernet(Fernet.generate_key()).encrypt(b"x").decode()
    rows = [(0, 0, old_token), (1, 0, new_token), (2, 0, "p"), (3, 0, foreign)]
    cells = by_place(plan_cells("rotate", ring, rows))
    assert cells[0, 0].outcome == "changed" and KeyRing(key).decrypt(cells[0, 0].new or "") == "o"
    assert cells[0, 0].key_id == ring.key_ids[1]
    assert (cells[1, 0].outcome, cells[1, 0].key_id) == ("skipped", ring.key_ids[0])
    assert cells[2, 0].outcome == "plaintext"
    assert (cells[3, 0].outcome, cells[3, 0].reason) == ("failed", "undecryptable")


def test_rotating_a_token_of_the_empty_string_keeps_it_a_token(key: str, old_key: str) -> None:
    ring = KeyRing(key, [old_key])
    (cell,) = plan_cells("rotate", ring, [(0, 0, KeyRing(old_key).encrypt(""))])
    assert cell.new and KeyRing(key).decrypt(cell.new) == ""


def test_decrypt_and_verify_classify_every_secret(key: str, old_key: str) -> None:
    ring = KeyRing(key, [old_key])
    rows = [(0, 0, ring.encrypt("c")), (1, 0, KeyRing(old_key).encrypt("o")), (2, 0, "plain")]
    decrypt = by_place(plan_cells("decrypt", ring, rows))
    assert [decrypt[i, 0].new for i in range(3)] == ["c", "o", None]
    assert decrypt[2, 0].outcome == "skipped"
    token = ring.encrypt("x")
    corrupt = token[:50] + ("B" if token[50] == "A" else "A") + token[51:]  # fails its HMAC
    rows += [(3, 0, corrupt), (4, 1, ring.encrypt("c2")), (5, 0, ring.encrypt("c3"))]
    verify = plan_cells("verify", ring, rows)
    # Counted per column, outcome and key; a failure keeps its row, for the report.
    assert sorted((c.row, c.column, c.outcome, c.key_id, c.count) for c in verify) == [
        (-1, 0, "current", ring.key_ids[0], 2),
        (-1, 0, "plaintext", None, 1),
        (-1, 0, "previous", ring.key_ids[1], 1),
        (-1, 1, "current", ring.key_ids[0], 1),
        (3, 0, "failed", None, 1),
    ]
    assert all(cell.new is None for cell in verify)


def test_decrypt_leaves_encrypted_what_cannot_come_back_as_plaintext(key: str) -> None:
    """A NUL, or a plaintext that is itself a token, would be unreadable once written back."""
    ring = KeyRing(key)
    inner = Fernet(Fernet.generate_key()).encrypt(b"from another system").decode()
    rows = [(0, 0, ring.encrypt("a\x00b")), (1, 0, ring.encrypt(inner)), (2, 0, ring.encrypt("ok"))]
    cells = by_place(plan_cells("decrypt", ring, rows))
    assert (cells[0, 0].outcome, cells[0, 0].reason, cells[0, 0].new) == ("failed", "nul", None)
    assert (cells[1, 0].outcome, cells[1, 0].reason) == ("failed", "token-like")
    assert cells[2, 0].new == "ok"


def test_report_counts_per_column_and_key_id_and_lists_failures(key: str) -> None:
    report = SecretsReport("verify", "tenants")
    report.count("a", Cell(0, 0, "current", key_id="k1"), "t1")
    report.count("a", Cell(1, 0, "previous", key_id="k2"), "t2")
    report.count("b", Cell(1, 1, "failed", reason="undecryptable"), "t2")
    report.count("b", Cell(2, 1, "plaintext"), "t3")
    report.rows = 3
    assert (report.current, report.previous, report.plaintext, report.failed) == (1, 1, 1, 1)
    assert report.keys == {"k1": 1, "k2": 1}
    data = report.as_dict()
    assert data["schema"] == 1 and data["rows"] == 3
    assert data["columns"]["a"]["keys"] == {"k1": 1, "k2": 1}
    assert data["failures"] == [{"key": "t2", "column": "b", "reason": "undecryptable"}]
    assert report.failed_tenant_ids == ["t2"]


def test_summary_lines_are_exact_and_add_failures_only_when_there_are_some() -> None:
    report = SecretsReport("encrypt")
    for i in range(3):
        report.count("gemini_api_key", Cell(i, 0, "changed"), f"t{i}")
    for i in range(2):
        report.count("gemini_api_key", Cell(i, 0, "skipped"), f"s{i}")
    assert report.summary() == "Migration complete: 3 keys encrypted, 2 already encrypted"
    report.count("gemini_api_key", Cell(9, 0, "failed", reason="undecryptable"), "t9")
    assert report.summary().endswith(", 1 failed")
    rotate = SecretsReport("rotate")
    rotate.count("c", Cell(0, 0, "changed"), "x")
    assert rotate.summary() == "Rotation complete: 1 keys rotated, 0 already current"
    assert SecretsReport("decrypt").summary() == (
        "Migration complete: 0 keys decrypted, 0 already plaintext"
    )


def test_planning_a_page_in_slices_gives_the_same_cells(key: str, old_key: str) -> None:
    from tenantstore.migrate._runner import _plan_in_slices

    ring = KeyRing(key, [old_key])
    old = KeyRing(old_key)
    rows = [(i, i % 2, old.encrypt(f"v{i}") if i % 3 else f"plain{i}") for i in range(700)]
    whole = plan_cells("rotate", ring, rows)
    sealed = _plan_in_slices("rotate", ring, rows)
    assert repr(sealed) == "<sealed>"  # a future holding it shows nothing
    sliced = sealed.value
    assert sorted((c.row, c.column, c.outcome) for c in sliced) == sorted(
        (c.row, c.column, c.outcome) for c in whole
    )
    assert sum(c.outcome == "changed" for c in sliced) == 466
    assert sum(c.outcome == "plaintext" for c in sliced) == 234


def test_a_planned_cell_never_shows_its_new_value(key: str) -> None:
    """`decrypt` plans plaintexts: a cell in a log line or a traceback must not show one."""
    ring = KeyRing(key)
    [cell] = plan_cells("decrypt", ring, [(0, 0, ring.encrypt("AIza-planned-secret"))])
    assert cell.new == "AIza-planned-secret"
    assert "AIza-planned-secret" not in repr(cell)
