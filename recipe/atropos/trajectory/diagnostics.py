"""Why no batch arrives: what the Atropos environments and run-api say, in a few lines.

In trajectory mode the trainer only sees run-api's queue; the cause of an empty queue is in the
environments' logs (an exception in ``collect_trajectories``, a group dropped for its size or
length, a send that failed). This module gathers, without raising:

- from the launcher's run folder (``services.json`` and ``env-<name>.log``, located through
  ``$ATROPOS_LAUNCH_RUN_DIR``, which the launcher gives the trainer): each environment's status
  (running, or its exit code), how many times it was started, the groups its log says it dropped,
  by reason, and its last error lines;
- from run-api: how many environments registered, the groups queued (per environment), the ones
  with a `min_batch_allocation` and nothing queued (which hold every batch back), and the
  size of the last group received.

Both the trainer's progress lines and its :class:`TrajectoryBatchTimeout`, and the launcher's exit
message, use :func:`environment_report` / :func:`run_api_report`.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RUN_DIR_ENV = "ATROPOS_LAUNCH_RUN_DIR"
ENV_PREFIX = "env-"
_TAIL_BYTES = 256 * 1024

# atroposlib 0.4.0's own log lines (envs/base.py) for a group that never reaches run-api.
DROP_REASONS: dict[str, re.Pattern[str]] = {
    "collect_trajectories raised": re.compile(r"Error in collect_trajectories"),
    "scoring raised": re.compile(r"Error in scoring|Scoring exception"),
    "sending failed": re.compile(r"Error in handle_send_to_api|Failed to send"),
    "wrong group size": re.compile(r"token count mismatch \(expected \d+\)"),
    "identical scores": re.compile(r"Scores are the same in a group"),
    "too long": re.compile(r"Token length is too long in a group"),
}
_ERROR_LINE = re.compile(r"(?i:\b(error|exception|failed|fatal|refused)\b)|\w(Error|Exception|Timeout)\b")
_REGISTER_WAIT = re.compile(r"Waiting to register the env")


@dataclass
class EnvironmentState:
    """One environment as the launcher ran it."""

    name: str
    status: str  # "running", "exited <code>" or "not started"
    starts: int = 0
    restarts: int = 0
    log: str | None = None
    dropped: Counter = field(default_factory=Counter)
    waiting_to_register: bool = False
    error_lines: list[str] = field(default_factory=list)

    def summary(self, *, errors: int = 3) -> str:
        parts = [f"{self.name}: {self.status}"]
        if self.restarts:
            parts.append(f"restarted {self.restarts} time(s)")
        if self.waiting_to_register:
            parts.append("still waiting to register with run-api")
        if self.dropped:
            parts.append("groups not sent: " + ", ".join(f"{n} x {why}" for why, n in self.dropped.most_common()))
        text = "; ".join(parts)
        if self.error_lines and errors:
            shown = self.error_lines[-errors:]
            text += f"\n    last error lines of {self.log}:\n" + "\n".join(f"      {line}" for line in shown)
        elif self.log:
            text += f" (no error lines in {self.log})"
        return text


def launcher_run_dir() -> Path | None:
    value = os.environ.get(RUN_DIR_ENV)
    return Path(value) if value else None


def environment_states(run_dir: Path | None) -> list[EnvironmentState]:
    """The environments of a launcher run folder (empty when there is none or it cannot be read)."""
    if run_dir is None:
        return []
    try:
        services = json.loads((run_dir / "services.json").read_text()).get("services", {})
    except (OSError, ValueError):
        return []
    states = []
    for name, info in sorted(services.items()):
        if not name.startswith(ENV_PREFIX) or not isinstance(info, dict):
            continue
        state = EnvironmentState(
            name=name, status=str(info.get("status", "unknown")), starts=int(info.get("starts") or 0),
            restarts=int(info.get("restarts") or 0), log=info.get("log"),
        )
        if state.log:
            _read_log(state, Path(state.log))
        states.append(state)
    return states


def _read_log(state: EnvironmentState, path: Path) -> None:
    """Drop counts, whether it still waits to register, and error lines, from the log's last start."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - _TAIL_BYTES))
            text = f.read().decode(errors="replace")
    except OSError:
        return
    last_start = text.rfind("launcher: start ")
    lines = text[last_start:].splitlines()[1:] if last_start >= 0 else text.splitlines()
    for line in lines:
        for reason, pattern in DROP_REASONS.items():
            if pattern.search(line):
                state.dropped[reason] += 1
    registered_waits = [i for i, line in enumerate(lines) if _REGISTER_WAIT.search(line)]
    state.waiting_to_register = bool(registered_waits) and registered_waits[-1] >= len(lines) - 3
    state.error_lines = _error_lines(lines)


