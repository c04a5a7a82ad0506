"""`RunApiPusher`: an episode runner's side of atroposlib's run-api (register, then push groups).

The same calls an atroposlib `BaseEnv` makes: `POST /register-env` (answered "wait for trainer to
start" until the trainer has registered: retried, with a progress line every 30 s), then
`POST /scored_data` per group. A run-api that is unreachable or answers 5xx is retried with backoff
(tenacity); after such an outage the runner registers again before its next push (a restarted
run-api has forgotten it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_random_exponential

__all__ = ["RunApiError", "RunApiPusher"]

logger = logging.getLogger("verl.recipe.atropos.episodes")
_WAITING = "wait for trainer to start"


class RunApiError(RuntimeError):
    def __init__(self, message: str, retryable: bool):
        super().__init__(message)
        self.retryable = retryable


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, (aiohttp.ClientConnectionError, asyncio.TimeoutError)) or (
        isinstance(exc, RunApiError) and exc.retryable)


class RunApiPusher:
    """Registers as `name` with run-api at `url` and pushes ScoredData groups there."""

    def __init__(self, url: str, *, name: str, group_size: int, max_token_length: int, weight: float = 1.0,
                 min_batch_allocation: float | None = None, api_key: str | None = None, max_wait_s: float = 3600.0):
        self.url = url.rstrip("/")
        self.registration = {"max_token_length": int(max_token_length), "desired_name": name, "weight": float(weight),
                             "group_size": int(group_size), "min_batch_allocation": min_batch_allocation}
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.max_wait_s = max_wait_s
        self.env_id: int | None = None
        self.pushed_groups = 0
        self._session: aiohttp.ClientSession | None = None
        self._registering: asyncio.Lock | None = None  # made on the loop that uses it

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _call(self, path: str, body: dict[str, Any]) -> Any:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60.0))
        async for attempt in AsyncRetrying(retry=retry_if_exception(_retryable), reraise=True,
                                           stop=stop_after_delay(self.max_wait_s),
                                           wait=wait_random_exponential(multiplier=0.5, max=10.0)):
            with attempt:
                try:
                    async with self._session.post(f"{self.url}{path}", json=body, headers=self.headers) as answer:
                        text = await answer.text()
                        if answer.status != 200:
                            raise RunApiError(f"run-api at {self.url} answered HTTP {answer.status} to {path}: {text[:300]}",
                                              retryable=answer.status >= 500)
                        return await answer.json(content_type=None)
                except (aiohttp.ClientConnectionError, asyncio.TimeoutError):
                    self.env_id = None  # a restarted run-api has forgotten this runner
                    raise
        raise AssertionError("unreachable")

    async def register(self) -> int:
        """Register (waiting for the trainer to register first); returns run-api's env_id."""
        started = last_note = time.monotonic()
        while True:
            answer = await self._call("/register-env", self.registration)
            if answer.get("status") != _WAITING:
                break
            if time.monotonic() - last_note >= 30.0:
                last_note = time.monotonic()
                logger.info("%s: waiting for the trainer to register with run-api at %s (%.0f s)",
                            self.registration["desired_name"], self.url, last_note - started)
            await asyncio.sleep(1.0)
        self.env_id = int(answer["env_id"])
        logger.info("%s: registered with run-api at %s as env_id %d", self.registration["desired_name"], self.url,
                    self.env_id)
        return self.env_id

    async def push(self, payload: dict[str, Any]) -> None:
        """Queue one group (registering first when not registered)."""
        if self.env_id is None:
            # Groups finishing together register once (twice would make run-api count two environments).
            self._registering = self._registering or asyncio.Lock()
            async with self._registering:
                if self.env_id is None:
                    await self.register()
        await self._call("/scored_data", {**payload, "env_id": self.env_id})
        self.pushed_groups += 1
