"""OpenEnv's wire protocol, client side, without `openenv`: one WebSocket session, and the HTTP routes.

`/ws` (openenv/core/env_server/http_server.py) holds one environment instance per connection and one
message in flight (there are no request ids):

    {"type": "reset", "data": {"seed": 2, ...}}  -> {"type": "observation", "data": {"observation": {...}, "reward": null, "done": false}}
    {"type": "step", "data": <the action>}       -> the same shape, with the step's reward and done
    {"type": "state"}                            -> {"type": "state", "data": {...}}
    {"type": "close"}                            -> (no answer; the server ends the session)

Errors come as {"type": "error", "data": {"message", "code"}}. VALIDATION_ERROR (the action does not
fit the schema) raises ActionRejected; CAPACITY_REACHED (every session slot is taken; the server then
closes) raises CapacityReached; any other code (EXECUTION_ERROR: the environment raised) raises
OpenEnvError. A connection that closes (1006: the server died; 1012: it is restarting) raises
ServerClosed. `/health` and `/schema` are plain HTTP GETs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from collections.abc import Awaitable
from typing import Any, TypeVar

import aiohttp
import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

__all__ = ["ActionRejected", "CapacityReached", "OpenEnvError", "OpenEnvSession", "ServerClosed", "StepResult",
           "fetch_json", "wait_until_healthy", "ws_url"]

# An observation may carry images or files: the websockets default (1 MiB) is too small.
MAX_MESSAGE_BYTES = 64 * 2**20
_T = TypeVar("_T")


async def within(awaitable: Awaitable[_T], seconds: float | None) -> _T:
    """`awaitable`, or asyncio.TimeoutError after `seconds` (asyncio.timeout where there is one: unlike
    wait_for it starts no task, which costs the driver a loop turn per message)."""
    if seconds is None:
        return await awaitable
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(seconds):
            return await awaitable
    return await asyncio.wait_for(awaitable, seconds)


class OpenEnvError(RuntimeError):
    """The server answered an error message: `code` (EXECUTION_ERROR, ...) and its message."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.server_message = message


class ActionRejected(OpenEnvError):
    """VALIDATION_ERROR: the action does not fit the environment's action schema."""


class CapacityReached(OpenEnvError):
    """CAPACITY_REACHED: the server has no free session slot (it closes the connection)."""


class ServerClosed(ConnectionError):
    """The connection closed under a request: `code` 1006 (the server died), 1012 (restarting), ..."""

    def __init__(self, code: int, reason: str):
        super().__init__(f"the server closed the connection (code {code}{': ' + reason if reason else ''})")
        self.code = code


@dataclasses.dataclass(frozen=True)
class StepResult:
    """What a reset or step returned: the observation's own fields, its reward (None at reset, or when
    the environment gave none) and whether the episode is over."""

    observation: dict[str, Any]
    reward: float | None
    done: bool


def ws_url(base_url: str) -> str:
    """`http://host:port` -> `ws://host:port/ws` (https -> wss)."""
    base = base_url.rstrip("/")
    if base.startswith("https://"):
        return "wss://" + base[len("https://"):] + "/ws"
    if base.startswith("http://"):
        return "ws://" + base[len("http://"):] + "/ws"
    raise ValueError(f"an OpenEnv server URL starts with http:// or https://, got {base_url!r}")


_ERRORS = {"VALIDATION_ERROR": ActionRejected, "CAPACITY_REACHED": CapacityReached}


class OpenEnvSession:
    """One `/ws` connection: one environment instance, reset and stepped one message at a time.

    A request cut short (cancelled, past its `timeout_s`) leaves its answer on the wire: the session is then
    `broken` and must be closed, never reused.
    """

    def __init__(self, connection: ClientConnection):
        self._ws = connection
        self.broken = False

    @classmethod
    async def open(cls, base_url: str, open_timeout_s: float = 10.0) -> OpenEnvSession:
        # No compression: messages are small and loopback is fast; deflate would only cost CPU.
        connection = await connect(ws_url(base_url), open_timeout=open_timeout_s, max_size=MAX_MESSAGE_BYTES,
                                   compression=None)
        return cls(connection)

    async def reset(self, data: dict[str, Any], timeout_s: float | None = None) -> StepResult:
        """Start an episode with the reset arguments `data` (`{"seed": 2}`); its first observation."""
        return _step_result(await within(self._request({"type": "reset", "data": data}), timeout_s))

    async def step(self, action: dict[str, Any], timeout_s: float | None = None) -> StepResult:
        return _step_result(await within(self._request({"type": "step", "data": action}), timeout_s))

    async def state(self) -> dict[str, Any]:
        return (await self._request({"type": "state"}))["data"]

    async def close(self) -> None:
        """Say goodbye (the server frees the session at once) and close; never raises."""
        try:
            if not self.broken:
                await self._ws.send('{"type":"close"}')
            await self._ws.close()
        except (ConnectionClosed, OSError):
            pass

    async def _request(self, message: dict[str, Any]) -> dict[str, Any]:
        if self.broken:
            raise RuntimeError("this session's last request was cut short; open a new one")
        self.broken = True  # until the answer is in: a cancellation leaves it on the wire
        try:
            try:
                await self._ws.send(orjson.dumps(message).decode())
            except ConnectionClosed:
                pass  # a server that refused the session (CAPACITY_REACHED) said why, then closed: read it
            answer = orjson.loads(await self._ws.recv())
        except ConnectionClosed as exc:
            received = exc.rcvd  # None: no close frame came (1006, abnormal closure: the server died)
            raise ServerClosed(received.code if received else 1006, received.reason if received else "") from None
        self.broken = False
        if answer.get("type") == "error":
            data = answer.get("data") or {}
            code = str(data.get("code", "UNKNOWN"))
            details = data.get("errors")
            text = str(data.get("message", "")) + (f" {details}" if details else "")
            if code == "CAPACITY_REACHED":
                self.broken = True  # the server closes this connection
            raise _ERRORS.get(code, OpenEnvError)(code, text)
        return answer


def _step_result(answer: dict[str, Any]) -> StepResult:
    if answer.get("type") != "observation":
        raise OpenEnvError("UNEXPECTED_ANSWER", f"expected an observation, got {str(answer)[:300]}")
    data = answer["data"]
    reward = data.get("reward")
    return StepResult(observation=dict(data.get("observation") or {}),
                      reward=None if reward is None else float(reward), done=bool(data.get("done")))


async def fetch_json(base_url: str, path: str, timeout_s: float = 10.0) -> Any:
    """GET `path` of an OpenEnv server (`/health`, `/schema`): its JSON, or an exception."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as http:
        async with http.get(base_url.rstrip("/") + path) as answer:
            answer.raise_for_status()
            return await answer.json(content_type=None)


async def wait_until_healthy(base_url: str, timeout_s: float, alive: Any = None) -> None:
    """Poll `/health` until it answers 200 (`alive()` False: the server died; stop waiting)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    last = "no answer yet"
    while loop.time() < deadline:
        if alive is not None and not alive():
            raise ConnectionError(f"the OpenEnv server at {base_url} exited while starting")
        try:
            await fetch_json(base_url, "/health", timeout_s=2.0)
            return
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        await asyncio.sleep(0.2)
    raise TimeoutError(f"the OpenEnv server at {base_url} did not answer /health within {timeout_s:g} s (last: {last})")
