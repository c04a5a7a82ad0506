"""`ServerLink`: the driver's WebSocket sessions with one OpenEnv server, reconnected with backoff.

Each episode in flight holds one session (one environment instance on the server). A session that
ended its episode cleanly goes back to an idle pool and plays the next episode after a new `reset`;
one that failed is closed. Opening an episode (`start_episode`: a session, then `reset`) is retried
with exponential backoff (tenacity) while the server is unreachable, closes the connection, or answers
CAPACITY_REACHED (all its session slots are taken: back-pressure, not an error), for up to
`reconnect_max_wait_s`; the first failure of an outage and the recovery are logged once each.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_random_exponential
from websockets.exceptions import InvalidHandshake

from recipe.atropos.episodes.loop import EpisodeStats
from recipe.atropos.openenv.session import CapacityReached, OpenEnvSession, ServerClosed, StepResult

__all__ = ["ServerLink"]

logger = logging.getLogger("verl.recipe.atropos.openenv")

# Worth another try later: the server is down, restarting, full, or slow to accept.
_TRANSIENT = (OSError, ServerClosed, CapacityReached, InvalidHandshake, asyncio.TimeoutError)


class ServerLink:
    """Sessions with the OpenEnv server at `url` for the episodes of entry `name`."""

    def __init__(self, url: str, name: str, stats: EpisodeStats, *, reset_timeout_s: float,
                 reconnect_max_wait_s: float):
        self.url = url
        self.name = name
        self.stats = stats
        self.reset_timeout_s = reset_timeout_s
        self.reconnect_max_wait_s = reconnect_max_wait_s
        self._idle: list[OpenEnvSession] = []
        self._closing: set[asyncio.Task] = set()
        self._down_since: float | None = None
        self._warned_full = False

    async def start_episode(self, reset_data: dict[str, Any]) -> tuple[OpenEnvSession, StepResult]:
        """A session reset with `reset_data` and its first observation (retried while the server is away)."""
        try:  # the common case, without the retry machinery
            return await self._start(reset_data)
        except _TRANSIENT:
            pass
        async for attempt in AsyncRetrying(retry=retry_if_exception_type(_TRANSIENT), reraise=True,
                                           stop=stop_after_delay(self.reconnect_max_wait_s),
                                           wait=wait_random_exponential(multiplier=0.25, max=5.0)):
            with attempt:
                return await self._start(reset_data)
        raise AssertionError("unreachable")

    async def _start(self, reset_data: dict[str, Any]) -> tuple[OpenEnvSession, StepResult]:
        session = self._idle.pop() if self._idle else None
        try:
            session = session or await OpenEnvSession.open(self.url, open_timeout_s=self.reset_timeout_s)
            first = await session.reset(reset_data, timeout_s=self.reset_timeout_s)
        except _TRANSIENT as exc:
            if session is not None:
                self.discard(session)
            self._note_failure(exc)
            raise
        except BaseException:
            if session is not None:
                self.discard(session)
            raise
        self._note_success()
        return session, first

    def release(self, session: OpenEnvSession) -> None:
        """A session whose episode ended cleanly: it plays the next one."""
        if session.broken:
            self.discard(session)
        else:
            self._idle.append(session)

    def discard(self, session: OpenEnvSession) -> None:
        """Close a session that failed, in the background (safe while the caller is being cancelled)."""
        session.broken = True
        task = asyncio.get_running_loop().create_task(session.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """Close every session (the server frees their environments)."""
        idle, self._idle = self._idle, []
        await asyncio.gather(*(s.close() for s in idle), *self._closing, return_exceptions=True)

    def _note_failure(self, exc: BaseException) -> None:
        if isinstance(exc, CapacityReached):
            self.stats.count("capacity_waits")  # back-pressure: the server is full, not broken
            if not self._warned_full:
                self._warned_full = True
                logger.warning("%s: OpenEnv server %s is full (%s); episodes wait for a session. Its "
                               "max_concurrent_envs (OpenEnv's default is 1) below the entry's concurrency slows the "
                               "run: raise it (create_app(..., concurrency_config=ConcurrencyConfig("
                               "max_concurrent_envs=N)))", self.name, self.url, exc.server_message)
            return
        self.stats.count("reconnect_attempts")
        if self._down_since is None:
            self._down_since = time.monotonic()
            logger.warning("%s: OpenEnv server %s unreachable (%s: %s); reconnecting with backoff for up to %.0f s",
                           self.name, self.url, type(exc).__name__, exc, self.reconnect_max_wait_s)

    def _note_success(self) -> None:
        if self._down_since is not None:
            logger.warning("%s: OpenEnv server %s answers again after %.1f s", self.name, self.url,
                           time.monotonic() - self._down_since)
            self._down_since = None
