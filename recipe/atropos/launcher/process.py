"""One child process: started in its own session, output to its log file, stopped with its whole tree.

Each service starts a session of its own (``start_new_session``), so a Ctrl-C in the terminal
reaches only the launcher, which then stops the services in its own order. Stopping a service
signals everything it started: the members of its session and process group, plus its
descendants found through ``psutil`` (some programs, Ray among them, start helpers in sessions of
their own). SIGTERM first, SIGKILL for whatever is left after the grace period.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import psutil

from recipe.atropos.launcher.plan import ServiceSpec

__all__ = ["ManagedProcess", "terminate_all", "tail_text"]

logger = logging.getLogger("atropos.launcher")


class ManagedProcess:
    """A service's process (re)started from its spec; every start appends to the same log file."""

    def __init__(self, spec: ServiceSpec, log_path: Path, env: Mapping[str, str], cwd: Path) -> None:
        self.spec = spec
        self.log_path = log_path
        self._env = dict(env)
        self._cwd = cwd
        self.popen: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pid(self) -> int | None:
        return None if self.popen is None else self.popen.pid

    def start(self) -> None:
        """Start (again); the log file gets a header line naming the attempt and the command."""
        if self.running():
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self.starts += 1
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            header = f"=== {stamp} launcher: start {self.starts} of {self.name}: {self.spec.shown_argv()}\n"
            log.write(header.encode())
            log.flush()
            try:
                self.popen = subprocess.Popen(
                    self.spec.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self._env,
                    cwd=self._cwd,
                    start_new_session=True,
                )
            except OSError as exc:
                raise OSError(f"cannot start {self.name} ({self.spec.shown_argv()}): {exc}") from exc

    def poll(self) -> int | None:
        """Exit code once it has exited (negative: killed by that signal), else None."""
        return None if self.popen is None else self.popen.poll()

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def tail(self, lines: int = 30) -> str:
        return tail_text(self.log_path, lines)

    def stop(self, grace_s: float) -> None:
        """Stop this process and everything it started (see :func:`terminate_all`)."""
        terminate_all([self], grace_s)


def tail_text(path: Path, lines: int = 30, max_bytes: int = 64 * 1024) -> str:
    """The last ``lines`` lines of a log file (reads at most its last ``max_bytes``)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except FileNotFoundError:
        return "(no log yet)"
    text = data.decode(errors="replace").splitlines()
    return "\n".join(text[-lines:]) if text else "(log is empty)"


def _tree(proc: ManagedProcess) -> list[psutil.Process]:
    """Everything ``proc`` started and that is still alive: descendants and session/group members."""
    if proc.popen is None:
        return []
    root_pid = proc.popen.pid
    found: dict[int, psutil.Process] = {}
    try:
        root = psutil.Process(root_pid)
        for child in root.children(recursive=True):
            found[child.pid] = child
    except psutil.Error:
        pass
    # Orphans re-parented to init leave the descendant tree but keep their session and group.
    for candidate in psutil.process_iter():
        if candidate.pid in found or candidate.pid == root_pid or candidate.pid == os.getpid():
            continue
        try:
            if os.getsid(candidate.pid) == root_pid or os.getpgid(candidate.pid) == root_pid:
                found[candidate.pid] = candidate
        except OSError:
            continue
    return list(found.values())


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _signal(p: psutil.Process, sig: int) -> None:
    try:
        p.send_signal(sig)  # psutil checks the pid still names the same process
    except psutil.Error:
        pass


def terminate_all(procs: Iterable[ManagedProcess], grace_s: float) -> None:
    """SIGTERM every process tree at once, wait up to ``grace_s``, then SIGKILL what is left.

    Trees are collected before the first signal, while parents still know their children.
    """
    procs = [p for p in procs if p.popen is not None]
    roots = {p.popen.pid: p for p in procs if p.popen is not None}
    members: list[psutil.Process] = []
    for proc in procs:
        members.extend(_tree(proc))

    def signal_everything(sig: int) -> None:
        for pid, proc in roots.items():
            if proc.poll() is None:
                try:
                    proc.popen.send_signal(sig)  # type: ignore[union-attr]
                except ProcessLookupError:
                    pass
            try:
                os.killpg(pid, sig)  # the root's process group, whatever is left of it
            except (ProcessLookupError, PermissionError):
                pass
        for member in members:
            _signal(member, sig)

    def wait(deadline: float) -> bool:
        while True:
            roots_left = [p for p in roots.values() if p.poll() is None]
            members_left = [m for m in members if _alive(m)]
            if not roots_left and not members_left:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    if not roots:
        return
    signal_everything(signal.SIGTERM)
    if wait(time.monotonic() + grace_s):
        return
    left = [p.name for p in roots.values() if p.poll() is None] or ["(their children)"]
    logger.warning("still running %.0f s after SIGTERM: %s; sending SIGKILL", grace_s, ", ".join(left))
    signal_everything(signal.SIGKILL)
    if not wait(time.monotonic() + 10.0):
        survivors = [m.pid for m in members if _alive(m)] + [pid for pid, p in roots.items() if p.poll() is None]
        logger.error("processes survived SIGKILL (uninterruptible?): %s", survivors)
