"""What the migration CLI prints: pure functions from reports to lines and JSON data.

Every line carries versions, states, names, keys and counts; never a secret.
"""

from __future__ import annotations

from typing import Any

from ..errors import printable
from .plan import REPORT_SCHEMA_VERSION, SecretsReport
from .schema import MigrationReport, StatusReport

__all__ = ["format_status", "report_data"]


def format_status(status: StatusReport) -> list[str]:
    """The lines `status` prints (no secrets: versions, run states and counts)."""
    lines = [f"Schema version: {status.version}"]
    lines += [f"  applied {m.version:04d}_{m.name} at {m.applied_at:%Y-%m-%d %H:%M:%S%z}"
              for m in status.applied]  # fmt: skip
    lines += [f"  pending {label}" for label in status.pending]
    lines += [f"  CHANGED since applied: {name}" for name in status.changed]
    lines += [f"  UNKNOWN applied version {version:04d}" for version in status.unknown]
    for run in status.runs:
        operation = run["operation"]
        target = printable(str(run.get("target") or "tenants"))
        state = "INTERRUPTED" if run["interrupted"] else str(run["status"])
        line = f"Last {operation} of {target}: {state}, started "
        line += f"{run['started_at']:%Y-%m-%d %H:%M:%S%z}, {run['rows_done']} rows done"
        if run["interrupted"]:
            line += f" (rerun `python -m tenantstore.migrate {operation}` to finish)"
        lines.append(line)
    counts = status.counts
    if counts is None:
        lines.append(f"Secrets in {status.table}: not counted ({status.not_counted})")
        return lines
    lines.append(
        f"Secrets in {status.table}: {counts.current} current key, {counts.previous} "
        f"previous key, {counts.plaintext} plaintext, {counts.failed} undecryptable"
    )
    lines += counts.column_lines()
    lines += [
        f"  undecryptable: {printable(f.column)} of {printable(f.key)}"
        for f in counts.failures[:20]
    ]
    if counts.failed > 20:
        lines.append(f"  ... and {counts.failed - 20} more (see --json)")
    return lines


def report_data(report: MigrationReport | SecretsReport | StatusReport) -> dict[str, Any]:
    """A report as the JSON `--json` prints; every layout carries `schema`."""
    if isinstance(report, SecretsReport):
        return report.as_dict()
    if isinstance(report, MigrationReport):
        return {
            "schema": REPORT_SCHEMA_VERSION,
            "direction": report.direction,
            "applied": report.applied,
            "version": report.version,
            "data": [data.as_dict() for data in report.data],
        }
    return {
        "schema": REPORT_SCHEMA_VERSION,
        "version": report.version,
        "applied": [f"{m.version:04d}_{m.name}" for m in report.applied],
        "pending": report.pending,
        "changed": report.changed,
        "unknown": report.unknown,
        "runs": [{k: str(v) for k, v in run.items()} for run in report.runs],
        "table": report.table,
        "counts": None if report.counts is None else report.counts.as_dict(),
        "not_counted": report.not_counted,
    }
