"""Start a server as a real process on a free loopback port and wait until it answers (the tests'
servers and the benchmarks' alike).

Servers started here bind 127.0.0.1 only. Run what starts them under ``loopback-only`` as well, so
that nothing can reach past this machine even if a server ignores its host option.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import requests

LOOPBACK_HOST = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parents[2]


def find_free_loopback_port() -> int:
    """A TCP port nothing listens on right now (the OS picks it; another process could take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK_HOST, 0))
        return probe.getsockname()[1]


def port_is_free(port: int) -> bool:
    """True when a server could bind ``port`` on loopback now (SO_REUSEADDR, as uvicorn binds, so
    a port left in TIME_WAIT by earlier connections counts as free)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((LOOPBACK_HOST, port))
        except OSError:
            return False
    return True


def wait_for_http_ok(
    url: str, timeout_s: float = 60.0, *, process: subprocess.Popen | None = None, log_path: Path | None = None
) -> None:
    """Poll ``GET url`` until it answers 200; raise, with the server's log, if it dies or times out."""
    deadline = time.monotonic() + timeout_s
    last_problem = "no attempt yet"
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(
                f"server exited with code {process.returncode} before {url} answered; log:\n{_tail(log_path)}"
            )
        try:
            response = requests.get(url, timeout=2.0)
            if response.status_code == 200:
                return
            last_problem = f"HTTP {response.status_code}: {response.text[:200]}"
        except requests.RequestException as exc:
            last_problem = f"{type(exc).__name__}: {exc}"
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer 200 within {timeout_s} s (last: {last_problem}); log:\n{_tail(log_path)}")


def _tail(log_path: Path | None, limit: int = 4000) -> str:
    if log_path is None or not log_path.exists():
        return "(no log)"
    return log_path.read_text(errors="replace")[-limit:]


class ServerProcess:
    """A server running as a child process, its output captured to a log file.

    Use as a context manager, or call :meth:`stop`. Stopping signals this process only (by its
    pid): SIGTERM, then SIGKILL if it has not exited after ``stop_timeout_s``.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        port: int,
        health_path: str = "/health",
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
    ) -> None:
        self.argv = list(argv)
        self.port = port
        self.url = f"http://{LOOPBACK_HOST}:{port}"
        self.health_path = health_path
        self._env = env
        self._cwd = cwd if cwd is not None else REPO_ROOT
        self._log_file = tempfile.NamedTemporaryFile(prefix="server-", suffix=".log", delete=False)
        self.log_path = Path(self._log_file.name)
        self.process: subprocess.Popen | None = None

    def start(self, startup_timeout_s: float = 60.0) -> ServerProcess:
        """Spawn the process and wait until it answers ``health_path``."""
        return self.spawn().wait_ready(startup_timeout_s)

    def spawn(self) -> ServerProcess:
        """Start the process without waiting for it to answer (then :meth:`wait_ready`)."""
        env = dict(os.environ if self._env is None else self._env)
        # The repo root first, as in the project's own runs (see pyproject.toml).
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.setdefault("HF_HUB_OFFLINE", "1")  # these servers never reach a hub
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.process = subprocess.Popen(
            self.argv, stdout=self._log_file, stderr=subprocess.STDOUT, env=env, cwd=self._cwd, start_new_session=True
        )
        return self

    def wait_ready(self, startup_timeout_s: float = 60.0) -> ServerProcess:
        """Wait until the spawned process answers ``health_path``; stop it if it does not."""
        try:
            wait_for_http_ok(self.url + self.health_path, startup_timeout_s, process=self.process, log_path=self.log_path)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, stop_timeout_s: float = 10.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(stop_timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(stop_timeout_s)
        self._log_file.close()

    def log_text(self) -> str:
        return _tail(self.log_path, limit=1_000_000)

    def __enter__(self) -> ServerProcess:
        if self.process is None:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def start_server_process(
    argv: Sequence[str],
    *,
    port: int,
    health_path: str = "/health",
    startup_timeout_s: float = 60.0,
    env: Mapping[str, str] | None = None,
) -> ServerProcess:
    """Start ``argv`` (which must make the server listen on ``port``) and wait for ``health_path``."""
    return ServerProcess(argv, port=port, health_path=health_path, env=env).start(startup_timeout_s)
