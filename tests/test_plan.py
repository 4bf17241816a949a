"""plan_batch and SecretsReport: the batch runner's pure half, no database."""

from __future__ import annotations

from cryptography.fernet import Fernet

from tenantstore import KeyRing
from tenantstore.migrate.plan import SecretsReport, plan_batch


def test_encrypt_skips_tokens_without_decrypting_and_encrypts_the_rest(key: str) -> None:
    ring = KeyRing(key)
    foreign = Fernet(Fernet.generate_key()).encrypt(b"x").decode()  # no key of ours made it
    rows = [("a", "plain-a"), ("b", foreign), ("c", "plain-c")]
    batch = plan_batch("encrypt", ring, rows)
    assert batch.skipped == 1 and batch.ids == ["a", "c"] and batch.old == ["plain-a", "plain-c"]
    assert [ring.decrypt(token) for token in batch.new] == ["plain-a", "plain-c"]


def test_rotate_reencrypts_previous_key_tokens_only(key: str, old_key: str) -> None:
    ring = KeyRing(key, [old_key])
    old_token, new_token = KeyRing(old_key).encrypt("o"), KeyRing(key).encrypt("n")
    foreign = Fernet(Fernet.generate_key()).encrypt(b"x").decode()
    rows = [("old", old_token), ("new", new_token), ("plain", "p"), ("bad", foreign)]
    batch = plan_batch("rotate", ring, rows)
    assert batch.ids == ["old"] and batch.old == [old_token]
    assert KeyRing(key).decrypt(batch.new[0]) == "o"
    assert (batch.skipped, batch.current, batch.previous, batch.plaintext) == (1, 1, 1, 1)
    assert batch.failed == ["bad"]


def test_decrypt_and_verify_classify_every_row(key: str, old_key: str) -> None:
    ring = KeyRing(key, [old_key])
    rows = [("cur", ring.encrypt("c")), ("old", KeyRing(old_key).encrypt("o")), ("p", "plain")]
    decrypt = plan_batch("decrypt", ring, rows)
    assert decrypt.ids == ["cur", "old"] and decrypt.new == ["c", "o"] and decrypt.skipped == 1
    verify = plan_batch("verify", ring, rows)
    assert verify.ids == [] and (verify.current, verify.previous, verify.plaintext) == (1, 1, 1)


def test_summary_lines_are_exact_and_add_failures_only_when_there_are_some() -> None:
    report = SecretsReport("encrypt", changed=3, skipped=2)
    assert report.summary() == "Migration complete: 3 keys encrypted, 2 already encrypted"
    report.failed_tenant_ids.append("t1")
    assert report.summary().endswith(", 1 failed")
    assert SecretsReport("rotate", changed=1, skipped=4).summary() == (
        "Rotation complete: 1 keys rotated, 4 already current"
    )
    assert SecretsReport("decrypt", changed=2, skipped=0).summary() == (
        "Migration complete: 2 keys decrypted, 0 already plaintext"
    )
    data = SecretsReport("verify", current=1, plaintext=2).as_dict()
    assert data["rows"] == 3 and data["failed"] == 0


def test_planning_a_page_in_slices_gives_the_same_batch(key: str, old_key: str) -> None:
    from tenantstore.migrate.secrets import _plan_in_slices

    ring = KeyRing(key, [old_key])
    old = KeyRing(old_key)
    rows = [(f"t{i:04d}", old.encrypt(f"v{i}") if i % 3 else f"plain{i}") for i in range(700)]
    whole = plan_batch("rotate", ring, rows)
    sliced = _plan_in_slices("rotate", ring, rows)
    assert sliced.ids == whole.ids and sliced.old == whole.old
    assert [ring.decrypt(t) for t in sliced.new] == [ring.decrypt(t) for t in whole.new]
    counts = ("skipped", "current", "previous", "plaintext", "failed")
    assert [getattr(sliced, c) for c in counts] == [getattr(whole, c) for c in counts]
    assert sliced.previous == 466 and sliced.plaintext == 234
