"""`GatewayTransport`: the training client's calls to the policy gateway, over one aiohttp session.

verifiers' training client (`TrainClient`) hands an OpenAI SDK client to `renderers.client.generate`,
which uses three things of it: `base_url`, `post(url, cast_to=httpx.Response, body=..., options=...)`
for `/inference/v1/generate`, and `get("/models", cast_to=dict)` once per process for the engine's
context length. Through the SDK each call pays its request building and httpx's connection pool, which
scans every pooled connection per request: at 64 episodes in flight the largest CPU cost of a runner
(benchmarks/bench_verifiers_runner.py). This class offers the same three over aiohttp, and raises the
SDK's own errors (`APIStatusError` with the gateway's status, `APIConnectionError`, `APITimeoutError`),
so verifiers maps a failure to the same `ProviderError` status as before. patches.py installs it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import httpx
import openai
import orjson
from verifiers.v1.configs.client import BaseClientConfig, resolve_api_key, resolve_headers

__all__ = ["GatewayTransport"]


class _Answer:
    """What `generate` reads of the SDK's raw response: the body's bytes."""

    __slots__ = ("content",)

    def __init__(self, content: bytes) -> None:
        self.content = content


class GatewayTransport:
    """The part of `openai.AsyncOpenAI` that `renderers.client.generate` uses, for one client config."""

    def __init__(self, config: BaseClientConfig) -> None:
        # The SDK keeps base_url with a trailing slash; generate strips it and a /v1 itself.
        self.base_url = config.base_url.rstrip("/") + "/"
        self._headers = {"Authorization": f"Bearer {resolve_api_key(config)}", "Content-Type": "application/json",
                         **resolve_headers(config)}
        # As the SDK's httpx client: connect bounded, reads unbounded by default (the rollout's deadline is
        # the backstop); aiohttp's total would also cut a long generation.
        timeout = config.timeout
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout.connect, sock_read=timeout.read)
        self._session: aiohttp.ClientSession | None = None

    def _session_now(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # limit=0: as many connections as episodes in flight (verifiers' own pool allows 1,000).
            self._session = aiohttp.ClientSession(timeout=self._timeout, connector=aiohttp.TCPConnector(limit=0))
        return self._session

    def _url(self, path: str) -> str:
        return path if "://" in path else self.base_url + path.lstrip("/")

    async def _call(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> bytes:
        url = self._url(path)
        data = orjson.dumps(body) if body is not None else None
        try:
            async with self._session_now().request(method, url, data=data,
                                                   headers={**self._headers, **(headers or {})}) as answer:
                content = await answer.read()
                status = answer.status
        except asyncio.TimeoutError as exc:
            raise openai.APITimeoutError(request=httpx.Request(method, url)) from exc
        except aiohttp.ClientError as exc:
            raise openai.APIConnectionError(message=f"{type(exc).__name__}: {exc}",
                                            request=httpx.Request(method, url)) from exc
        if status >= 400:
            response = httpx.Response(status, content=content, request=httpx.Request(method, url))
            try:
                detail: Any = orjson.loads(content)
            except orjson.JSONDecodeError:
                detail = None
            raise openai.APIStatusError(f"Error code: {status} - {content[:300].decode(errors='replace')}",
                                        response=response, body=detail)
        return content

    async def post(self, path: str, *, cast_to: Any = None, body: Any = None, options: Any = None) -> Any:
        """`generate`'s POST: the raw answer (`.content`) for `cast_to=httpx.Response`, else parsed JSON."""
        headers = (options or {}).get("headers") if isinstance(options, dict) else None
        content = await self._call("POST", path, body, headers)
        return _Answer(content) if cast_to is httpx.Response else orjson.loads(content)

    async def get(self, path: str, *, cast_to: Any = None, options: Any = None) -> Any:
        content = await self._call("GET", path)
        return _Answer(content) if cast_to is httpx.Response else orjson.loads(content)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
