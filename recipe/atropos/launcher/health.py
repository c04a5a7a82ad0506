"""Ports and health: is a port free before we start, and is a started service answering yet?

A service counts as healthy when ``GET <health_url>`` answers 200, and, when the answer is a JSON
object with a ``status`` field, that field is ``"ok"`` (the environment service answers 503
``"starting"`` while it loads; vLLM answers 200 with an empty body).
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections.abc import Sequence

import requests

from recipe.atropos.launcher.plan import ServiceSpec
from recipe.atropos.launcher.process import ManagedProcess

__all__ = ["LaunchError", "PortInUseError", "check_ports_free", "port_in_use", "probe", "wait_until_healthy"]

logger = logging.getLogger("atropos.launcher")


class LaunchError(RuntimeError):
    """The launch cannot go on: a service failed to start, died, or a port is taken."""


class PortInUseError(LaunchError):
    """A configured port is already taken on its host."""


def port_in_use(host: str, port: int) -> bool:
    """True when something already listens on ``host:port`` (binding it fails with EADDRINUSE)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe_socket:
        # As servers do: a port left in TIME_WAIT by a previous run is not "in use".
        probe_socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe_socket.bind((host.strip("[]"), port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            if exc.errno == errno.EADDRNOTAVAIL:
                # Not an address of this machine: the service runs on another node (its command
                # starts it there, e.g. through `srun -w <node>`); its health check will tell.
                return False
            raise LaunchError(f"cannot check port {port} on {host!r}: {exc}") from exc
    return False


def check_ports_free(services: Sequence[ServiceSpec]) -> None:
    """Raise naming the port, the service and its config key if a port is taken."""
    for spec in services:
        if spec.port is not None and spec.host is not None and port_in_use(spec.host, spec.port):
            raise PortInUseError(
                f"port {spec.port} on {spec.host} is already in use: {spec.name} cannot listen there. "
                f"Stop whatever holds it (`ss -ltnp 'sport = :{spec.port}'` shows it) or choose another "
                f"port ({_port_key(spec)})"
            )


def _port_key(spec: ServiceSpec) -> str:
    if spec.role == "inference":
        return f"{spec.config_key}.base_port / ports"
    if spec.role == "policy":
        return f"{spec.config_key}, by default following trainer.atropos.policy_gateway_port"
    return f"{spec.config_key}.port"


def probe(url: str, timeout_s: float = 2.0) -> tuple[bool, str]:
    """One health request: (healthy, what was seen), never raises."""
    try:
        response = requests.get(url, timeout=(min(1.0, timeout_s), timeout_s))
    except requests.RequestException as exc:
        return False, _short_reason(exc)
    if response.status_code != 200:
        return False, f"HTTP {response.status_code}"
    try:
        body = response.json()
    except ValueError:
        return True, "HTTP 200"
    if isinstance(body, dict) and "status" in body and body["status"] != "ok":
        return False, f"HTTP 200 with status {body['status']!r}"
    return True, "HTTP 200"


def _short_reason(exc: requests.RequestException) -> str:
    if isinstance(exc, requests.ConnectionError):
        return "connection refused" if "refused" in str(exc).lower() else "cannot connect"
    if isinstance(exc, requests.Timeout):
        return "no answer (timeout)"
    return type(exc).__name__


def wait_until_healthy(procs: Sequence[ManagedProcess], timeout_s: float, progress_interval_s: float) -> None:
    """Wait until every process's health URL answers; raise with the log tail if one dies or times out.

    Waits for all of them at once (workers load in parallel) and logs a progress line every
    ``progress_interval_s`` naming those still pending and what their health URL last said.
    """
    pending = {p.name: p for p in procs if p.spec.health_url}
    last_seen = {name: "no answer yet" for name in pending}
    start = time.monotonic()
    deadline = start + timeout_s
    next_progress = start + progress_interval_s
    while pending:
        for name, proc in list(pending.items()):
            code = proc.poll()
            if code is not None:
                raise LaunchError(
                    f"{name} exited with code {code} before {proc.spec.health_url} answered; "
                    f"last lines of {proc.log_path}:\n{proc.tail()}"
                )
            healthy, last_seen[name] = probe(proc.spec.health_url or "")
            if healthy:
                elapsed = time.monotonic() - start
                logger.info("%s is healthy (%s, %.1f s)", name, proc.spec.health_url, elapsed)
                del pending[name]
        if not pending:
            return
        now = time.monotonic()
        if now >= deadline:
            name, proc = next(iter(pending.items()))
            raise LaunchError(
                f"{name} did not become healthy within {timeout_s:g} s ({proc.spec.health_url}: "
                f"{last_seen[name]}); last lines of {proc.log_path}:\n{proc.tail()}"
            )
        if now >= next_progress:
            waiting = ", ".join(f"{n} ({last_seen[n]})" for n in pending)
            logger.info("waiting for %s: %.0f s of %g s", waiting, now - start, timeout_s)
            next_progress = now + progress_interval_s
        time.sleep(0.2)
