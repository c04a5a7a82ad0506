"""`BoundedPusher`: a driver does not run more than `max_batches_offpolicy` trainer batches ahead.

A driver plays as fast as the policy answers; a trainer slower than that lets run-api's queue grow, and
every group waits longer before it is trained, on weights further behind those that generated it
(`atropos/staleness/*`; the OpenEnv CPU demo reached 7 steps behind within 30 steps). atroposlib's own
environments stop generating while run-api holds `max_batches_offpolicy` (default 3) batches; this does
the same for a driver: after each push it waits while `queue_size * group_size >=
max_batches_offpolicy * batch_size` (run-api's GET /status and GET /info). The groups already being
played still finish, so the overshoot is at most the loop's groups in flight. An unreachable run-api
never blocks here (the push itself retries).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp

from recipe.atropos.episodes.runapi import RunApiPusher

__all__ = ["BoundedPusher"]

logger = logging.getLogger("verl.recipe.atropos.openenv")


class BoundedPusher:
    """`inner`'s pushes, each followed by a wait for room in run-api's queue."""

    def __init__(self, inner: RunApiPusher, max_batches_offpolicy: int, poll_s: float = 0.25):
        self.inner = inner
        self.max_batches = max_batches_offpolicy
        self.poll_s = poll_s
        self.group_size = int(inner.registration["group_size"])
        self.name = inner.registration["desired_name"]
        self.waited_s = 0.0
        self._http: aiohttp.ClientSession | None = None

    async def register(self) -> int:
        return await self.inner.register()

    async def push(self, payload: dict[str, Any]) -> None:
        await self.inner.push(payload)
        await self.wait_for_room()

    async def wait_for_room(self) -> None:
        if self.max_batches <= 0:
            return
        started = last_note = time.monotonic()
        while (full := await self._queue_full()) is not None:
            if time.monotonic() - last_note >= 30.0:
                last_note = time.monotonic()
                logger.info("%s: run-api holds %s; waiting for the trainer (%.0f s)", self.name, full,
                            last_note - started)
            await asyncio.sleep(self.poll_s)
        self.waited_s += time.monotonic() - started

    async def _queue_full(self) -> str | None:
        """What run-api holds when it is `max_batches` batches or more, else None (also when unreachable)."""
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10.0), headers=self.inner.headers)
        try:
            async with self._http.get(f"{self.inner.url}/status") as answer:
                queue_size = int((await answer.json(content_type=None))["queue_size"])
            async with self._http.get(f"{self.inner.url}/info") as answer:
                batch_size = int((await answer.json(content_type=None))["batch_size"])
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, TypeError):
            return None
        if batch_size <= 0 or queue_size * self.group_size < self.max_batches * batch_size:
            return None
        return f"{queue_size} groups, {self.max_batches}+ batches of {batch_size} (max_batches_offpolicy)"

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None
        await self.inner.close()
