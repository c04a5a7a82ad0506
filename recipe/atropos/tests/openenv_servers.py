"""OpenEnv servers for the tests and the benchmark: uvicorn from `.venv-openenv` (made by `make install`)
on a free loopback port, serving an app written with OpenEnv's own server API."""

from __future__ import annotations

import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from recipe.atropos.server_process import REPO_ROOT, ServerProcess, find_free_loopback_port

OPENENV_PYTHON = REPO_ROOT / ".venv-openenv/bin/python"
ARITHMETIC_APP = "recipe.atropos.openenv.examples.arithmetic_env:app"
GUESS_APP = "recipe.atropos.tests.openenv_guess_env:app"


def openenv_server_argv(app: str, host: str = "127.0.0.1", port: int | str = "{port}",
                        python: str | None = None) -> list[str]:
    """uvicorn serving `app` from .venv-openenv, quiet (no access log: one line per connection); the
    default port and `python="{openenv_python}"` are the placeholders a driver's `command` fills."""
    return [python or str(OPENENV_PYTHON), "-m", "uvicorn", app, "--host", host, "--port", str(port),
            "--log-level", "warning", "--no-access-log"]


def require_openenv() -> Path:
    """The server venv, or skip: `make install` builds it (`make test` always has it)."""
    if not OPENENV_PYTHON.exists():
        pytest.skip(f"{OPENENV_PYTHON} is missing: `make install` builds .venv-openenv")
    return OPENENV_PYTHON


def openenv_server(app: str, env: Mapping[str, str] | None = None) -> ServerProcess:
    """An OpenEnv server, not started yet (start several at once: each takes 4-14 s to import openenv)."""
    port = find_free_loopback_port()
    return ServerProcess(openenv_server_argv(app, port=port), port=port, env={**os.environ, **(env or {})})


def start_all(*servers: ServerProcess, startup_timeout_s: float = 180.0) -> None:
    """Start `servers` side by side (each waits for its health route); all stopped if one fails."""
    with ThreadPoolExecutor(len(servers)) as pool:
        futures = [pool.submit(s.start, startup_timeout_s) for s in servers]
    try:
        for future in futures:
            future.result()
    except BaseException:
        for server in servers:
            server.stop()
        raise
