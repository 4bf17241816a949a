"""The built wheel carries sql/ and finds it through importlib.resources."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_ships_sql_and_loads_it_outside_the_checkout(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "uv", "build", "--wheel", "--out-dir", str(dist), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = dist.glob("tenantstore-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "uv", "venv", "-q", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "uv", "pip", "install", "-q", "--python", str(python), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    probe = (
        "import tenantstore, tenantstore._queries as q, tenantstore.migrate as m;"
        "print(tenantstore.__file__);"
        "print(sorted(q.load_queries('tenants.sql')));"
        "print([x.label for x in m.load_migrations()])"
    )
    result = subprocess.run(
        [str(python), "-c", probe],
        cwd=tmp_path,  # not the checkout: nothing may be found relative to it
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    location, queries, migrations = result.stdout.strip().splitlines()
    assert location.startswith(str(venv)) and str(ROOT) not in location
    assert "'get_tenant'" in queries
    assert migrations.startswith("['0001_create_tenants', '0002_encrypt_gemini_api_keys', ")
