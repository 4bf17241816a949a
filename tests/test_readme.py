"""The README cannot drift from the code: its snippets and commands run here as written.

Every fenced `python` block runs, in order and in one namespace, in a
subprocess (`tests/_readme_runner.py`) against a real PostgreSQL. Every
command of every `sh` block runs in bash against a real PostgreSQL too, in a
scratch directory holding `.env.secrets`, as a user would type it from the
clone: `python3 -m uv run python` becomes this environment's interpreter
(what `uv run` resolves to) and the `pip install uv` step is dropped (uv is
installed). The set-up command runs on the embedded default, with no
`DATABASE_URL`, as the README promises. A few commands cannot run here; each
is listed in SKIPPED with the reason, and must still be in the README.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
from conftest import with_database

from tenantstore import KeyRing, TenantRepository
from tenantstore.encryption import generate_encryption_key
from tenantstore.migrate import upgrade

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PYTHON = shlex.quote(sys.executable)

SKIPPED = {
    "bash scripts/test": "it is the test suite that runs this test",
    "uv add ../tenantstore": "adds tenantstore to another project",
    'uv add "tenantstore @ git+https://git.example.com/you/tenantstore"': "a placeholder URL",
    **{
        f"python3 -m uv run python benchmarks/{script}": "minutes of machine time; "
        "tests/test_benchmarks.py runs every script at a toy size"
        for script in (
            "get_tenant.py --repeat 3",
            "keys.py --repeat 3",
            "pgbouncer.py --repeat 3",
            "audit.py --repeat 3",
            "migrate.py",
        )
    },
}


@dataclass(frozen=True)
class Block:
    """A fenced code block: its language, first line of code, and text."""

    language: str
    line: int
    code: str


def blocks(text: str) -> list[Block]:
    """The fenced code blocks of a Markdown text, with the line their code starts on."""
    found: list[Block] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        match = re.match(r"^```(\w*)", lines[index])
        if match:
            start = index + 1
            end = start
            while not lines[end].startswith("```"):
                end += 1
            found.append(Block(match[1], start + 1, "\n".join(lines[start:end]) + "\n"))
            index = end
        index += 1
    return found


def commands(block: Block) -> list[str]:
    """The commands of a shell block: one per line, comments and blank lines dropped."""
    out = []
    for raw in block.code.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            out.append(re.sub(r"\s+#\s.*$", "", line))  # a trailing comment
    return out


def as_run_here(command: str) -> str:
    """The command as it runs in this checkout's environment."""
    command = command.replace("python3 -m pip install uv && ", "")
    return command.replace("python3 -m uv run python", PYTHON)


README_TEXT = README.read_text(encoding="utf-8")
BLOCKS = blocks(README_TEXT)


def test_the_readme_has_the_snippets_this_test_runs() -> None:
    languages = {b.language for b in BLOCKS}
    assert {"python", "sh"} <= languages
    assert sum(b.language == "python" for b in BLOCKS) >= 8
    for command in SKIPPED:  # a skip that no longer matches a command is stale
        assert any(command in commands(b) for b in BLOCKS if b.language == "sh"), command


def test_every_file_the_readme_names_exists() -> None:
    """No pointer to a file users do not have (it once cited a DESIGN.md)."""
    named = set(re.findall(r"\]\((?!https?://|#)([^)\s]+)\)", README_TEXT))
    paths = r"`((?:tenantstore|sql|tests|benchmarks|deploy|scripts)/[\w./-]+)`"
    named |= {m for m in re.findall(paths, README_TEXT) if not m.endswith("/")}
    named |= {"LICENSE", "scripts/test", ".ci/run"}
    missing = sorted(n for n in named if not (ROOT / n).exists())
    assert not missing, missing
    assert "DESIGN.md" not in README_TEXT


