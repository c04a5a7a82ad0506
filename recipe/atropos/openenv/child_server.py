"""`ChildServer`: the OpenEnv server an entry's `command` starts, run and supervised by its driver.

The driver picks a free loopback port, fills `{host}` and `{port}` into the command (and
`{openenv_python}`: this repo's `.venv-openenv/bin/python`, which `make install` builds), starts it with
the repo root on PYTHONPATH (the example environments are modules of the repo) in a process group of its own (its output goes to the driver's, i.e. the launcher's env-<name>.log), and
waits for `/health`. When the server exits, the driver says so with its exit code and starts it
again on the same port, with backoff (1 s doubling to 30 s; reset after a minute up): the episodes
it held are lost and counted, the others wait in their reconnect loop. When the driver stops, so
does the server (SIGTERM to its group, SIGKILL after 10 s).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from recipe.atropos.openenv.session import wait_until_healthy

__all__ = ["ChildServer"]

logger = logging.getLogger("verl.recipe.atropos.openenv")
HOST = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parents[3]
OPENENV_PYTHON = REPO_ROOT / ".venv-openenv/bin/python"


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM it when the driver dies, however it dies (Linux's
    PR_SET_PDEATHSIG; elsewhere the launcher's process-tree stop covers it)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def _fill(part: str, values: Mapping[str, str]) -> str:
    for key, value in values.items():
        part = part.replace(key, value)
    return part


class ChildServer:
    """One server process for entry `name`, restarted when it exits until `stop()`."""

    def __init__(self, name: str, command: Sequence[str], *, env: Mapping[str, str] | None = None,
                 cwd: str | None = None, startup_timeout_s: float = 120.0):
        self.name = name
        self.port = _free_port()
        self.url = f"http://{HOST}:{self.port}"
        if any("{openenv_python}" in part for part in command) and not OPENENV_PYTHON.exists():
            raise FileNotFoundError(f"{OPENENV_PYTHON} ({{openenv_python}} in the command) is missing: `make install` "
                                    "builds .venv-openenv")
        values = {"{host}": HOST, "{port}": str(self.port), "{openenv_python}": str(OPENENV_PYTHON)}
        self.argv = [_fill(part, values) for part in command]
        self.env = {**os.environ, **(env or {})}
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), self.env.get("PYTHONPATH", "")) if p)
        self.cwd = cwd
        self.startup_timeout_s = startup_timeout_s
        self.restarts = 0
        self._process: asyncio.subprocess.Process | None = None
        self._stopping = False

    async def start(self) -> str:
        """Start the server and wait for its /health; its URL."""
        logger.info("%s: starting the OpenEnv server: %s", self.name, " ".join(self.argv))
        self._process = await asyncio.create_subprocess_exec(*self.argv, env=self.env, cwd=self.cwd,
                                                             start_new_session=True,
                                                             preexec_fn=_die_with_parent)
        await wait_until_healthy(self.url, self.startup_timeout_s, alive=lambda: self._process.returncode is None)
        return self.url

    async def supervise(self) -> None:
        """Restart the server whenever it exits (runs until cancelled or `stop()`)."""
        delay = 1.0
        while not self._stopping:
            started = time.monotonic()
            code = await self._process.wait()
            if self._stopping:
                return
            delay = 1.0 if time.monotonic() - started > 60 else min(delay * 2, 30.0)
            logger.warning("%s: the OpenEnv server exited with code %s; starting it again in %.0f s "
                           "(its episodes in flight are lost)", self.name, code, delay)
            await asyncio.sleep(delay)
            try:
                await self.start()
                self.restarts += 1
                logger.warning("%s: the OpenEnv server is back at %s (restart %d)", self.name, self.url, self.restarts)
            except (TimeoutError, ConnectionError, OSError) as exc:
                logger.error("%s: the OpenEnv server did not come back: %s", self.name, exc)
                self._kill(signal.SIGKILL)

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def _kill(self, sig: int) -> None:
        if self._process is not None and self._process.returncode is None:
            try:
                os.killpg(self._process.pid, sig)
            except ProcessLookupError:
                pass

    async def stop(self) -> None:
        """Stop the server's process group (SIGTERM, then SIGKILL after 10 s)."""
        self._stopping = True
        if self._process is None or self._process.returncode is not None:
            return
        self._kill(signal.SIGTERM)
        try:
            await asyncio.wait_for(self._process.wait(), 10.0)
        except asyncio.TimeoutError:
            self._kill(signal.SIGKILL)
            await self._process.wait()
