"""`--metrics-file PATH`: a short-lived run's figures for node_exporter's textfile collector.

Written with prometheus-client's `write_to_textfile` (a temporary file then
a rename, so the collector never reads half a file). Metrics:

| name | labels | meaning |
| --- | --- | --- |
| tenantstore_secrets | table, column, state | secrets per state, from verify/status: primary_key, other_key, plaintext, undecryptable |
| tenantstore_runner_secrets | operation, table, column, outcome | what this run did, per column: changed, skipped, failed, ... |
| tenantstore_runner_duration_seconds | operation, table | how long the run took |
| tenantstore_runner_success | operation, table | 1 when the run completed, 0 when it failed |
| tenantstore_runner_completion_timestamp_seconds | operation, table, outcome | when it ended (Unix time) |

Names and counts only, never a secret or a key.
"""  # noqa: E501

from __future__ import annotations

import os
import time

from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

from .plan import SecretsReport
from .schema import MigrationReport, StatusReport

__all__ = ["write_metrics_file"]

_STATES = {
    "primary_key": "current",
    "other_key": "previous",
    "plaintext": "plaintext",
    "undecryptable": "failed",
}


def _secrets_report(
    report: MigrationReport | SecretsReport | StatusReport | None,
) -> SecretsReport | None:
    if isinstance(report, SecretsReport):
        return report
    if isinstance(report, MigrationReport):
        return report.combined_data()
    if isinstance(report, StatusReport):
        return report.counts
    return None


def build_registry(
    operation: str,
    table: str,
    report: MigrationReport | SecretsReport | StatusReport | None,
    *,
    outcome: str,
    seconds: float,
    finished_at: float,
) -> CollectorRegistry:
    """The run's metrics as a registry of its own (pure: nothing global is touched)."""
    registry = CollectorRegistry()
    run = {"operation": operation, "table": table}
    Gauge(
        "tenantstore_runner_duration_seconds", "How long the run took",
        list(run), registry=registry,
    ).labels(**run).set(seconds)  # fmt: skip
    Gauge(
        "tenantstore_runner_success", "1 when the run completed, 0 when it failed",
        list(run), registry=registry,
    ).labels(**run).set(1 if outcome == "completed" else 0)  # fmt: skip
    Gauge(
        "tenantstore_runner_completion_timestamp_seconds", "When the run ended (Unix time)",
        [*run, "outcome"], registry=registry,
    ).labels(**run, outcome=outcome).set(finished_at)  # fmt: skip
    data = _secrets_report(report)
    if data is None:
        return registry
    secrets = Gauge(
        "tenantstore_runner_secrets",
        "Secrets this run processed, per column and outcome",
        [*run, "column", "outcome"],
        registry=registry,
    )
    for column, counts in data.columns.items():
        for name, value in counts.as_dict().items():
            if name != "keys":
                secrets.labels(**run, column=column, outcome=name).set(value)
    if data.operation == "verify":
        states = Gauge(
            "tenantstore_secrets",
            "Secrets per state, as verify or status counted them",
            ["table", "column", "state"],
            registry=registry,
        )
        for column, counts in data.columns.items():
            for state, field in _STATES.items():
                states.labels(table=table, column=column, state=state).set(getattr(counts, field))
    return registry


def write_metrics_file(
    path: str | os.PathLike[str],
    operation: str,
    table: str,
    report: MigrationReport | SecretsReport | StatusReport | None,
    *,
    outcome: str,
    seconds: float,
) -> None:
    """Write the run's metrics to `path` atomically (temporary file, then rename)."""
    registry = build_registry(
        operation, table, report, outcome=outcome, seconds=seconds, finished_at=time.time()
    )
    write_to_textfile(os.fspath(path), registry)
