"""Test helpers: the tests' own servers (atroposlib's run-api, the CPU policy server), started through
recipe/atropos/server_process.py, whose helpers the tests import from here."""

from __future__ import annotations

import sys
from pathlib import Path

from recipe.atropos.server_process import (  # noqa: F401  (re-exported for the tests)
    LOOPBACK_HOST,
    REPO_ROOT,
    ServerProcess,
    find_free_loopback_port,
    port_is_free,
    start_server_process,
    wait_for_http_ok,
)


def start_atropos_run_api(port: int | None = None, startup_timeout_s: float = 60.0) -> ServerProcess:
    """atroposlib's real trajectory API (its ``run-api`` entry point) on a loopback port."""
    port = port or find_free_loopback_port()
    argv = [sys.executable, "-m", "atroposlib.cli.run_api", "--host", LOOPBACK_HOST, "--port", str(port)]
    return start_server_process(argv, port=port, health_path="/", startup_timeout_s=startup_timeout_s)


def start_cpu_policy_server(model_dir: Path | str, served_model_name: str = "tiny") -> ServerProcess:
    """The repo's CPU policy server (`recipe.atropos.cpu.openai_api`) for `model_dir`, on a free loopback port."""
    port = find_free_loopback_port()
    argv = [sys.executable, "-m", "recipe.atropos.cpu.openai_api", "--model", str(model_dir),
            "--port", str(port), "--served-model-name", served_model_name]
    return start_server_process(argv, port=port, startup_timeout_s=120)
