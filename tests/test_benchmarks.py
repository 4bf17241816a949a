"""Every benchmark script runs end to end, at a toy size, and prints its tables and ratios.

No figure is checked (machines here are shared and noisy): this catches a
script that no longer runs against the code it measures, before a user does.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
LOAD = ["--clients", "4", "--pool-size", "2", "--requests", "200", "--warmup", "20"]
RUNS = {
    "get_tenant": (
        ["--tenants", "50", *LOAD, "--repeat", "1", "--live-writes", "5"],
        ["warm c/a", "live f/a", "commit-to-notified"],
    ),
    "keys": (
        ["--tenants", "50", *LOAD, "--repeat", "1", "--startup-keys", "1", "2"],
        ["start-up through SoftHSM2", "four/one warm", "hsm/one cold"],
    ),
    "pgbouncer": (
        ["--tenants", "50", *LOAD, "--repeat", "1"],
        ["warm pgbouncer/direct", "cold pgbouncer/nocache"],
    ),
    "audit": (
        ["--seconds", "0.5", "--warmup-seconds", "0.2", "--tenants", "50", *LOAD, "--repeat", "1"],
        ["events/s", "pg/off"],
    ),
    "migrate": (
        ["--rows", "2000", "--baseline-rows", "200", "--batch-size", "500"],
        ["c4 / c4x1", "verify / d-dec-4", "RSS c4 / c4 (rows/10)"],
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("script", list(RUNS))
async def test_benchmark_runs_and_prints_its_ratios(
    script: str, server_url: str, tmp_path: Path
) -> None:
    args, expected = RUNS[script]
    command = [sys.executable, str(BENCHMARKS / f"{script}.py"), "--database-url", server_url]
    result = await asyncio.to_thread(
        subprocess.run,
        [*command, *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    for line in expected:
        assert line in result.stdout, f"{line!r} not in:\n{result.stdout}"
