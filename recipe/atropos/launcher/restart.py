"""Keep the environment service up: restart it when it dies, with bounded attempts and backoff.

The trainer does not need the service every step: while it is down, each step falls back to
standard GRPO on verl's own reward (``trainer.atropos.fallback_to_grpo``). So a dead service is
restarted rather than ending the run, but a service that keeps dying is a real problem: after
``max_restarts`` restarts in a row the run ends. A restarted service that stays up for
``stable_after_s`` resets that count, so a crash a day does not add up to the end of a long run.

The same keeper restarts each Atropos environment of trajectory mode (``launcher.environments``,
which have no health URL: a restarted one counts as up once started; the trainer just waits for
batches meanwhile).

This is a state machine driven by :meth:`EnvironmentKeeper.tick` from the supervision loop, never
a blocking wait: the loop must keep watching the trainer and the inference workers meanwhile.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from recipe.atropos.launcher.config import AtroposEnvironmentConfig, EnvironmentConfig
from recipe.atropos.launcher.health import LaunchError, probe
from recipe.atropos.launcher.process import ManagedProcess

__all__ = ["EnvironmentKeeper"]

logger = logging.getLogger("atropos.launcher")

UP, BACKOFF, STARTING = "up", "backoff", "starting"


class EnvironmentKeeper:
    """Watches one already-healthy environment process and restarts it when it dies.

    ``on_healthy`` runs after each successful restart (re-registering inference endpoints: a new
    process has forgotten them); ``on_change`` after every start or state change (the state file);
    ``start`` (re)starts the process (default ``proc.start``; the launcher holds signals meanwhile).
    """

    def __init__(
        self,
        proc: ManagedProcess,
        cfg: EnvironmentConfig | AtroposEnvironmentConfig,
        *,
        label: str = "environment service",
        meanwhile: str = "the trainer uses standard GRPO if trainer.atropos.fallback_to_grpo is true",
        grace_s: float,
        progress_interval_s: float,
        on_healthy: Callable[[], None] = lambda: None,
        on_change: Callable[[], None] = lambda: None,
        start: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.proc = proc
        self.start = start or proc.start
        self.cfg = cfg
        self.label = label
        self.meanwhile = meanwhile
        self.grace_s = grace_s
        self.progress_interval_s = progress_interval_s
        self.on_healthy = on_healthy
        self.on_change = on_change
        self.clock = clock
        self.state = UP
        self.restarts = 0  # restarts started in total
        self.failures_in_row = 0
        self._healthy_since = clock()
        self._restart_at = 0.0
        self._deadline = 0.0
        self._next_progress = 0.0
        self._last_seen = ""

    def tick(self) -> None:
        """One supervision step; raises :class:`LaunchError` once restarts are exhausted."""
        now = self.clock()
        if self.state == UP:
            code = self.proc.poll()
            if code is not None:
                logger.warning(
                    "%s exited with code %s; last lines of %s:\n%s",
                    self.label,
                    code,
                    self.proc.log_path,
                    self.proc.tail(15),
                )
                self.proc.stop(self.grace_s)  # whatever it started goes with it (and frees the port)
                self._schedule(f"exited with code {code}", now)
            elif self.failures_in_row and now - self._healthy_since >= self.cfg.stable_after_s:
                logger.info("%s up for %.0f s: restart count reset", self.label, now - self._healthy_since)
                self.failures_in_row = 0
        elif self.state == BACKOFF:
            if now >= self._restart_at:
                self.restarts += 1
                self.start()
                if not self.proc.spec.health_url:  # nothing to wait for: up once started
                    logger.info("%s restarted (pid %s)", self.label, self.proc.pid)
                    self.state = UP
                    self._healthy_since = self.clock()
                    self.on_change()
                    self.on_healthy()
                    return
                logger.info("%s restarted (pid %s), waiting for %s", self.label, self.proc.pid, self.proc.spec.health_url)
                self.state = STARTING
                self._deadline = now + self.cfg.start_timeout_s
                self._next_progress = now + self.progress_interval_s
                self._last_seen = "no answer yet"
                self.on_change()
        elif self.state == STARTING:
            self._check_starting(now)

    def _check_starting(self, now: float) -> None:
        code = self.proc.poll()
        if code is not None:
            logger.warning("restarted %s exited with code %s:\n%s", self.label, code, self.proc.tail(15))
            self.proc.stop(self.grace_s)
            self._schedule(f"exited with code {code} while restarting", now)
            return
        healthy, self._last_seen = probe(self.proc.spec.health_url or "")
        if healthy:
            logger.info("%s is healthy again after restart %d", self.label, self.restarts)
            self.state = UP
            self._healthy_since = self.clock()
            self.on_change()
            self.on_healthy()
        elif now >= self._deadline:
            logger.warning(
                "restarted %s not healthy within %g s (%s):\n%s",
                self.label,
                self.cfg.start_timeout_s,
                self._last_seen,
                self.proc.tail(15),
            )
            self.proc.stop(self.grace_s)
            self._schedule(f"was not healthy within {self.cfg.start_timeout_s:g} s of a restart", now)
        elif now >= self._next_progress:
            logger.info(
                "waiting for the restarted %s (%s): %.0f s of %g s",
                self.label,
                self._last_seen,
                now - (self._deadline - self.cfg.start_timeout_s),
                self.cfg.start_timeout_s,
            )
            self._next_progress = now + self.progress_interval_s

    def _schedule(self, reason: str, now: float) -> None:
        if self.failures_in_row >= self.cfg.max_restarts:
            raise LaunchError(
                f"{self.label} {reason}; giving up after {self.failures_in_row} restart(s) in a row "
                f"({self.proc.spec.config_key}.max_restarts={self.cfg.max_restarts}); last lines of "
                f"{self.proc.log_path}:\n{self.proc.tail()}"
            )
        self.failures_in_row += 1
        delay = min(self.cfg.restart_backoff_s * 2 ** (self.failures_in_row - 1), self.cfg.restart_backoff_max_s)
        logger.warning(
            "restarting the %s in %.1f s (restart %d of at most %d in a row); meanwhile %s",
            self.label,
            delay,
            self.failures_in_row,
            self.cfg.max_restarts,
            self.meanwhile,
        )
        self.state = BACKOFF
        self._restart_at = now + delay
        self.on_change()