async def migrated_database(server_url: str, key: str) -> str:
    """A new migrated database holding the tenant `acme` with two secrets; its URL."""
    name = f"ts_readme_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = with_database(server_url, name)
    pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
    assert pool is not None
    try:
        await upgrade(pool, KeyRing(key))
        repo = TenantRepository(pool, KeyRing(key))
        await repo.create_tenant(
            "acme", "Acme", gemini_api_key="AIza-old", oauth_access_token="ya29"
        )
    finally:
        await pool.close()
    return url


@pytest.mark.slow
def test_every_python_snippet_runs(database_url: str, key: str, tmp_path: Path) -> None:
    import asyncio

    async def migrate() -> None:
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
        assert pool is not None
        try:
            await upgrade(pool, KeyRing(key))
        finally:
            await pool.close()

    asyncio.run(migrate())
    python = [{"line": b.line, "code": b.code} for b in BLOCKS if b.language == "python"]
    (tmp_path / "blocks.json").write_text(json.dumps(python))
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "_readme_runner.py"), "blocks.json"],
        cwd=tmp_path,
        env={**os.environ, "DATABASE_URL": database_url, "ENCRYPTION_KEY": key},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("ok ") == len(python)


def run_shell(command: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", f"set -euo pipefail\n{command}"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
async def test_every_shell_command_runs(server_url: str, key: str, tmp_path: Path) -> None:
    """Block by block: each on a database of its own (migrated, holding `acme`), in a
    scratch directory whose .env.secrets holds the key, its commands in order."""
    import asyncio

    env = {k: v for k, v in os.environ.items() if not k.startswith(("ENCRYPTION", "DATABASE"))}
    env["NEW_KEY"] = "AIza-new-key-from-stdin"
    ran = 0
    setup = BLOCKS[[b.language for b in BLOCKS].index("sh")]  # the set-up commands: below
    for block in BLOCKS:
        if block.language != "sh" or block is setup:
            continue
        here_dir = tmp_path / f"block{block.line}"
        here_dir.mkdir()
        secrets = here_dir / ".env.secrets"
        secrets.write_text(f"ENCRYPTION_KEY={key}\n")
        secrets.chmod(0o600)
        block_env = {**env, "DATABASE_URL": await migrated_database(server_url, key)}
        for command in commands(block):
            if command in SKIPPED:
                continue
            here = as_run_here(command).replace(
                "cd deploy/prometheus", f"cd {ROOT}/deploy/prometheus"
            )
            result = await asyncio.to_thread(run_shell, here, here_dir, block_env)
            output = result.stdout + result.stderr
            assert result.returncode == 0, f"README.md:{block.line}: {command}\n{output}"
            assert key not in output
            ran += 1
    assert ran >= 15


@pytest.mark.slow
def test_the_set_up_command_runs_the_main_job_on_the_embedded_default(tmp_path: Path) -> None:
    """The README's first command, on a machine with no DATABASE_URL: key, schema, encryption."""
    setup = next(b for b in BLOCKS if b.language == "sh")
    main_job = [c for c in commands(setup) if c not in SKIPPED]
    assert len(main_job) == 1 and "tenantstore.migrate up" in main_job[0]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ENCRYPTION", "DATABASE"))}
    result = run_shell(as_run_here(main_job[0]), tmp_path, env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == (
        "Migration complete: 0 keys encrypted, 0 already encrypted"
    )
    assert "embedded development PostgreSQL" in result.stderr
    secrets = tmp_path / ".env.secrets"
    assert (secrets.stat().st_mode & 0o777) == 0o600
    key = secrets.read_text().split("=", 1)[1].strip()
    assert key not in result.stdout + result.stderr
    again = run_shell(as_run_here(main_job[0]), tmp_path, env)  # --if-missing keeps the key
    assert again.returncode == 0, again.stderr
    assert secrets.read_text().split("=", 1)[1].strip() == key


def test_a_generated_key_round_trips() -> None:
    """The README's claim that `keys generate` keys are standard Fernet keys."""
    ring = KeyRing(generate_encryption_key())
    assert ring.decrypt(ring.encrypt("x")) == "x"
