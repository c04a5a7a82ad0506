"""`RunApiPusher`: an episode runner's side of atroposlib's run-api (register, push groups, leave).

The same calls an atroposlib `BaseEnv` makes: `POST /register-env` (answered "wait for trainer to
start" until the trainer has registered: retried, with a progress line every 30 s), then
`POST /scored_data` per group. A run-api that is unreachable or answers 5xx is retried with backoff
(tenacity); when it could not be reached at all the runner registers again before its next push (a
restarted run-api has forgotten it).

Two things atroposlib's environments do not do, because a runner that ends or restarts must not stall
the trainer:

- run-ahead bound: after each push the runner waits while run-api holds `max_batches_offpolicy` of the
  trainer's batches or more (`queue_size * group_size >= max_batches_offpolicy * batch_size`, from
  `GET /status` and `GET /info`; atroposlib's environments stop generating at 3), so that groups are
  not trained on ever older weights. The groups already being played still land, so the overshoot is
  at most the loop's groups in flight. An unreachable run-api never blocks here (the push retries).
  A runner with a `min_batch_allocation` goes on while it holds fewer than its share of those batches
  (`self_queue_size` from `GET /status-env`), as atroposlib's environments do: run-api forms no batch
  while a connected environment with a minimum has nothing queued, so a runner held back with nothing
  queued would hold the trainer, and the trainer it.
- leaving: `close()` sends `POST /disconnect-env`, and a registration finds earlier ones under its own
  name still connected (a runner killed and restarted; `GET /envs`, which the launcher's run-api
  serves) and disconnects them. run-api keeps every connected environment's `min_batch_allocation`
  until it has queued groups: a registration left behind would hold every batch back.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

import aiohttp
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_random_exponential

__all__ = ["RunApiError", "RunApiPusher"]

logger = logging.getLogger("verl.recipe.atropos.episodes")
_WAITING = "wait for trainer to start"
_PROGRESS_EVERY_S = 30.0


class RunApiError(RuntimeError):
    def __init__(self, message: str, retryable: bool):
        super().__init__(message)
        self.retryable = retryable


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, (aiohttp.ClientConnectionError, asyncio.TimeoutError)) or (
        isinstance(exc, RunApiError) and exc.retryable)


class RunApiPusher:
    """Registers as `name` with run-api at `url`, pushes ScoredData groups there, and leaves on `close()`."""

    def __init__(self, url: str, *, name: str, group_size: int, max_token_length: int, weight: float = 1.0,
                 min_batch_allocation: float | None = None, api_key: str | None = None, max_wait_s: float = 3600.0,
                 max_batches_offpolicy: int = 0, poll_s: float = 0.25):
        self.url = url.rstrip("/")
        self.name = name
        self.registration = {"max_token_length": int(max_token_length), "desired_name": name, "weight": float(weight),
                             "group_size": int(group_size), "min_batch_allocation": min_batch_allocation}
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.max_wait_s = max_wait_s
        self.max_batches_offpolicy = max_batches_offpolicy
        self.poll_s = poll_s
        self.env_id: int | None = None
        self.pushed_groups = 0
        self.waited_s = 0.0  # time spent held by the run-ahead bound
        self._session: aiohttp.ClientSession | None = None
        self._registering: asyncio.Lock | None = None  # made on the loop that uses it

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            # Keep-alive under uvicorn's 5 s: a connection run-api has just closed is never reused.
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60.0), headers=self.headers,
                                                  connector=aiohttp.TCPConnector(keepalive_timeout=4.0))
        return self._session

    async def close(self) -> None:
        """Leave run-api (best effort: it may be gone already), then close the connections."""
        if self._session is not None:
            if self.env_id is not None:
                await self._disconnect(self.env_id)
            await self._session.close()
            self._session = None

    async def _call(self, path: str, body: dict[str, Any]) -> Any:
        async for attempt in AsyncRetrying(retry=retry_if_exception(_retryable), reraise=True,
                                           stop=stop_after_delay(self.max_wait_s),
                                           wait=wait_random_exponential(multiplier=0.5, max=10.0)):
            with attempt:
                try:
                    async with self.session.post(f"{self.url}{path}", json=body) as answer:
                        text = await answer.text()
                        if answer.status != 200:
                            raise RunApiError(f"run-api at {self.url} answered HTTP {answer.status} to {path}: {text[:300]}",
                                              retryable=answer.status >= 500)
                        return await answer.json(content_type=None)
                except aiohttp.ClientConnectorError:
                    self.env_id = None  # not reachable at all: a restarted run-api will have forgotten this runner
                    raise
        raise AssertionError("unreachable")

    async def _get(self, path: str, body: dict[str, Any] | None = None) -> Any:
        """One GET (run-api's /status-env takes a JSON body), no retries; None when run-api does not answer it."""
        try:
            async with self.session.get(f"{self.url}{path}", json=body,
                                        timeout=aiohttp.ClientTimeout(total=10.0)) as answer:
                return await answer.json(content_type=None) if answer.status == 200 else None
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            return None

    async def register(self) -> int:
        """Register (waiting for the trainer to register first), disconnect this name's earlier
        registrations; returns run-api's env_id."""
        started = last_note = time.monotonic()
        while True:
            answer = await self._call("/register-env", self.registration)
            if answer.get("status") != _WAITING:
                break
            if time.monotonic() - last_note >= _PROGRESS_EVERY_S:
                last_note = time.monotonic()
                logger.info("%s: waiting for the trainer to register with run-api at %s (%.0f s)", self.name,
                            self.url, last_note - started)
            await asyncio.sleep(1.0)
        self.env_id = int(answer["env_id"])
        logger.info("%s: registered with run-api at %s as env_id %d", self.name, self.url, self.env_id)
        await self._disconnect_earlier_lives()
        return self.env_id

    async def _disconnect_earlier_lives(self) -> None:
        listing = await self._get("/envs")  # the launcher's run-api; atroposlib's own has no such route
        envs = listing.get("envs") if isinstance(listing, dict) else None
        for env in envs if isinstance(envs, list) else []:
            if (isinstance(env, dict) and env.get("name") == self.name and env.get("connected")
                    and isinstance(env.get("env_id"), int) and env["env_id"] != self.env_id):
                logger.warning("%s: disconnecting env_id %d, an earlier registration under this name (a runner "
                               "that was restarted), whose min_batch_allocation would hold batches back",
                               self.name, env["env_id"])
                await self._disconnect(env["env_id"])

    async def _disconnect(self, env_id: int) -> None:
        try:
            async with self.session.post(f"{self.url}/disconnect-env", json={"env_id": env_id},
                                         timeout=aiohttp.ClientTimeout(total=5.0)):
                pass
        except (aiohttp.ClientError, asyncio.TimeoutError):
            pass

    async def push(self, payload: dict[str, Any]) -> None:
        """Queue one group (registering first when not registered), then wait for room (run-ahead bound)."""
        if self.env_id is None:
            # Groups finishing together register once (twice would make run-api count two environments).
            self._registering = self._registering or asyncio.Lock()
            async with self._registering:
                if self.env_id is None:
                    await self.register()
        await self._call("/scored_data", {**payload, "env_id": self.env_id})
        self.pushed_groups += 1
        await self.wait_for_room()

    async def wait_for_room(self) -> None:
        """Wait while run-api holds `max_batches_offpolicy` of the trainer's batches or more."""
        if self.max_batches_offpolicy <= 0:
            return
        started = last_note = time.monotonic()
        while (full := await self._queue_full()) is not None:
            if time.monotonic() - last_note >= _PROGRESS_EVERY_S:
                last_note = time.monotonic()
                logger.info("%s: run-api holds %s; waiting for the trainer (%.0f s)", self.name, full,
                            last_note - started)
            await asyncio.sleep(self.poll_s)
        self.waited_s += time.monotonic() - started

    async def _queue_full(self) -> str | None:
        """What run-api holds when it is `max_batches_offpolicy` batches or more, else None (also when
        it does not answer)."""
        status, info = await self._get("/status"), await self._get("/info")
        try:
            queue_size, batch_size = int(status["queue_size"]), int(info["batch_size"])
        except (TypeError, KeyError, ValueError):
            return None
        group_size = self.registration["group_size"]
        if batch_size <= 0 or queue_size * group_size < self.max_batches_offpolicy * batch_size:
            return None
        if await self._short_of_its_minimum(batch_size):
            return None
        return f"{queue_size} groups, {self.max_batches_offpolicy}+ batches of {batch_size} (max_batches_offpolicy)"

    async def _short_of_its_minimum(self, batch_size: int) -> bool:
        """Whether run-api holds fewer of this runner's groups than its `min_batch_allocation` of
        `max_batches_offpolicy` batches (atroposlib's `BaseEnv.env_manager` rule)."""
        share = self.registration["min_batch_allocation"]
        if not share or self.env_id is None:
            return False
        status = await self._get("/status-env", {"env_id": self.env_id})
        try:
            own_groups = int(status["self_queue_size"])
        except (TypeError, KeyError, ValueError):
            return False
        return own_groups < math.ceil(share * batch_size * self.max_batches_offpolicy / self.registration["group_size"])
