"""Helpers shared by the benchmark scripts: the server, a scratch database, loop lag,
measuring sections of a run, and running one variant in a child process.

Not a benchmark itself; `python benchmarks/<name>.py` puts this directory on
`sys.path`, so scripts import it as `_common`.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import psutil

from tenantstore.db import embedded_database_url, resolve_database_url

__all__ = [
    "LoopLag",
    "Meter",
    "backend_process",
    "cell",
    "peak_rss_mb",
    "run_child",
    "scratch_database",
    "server_url",
    "text_table",
    "with_database",
    "worst_lag",
]


def server_url(database_url: str | None) -> str:
    """The explicit URL, else `DATABASE_URL`, else the embedded development server."""
    return resolve_database_url(database_url) or embedded_database_url()


def with_database(url: str, database: str, scheme: str | None = None) -> str:
    """`url` pointing at another database (and optionally another scheme), all else kept."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(scheme=scheme or parts.scheme, path=f"/{database}"))


@asynccontextmanager
async def scratch_database(url: str, prefix: str = "tenantstore_bench") -> AsyncIterator[str]:
    """Create `<prefix>_<pid>` on the server at `url`, yield its URL, drop it afterwards."""
    name = f"{prefix}_{os.getpid()}"
    admin = await asyncpg.connect(url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield with_database(url, name)
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def worst_lag(stop: asyncio.Event, interval: float = 0.001) -> float:
    """Sleep `interval` in a loop until `stop`; return the largest overshoot in seconds."""
    worst = 0.0
    while not stop.is_set():
        start = time.perf_counter()
        await asyncio.sleep(interval)
        worst = max(worst, time.perf_counter() - start - interval)
    return worst


class LoopLag:
    """The worst event-loop lag while inside `async with LoopLag() as lag:` (`lag.worst_ms`)."""

    worst_ms = 0.0

    async def __aenter__(self) -> LoopLag:
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(worst_lag(self._stop))
        await asyncio.sleep(0.01)  # let the monitor take its first step
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        self.worst_ms = await self._task * 1e3


def backend_process(pid: int) -> psutil.Process | None:
    """The PostgreSQL backend `pid` as a process, when the server runs on this machine."""
    try:
        process = psutil.Process(pid)
        process.cpu_times()
    except psutil.Error:
        return None
    return process


def peak_rss_mb() -> float:
    """This process's peak resident set so far, in MB (Linux reports KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Meter:
    """Adds up measured sections: wall time, this process's CPU, a backend's CPU.

    Enter it (`with meter:`) around each section to count, as often as needed;
    what runs between sections (preparing what a limit takes as given, such
    as ready tokens) is left out. `server_cpu_s` stays None without a backend.

    Args:
        backend: the PostgreSQL backend doing the work (see `backend_process`).
    """

    def __init__(self, backend: psutil.Process | None = None) -> None:
        self.backend = backend
        self.seconds = 0.0
        self.client_cpu_s = 0.0
        self.server_cpu_s: float | None = None if backend is None else 0.0
        self._start = (0.0, 0.0, 0.0)

    def _server(self) -> float:
        if self.backend is None:
            return 0.0
        times = self.backend.cpu_times()
        return times.user + times.system

    def __enter__(self) -> Meter:
        self._start = (time.perf_counter(), time.process_time(), self._server())
        return self

    def __exit__(self, *exc: object) -> None:
        wall, cpu, server = self._start
        self.seconds += time.perf_counter() - wall
        self.client_cpu_s += time.process_time() - cpu
        if self.server_cpu_s is not None:
            self.server_cpu_s += self._server() - server


async def run_child(argv: list[str], env: Mapping[str, str]) -> Any:
    """Run `python *argv` with `env` added to the environment; return its last line as JSON.

    Secrets and URLs go in `env`, never in `argv` (which `ps` shows to everyone).

    Raises:
        RuntimeError: the child exited with an error (its stderr is left on ours).
    """
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *argv, stdout=asyncio.subprocess.PIPE, env={**os.environ, **env}
    )
    out, _ = await proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{argv[0]} {' '.join(argv[1:3])} failed (exit {proc.returncode})")
    return json.loads(out.decode().strip().splitlines()[-1])


def cell(value: float | None, spec: str) -> str:
    """`value` formatted with `spec` for a table, or `-` when there is none."""
    return "-" if value is None else format(value, spec)


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A plain-text table's lines: the first column left-aligned, the others right-aligned."""
    lines = [header, *rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return [
        " ".join(
            text.ljust(width) if i == 0 else text.rjust(width)
            for i, (text, width) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in lines
    ]
