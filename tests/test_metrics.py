"""Metrics through the OpenTelemetry SDK's in-memory reader, against a real PostgreSQL;
the CLI's Prometheus textfile; the alert rules under promtool."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from cryptography.fernet import Fernet
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client.parser import text_string_to_metric_families

from tenantstore import KeyRing, TenantDecryptionError, TenantRepository
from tenantstore.metrics import Metrics
from tenantstore.migrate import encrypt_secrets, upgrade
from tenantstore.migrate.__main__ import main

RULES = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"


@pytest.fixture
def reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture
def provider(reader: InMemoryMetricReader) -> Iterator[MeterProvider]:
    provider = MeterProvider(metric_readers=[reader])
    yield provider
    provider.shutdown()


def points(
    reader: InMemoryMetricReader, *objects: TenantRepository
) -> dict[str, list[tuple[dict[str, Any], Any]]]:
    """Every data point collected now (after flushing `objects`' hot-path counts), by
    metric name: (attributes, value or histogram)."""
    for repo in objects:
        repo.crypto.metrics.flush()
    data = reader.get_metrics_data()
    out: dict[str, list[tuple[dict[str, Any], Any]]] = {}
    if data is None:  # nothing recorded yet
        return out
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            assert scope.scope.name == "tenantstore"
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    value = getattr(point, "value", None)
                    if value is None:
                        value = (point.count, point.sum)
                    out.setdefault(metric.name, []).append((dict(point.attributes or {}), value))
    return out


def total(found: dict[str, list[tuple[dict[str, Any], Any]]], name: str, **attributes: str) -> Any:
    return sum(
        value
        for attrs, value in found.get(name, [])
        if all(attrs.get(f"tenantstore.{k}") == v for k, v in attributes.items())
    )


@pytest.fixture
async def schema(pool: asyncpg.Pool, keyring: KeyRing) -> asyncpg.Pool:
    await upgrade(pool, keyring)
    return pool


async def test_reads_and_writes_are_counted_by_column_and_key_id(
    schema: asyncpg.Pool, keyring: KeyRing, provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    writer = TenantRepository(schema, keyring, meter_provider=provider)
    await writer.create_tenant("acme", "Acme", gemini_api_key="AIza", oauth_access_token="ya29")
    repo = TenantRepository(schema, keyring, meter_provider=provider)
    for _ in range(3):
        await repo.get_tenant("acme")
    found = points(reader, writer, repo)
    kid = keyring.primary_key_id
    assert total(found, "tenantstore.encrypt", column="gemini_api_key", key_id=kid) == 1
    assert total(found, "tenantstore.encrypt", column="oauth_access_token", key_id=kid) == 1
    assert total(found, "tenantstore.decrypt", column="gemini_api_key", key_id=kid) == 1
    assert total(found, "tenantstore.cache.hits", cache="tenants") == 2  # the 2nd and 3rd read
    assert total(found, "tenantstore.cache.misses", cache="tenants") == 1
    assert total(found, "tenantstore.cache.misses", cache="secrets") == 2
    batches = found["tenantstore.worker.batch.size"]
    assert sum(count for _, (count, _) in batches) >= 2  # the write's hop and the read's
    assert found["tenantstore.keys.primary"] == [({"tenantstore.key_id": kid}, 1)]
    # Low cardinality: no attribute ever carries a tenant id or a value.
    for series in found.values():
        for attrs, _ in series:
            assert "acme" not in str(attrs) and "AIza" not in str(attrs)


async def test_decryption_failures_are_counted_by_reason(
    schema: asyncpg.Pool, keyring: KeyRing, provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    foreign = Fernet(Fernet.generate_key()).encrypt(b"x").decode()
    await schema.execute(
        "INSERT INTO tenants (tenant_id, name, webhook_signing_secret) VALUES ('a', 'A', $1)",
        foreign,
    )
    repo = TenantRepository(schema, keyring, meter_provider=provider)
    with pytest.raises(TenantDecryptionError):
        await repo.get_tenant("a")
    await schema.execute("UPDATE tenants SET webhook_signing_secret = 'plain'")
    strict = TenantRepository(schema, keyring, meter_provider=provider, allow_plaintext=False)
    with pytest.raises(Exception, match="plaintext"):
        await strict.get_tenant("a")
    found = points(reader, repo, strict)
    failures = "tenantstore.decrypt.failures"
    assert total(found, failures, column="webhook_signing_secret", reason="wrong_key") == 1
    assert total(found, failures, column="webhook_signing_secret", reason="plaintext_refused") == 1


async def test_a_run_counts_its_secrets_and_records_its_duration(
    schema: asyncpg.Pool, keyring: KeyRing, provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    await schema.execute(
        "INSERT INTO tenants (tenant_id, name, gemini_api_key, oauth_refresh_token) "
        "SELECT 't' || i, 'n', 'k' || i, CASE WHEN i % 2 = 0 THEN 'r' || i END "
        "FROM generate_series(1, 30) AS i"
    )
    await encrypt_secrets(schema, keyring, meter_provider=provider, batch_size=7)
    found = points(reader)
    secrets = "tenantstore.runner.secrets"
    assert (
        total(found, secrets, operation="encrypt", column="gemini_api_key", outcome="changed") == 30
    )
    assert total(found, secrets, column="oauth_refresh_token", outcome="changed") == 15
    [(attrs, (count, seconds))] = found["tenantstore.runner.duration"]
    assert attrs["tenantstore.outcome"] == "completed" and count == 1 and seconds > 0


def test_hot_path_counts_reach_the_instruments_at_most_once_an_interval(
    provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    """The hot path adds to plain counters; the instruments hear of them once a second."""
    now = [100.0]
    metrics = Metrics(provider, clock=lambda: now[0])
    metrics.decrypted("c", "k", 3)
    metrics.cache("tenants", 2, 1)
    assert metrics.count("decrypt", ("c", "k")) == 3
    assert "tenantstore.decrypt" not in points(reader)
    now[0] += 1.0
    metrics.decrypted("c", "k")  # the interval passed: everything so far is flushed
    found = points(reader)
    assert total(found, "tenantstore.decrypt", column="c", key_id="k") == 4
    assert total(found, "tenantstore.cache.hits", cache="tenants") == 2


def test_several_objects_on_one_provider_add_up(
    provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    first, second = Metrics(provider), Metrics(provider)
    first.decrypted("c", "k", 2)
    second.decrypted("c", "k", 5)
    first.flush()
    second.flush()
    assert total(points(reader), "tenantstore.decrypt", column="c", key_id="k") == 7


# -- the CLI's textfile ----------------------------------------------------------------


async def test_verify_writes_a_prometheus_textfile_of_secrets_per_state(
    schema: asyncpg.Pool, database_url: str, key: str, old_key: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    ring = KeyRing(key, [old_key])
    await schema.execute(
        "INSERT INTO tenants (tenant_id, name, gemini_api_key, oauth_access_token) VALUES "
        "('a', 'A', $1, 'plain'), ('b', 'B', $2, NULL)",
        ring.encrypt("x"),
        KeyRing(old_key).encrypt("y"),
    )
    monkeypatch.setenv("ENCRYPTION_KEY", key)
    monkeypatch.setenv("OLD_ENCRYPTION_KEY", old_key)
    path = tmp_path / "prom" / "tenantstore.prom"
    path.parent.mkdir()
    args = ["verify", "--database-url", database_url, "--metrics-file", str(path), "--quiet"]
    assert await asyncio.to_thread(main, args) == 0
    assert [p.name for p in path.parent.iterdir()] == ["tenantstore.prom"]  # no temp left
    text = path.read_text()
    assert key not in text and old_key not in text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }

    def state(column: str, name: str) -> float:
        labels = (("column", column), ("state", name), ("table", "tenants"))
        return samples[("tenantstore_secrets", labels)]

    assert state("gemini_api_key", "primary_key") == 1
    assert state("gemini_api_key", "other_key") == 1
    assert state("oauth_access_token", "plaintext") == 1
    assert state("oauth_access_token", "undecryptable") == 0
    run = (("operation", "verify"), ("table", "tenants"))
    assert samples[("tenantstore_runner_success", run)] == 1
    assert samples[("tenantstore_runner_duration_seconds", run)] > 0
    done = samples[
        (
            "tenantstore_runner_completion_timestamp_seconds",
            (*run[:1], ("outcome", "completed"), run[1]),
        )
    ]
    assert done > 1.7e9


async def test_a_failed_run_still_writes_its_outcome(
    database_url: str, pool: asyncpg.Pool, key: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv("ENCRYPTION_KEY", key)
    path = tmp_path / "run.prom"
    args = ["encrypt", "--database-url", database_url, "--metrics-file", str(path)]
    assert await asyncio.to_thread(main, args) == 2  # no tenants table yet
    text = path.read_text()
    assert 'tenantstore_runner_success{operation="encrypt",table="tenants"} 0.0' in text
    assert 'outcome="failed"' in text


# -- the alert rules -------------------------------------------------------------------


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail(
            "promtool not found: install the Debian package `prometheus` "
            "(`apt-get install --no-install-recommends prometheus`; .ci/run does)"
        )
    return found


def test_the_alert_rules_pass_promtools_check_and_unit_tests() -> None:
    for args in (["check", "rules", "tenantstore.rules.yml"],
                 ["test", "rules", "tenantstore.rules.test.yml"]):  # fmt: skip
        result = subprocess.run(
            [promtool(), *args], cwd=RULES, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_metric_the_rules_use_is_one_tenantstore_exports(tmp_path: Path) -> None:
    """The names in the rules are those the OpenTelemetry Prometheus exporter and the
    textfile actually produce, so a renamed instrument cannot silence an alert."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import CollectorRegistry, generate_latest

    from tenantstore.migrate._textfile import build_registry

    registry = CollectorRegistry()
    provider = MeterProvider(metric_readers=[PrometheusMetricReader()])
    metrics = Metrics(provider)
    metrics.primary_key("0123456789ab")
    metrics.key_check(True)
    metrics.decrypt_failed("c", "wrong_key")
    metrics.flush()
    exported = (
        generate_latest().decode()
        + generate_latest(
            build_registry(
                "encrypt", "tenants", None, outcome="completed", seconds=1, finished_at=1
            )
        ).decode()
    )
    provider.shutdown()
    del registry
    used = set(
        re.findall(r"\b(tenantstore_[a-z_]+)\b", (RULES / "tenantstore.rules.yml").read_text())
    )
    labels = {"tenantstore_column", "tenantstore_reason"}
    names = used - labels
    assert names == {
        "tenantstore_keys_check",
        "tenantstore_keys_primary",
        "tenantstore_decrypt_failures_total",
        "tenantstore_runner_completion_timestamp_seconds",
    }
    for name in names:
        assert re.search(rf"^{name}\{{", exported, re.MULTILINE), name
    for label in labels:
        assert f"{label}=" in exported, label