def _error_lines(lines: list[str]) -> list[str]:
    """Lines that look like errors, stripped, repeats in a row kept once."""
    errors: list[str] = []
    for line in (line.strip() for line in lines):
        if line and _ERROR_LINE.search(line) and (not errors or errors[-1] != line[:400]):
            errors.append(line[:400])
    return errors


def error_lines(path: Path, *, limit: int = 3) -> list[str]:
    """The last ``limit`` error-looking lines of a log file ([] when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, Path(path).stat().st_size - _TAIL_BYTES))
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    return _error_lines(text.splitlines())[-limit:]


def environment_report(run_dir: Path | None, *, errors: int = 3) -> str:
    """One block per environment; "" when not started by the launcher."""
    states = environment_states(run_dir)
    return "\n".join("  " + s.summary(errors=errors) for s in states)


def run_api_report(api_url: str, *, timeout_s: float = 2.0, max_envs: int = 64) -> str:
    """Registered environments, queued groups and the last group's size, as run-api tells (never raises)."""
    import requests

    base = api_url.rstrip("/")
    try:
        status = requests.get(f"{base}/status", timeout=timeout_s).json()
        latest = requests.get(f"{base}/latest_example", timeout=timeout_s).json()
        registered: list[dict[str, Any]] = []
        for env_id in range(max_envs):
            # GET with a body is how run-api's /status-env takes the id (the environments call it too).
            answer = requests.get(f"{base}/status-env", json={"env_id": env_id}, timeout=timeout_s)
            if answer.status_code != 200:
                break
            registered.append(answer.json())
    except (requests.RequestException, ValueError) as exc:
        return f"run-api at {base} did not answer ({type(exc).__name__})"
    parts = [f"{len(registered)} environment registration(s)"]
    if registered:
        parts.append("groups queued per env_id: " + ", ".join(str(e.get("self_queue_size", "?")) for e in registered))
        holding = _holding_batches_back(base, registered, timeout_s)
        if holding:
            parts.append(f"waiting for a group from {holding}: run-api forms no batch while an environment with a "
                         "min_batch_allocation has none queued")
    parts.append(f"{status.get('queue_size', '?')} group(s) queued in all")
    tokens = latest.get("tokens") if isinstance(latest, dict) else None
    if tokens:
        parts.append(f"last group received: {len(tokens)} sequences from env_id {latest.get('env_id')}")
    else:
        parts.append("no group received yet")
    return "run-api: " + "; ".join(parts)


def _holding_batches_back(base: str, registered: list[dict[str, Any]], timeout_s: float) -> str:
    """The connected environments with a `min_batch_allocation` and no group queued, which run-api's
    batcher waits for; from the launcher's run-api ``GET /envs`` ("" from a plain run-api)."""
    import requests

    try:
        envs = requests.get(f"{base}/envs", timeout=timeout_s).json()["envs"]
    except (requests.RequestException, ValueError, KeyError, TypeError):
        return ""
    queued = {env_id: e.get("self_queue_size") for env_id, e in enumerate(registered)}
    return ", ".join(
        f"env_id {e.get('env_id')} ({e.get('name')})" for e in envs if isinstance(e, dict)
        and e.get("connected") and e.get("min_batch_allocation") and queued.get(e.get("env_id")) == 0)


def last_group_size(api_url: str, *, timeout_s: float = 2.0) -> tuple[int, Any] | None:
    """(sequences, env_id) of the last group run-api received, or None (none yet, or no answer)."""
    import requests

    try:
        latest = requests.get(f"{api_url.rstrip('/')}/latest_example", timeout=timeout_s).json()
    except (requests.RequestException, ValueError):
        return None
    tokens = latest.get("tokens") if isinstance(latest, dict) else None
    return (len(tokens), latest.get("env_id")) if tokens else None
