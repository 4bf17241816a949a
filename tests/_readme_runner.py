"""Runs the README's Python snippets in order, in one namespace (a subprocess of test_readme).

Usage: `python tests/_readme_runner.py BLOCKS.json`, with `DATABASE_URL` (a
migrated database) and `ENCRYPTION_KEY` in the environment. The namespace
starts with what the README's snippets assume exists: `pool`, `keyring`,
`repo` and `database_url`. Snippets may use top-level `await`. An ASGI `app`
a snippet defines is started through its lifespan, asked for a tenant's
route, and stopped. Prints `ok LINE` per snippet; on a failure, the traceback
and exit 1.
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import tenantstore


async def drive_asgi(app: Any) -> None:
    """Start `app` through its lifespan, GET one route, stop it: a minimal ASGI client."""
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    await inbox.put({"type": "lifespan.startup"})
    lifespan = asyncio.ensure_future(app({"type": "lifespan", "state": {}}, inbox.get, outbox.put))
    started = await outbox.get()
    if started["type"] != "lifespan.startup.complete":
        raise RuntimeError(f"the app did not start: {started}")
    for path, expected in (("/tenants/acme/model", 200), ("/tenants/nobody/model", 404)):
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any], sent: list[dict[str, Any]] = sent) -> None:
            sent.append(message)

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
            "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
            "query_string": b"", "headers": [], "client": ("test", 1), "server": ("test", 80),
            "state": {},
        }  # fmt: skip
        await app(scope, receive, send)
        status = next(m["status"] for m in sent if m["type"] == "http.response.start")
        if status != expected:
            raise RuntimeError(f"GET {path} answered {status}, not {expected}")
    await inbox.put({"type": "lifespan.shutdown"})
    stopped = await outbox.get()
    await lifespan
    if stopped["type"] != "lifespan.shutdown.complete":
        raise RuntimeError(f"the app did not stop cleanly: {stopped}")


async def main(blocks: list[dict[str, Any]]) -> int:
    pool = await tenantstore.create_pool()
    keyring = tenantstore.KeyRing.from_env()
    namespace: dict[str, Any] = {
        "__name__": "readme",
        "pool": pool,
        "keyring": keyring,
        "repo": tenantstore.TenantRepository(pool, keyring),
        "database_url": os.environ["DATABASE_URL"],
    }
    try:
        for block in blocks:
            line = block["line"]
            try:
                code = compile(
                    block["code"], f"README.md:{line}", "exec",
                    flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT,
                )  # fmt: skip
                result = eval(code, namespace)  # noqa: S307 - the README's own code
                if asyncio.iscoroutine(result):
                    await result
                app = namespace.pop("app", None)
                if app is not None:
                    repo = namespace["repo"]
                    if await repo.get_tenant("acme") is None:
                        await repo.create_tenant("acme", "Acme", gemini_api_key="AIza")
                    await drive_asgi(app)
            except BaseException:
                print(f"FAILED README.md:{line}", flush=True)
                traceback.print_exc()
                return 1
            print(f"ok {line}", flush=True)
    finally:
        await pool.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(json.loads(Path(sys.argv[1]).read_text(encoding="utf-8")))))
