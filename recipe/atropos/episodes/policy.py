"""`TokenPolicyClient`: the policy's answers, token ids in and out, through the policy gateway.

`POST {gateway}/inference/v1/generate` (the dialect of verifiers' training client and vLLM's
token-in endpoint): the prompt goes as the episode's exact token ids and the answer comes back as the
sampled ids with one log-prob each; the gateway records both with the weights version that
answered, which is how the trainer bounds staleness and corrects off-policy samples.

A closed gateway (the trainer is swapping weights) holds the request, then answers 503 with
Retry-After when it held it too long: retried, as are a server that is briefly unreachable (502) and
a refused connection, with exponential backoff up to `max_wait_s`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import aiohttp
import orjson
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_random_exponential

from recipe.atropos.episodes.types import Completion

__all__ = ["PolicyError", "TokenPolicyClient"]

_RETRIED_STATUS = (502, 503, 504)


class PolicyError(RuntimeError):
    """The gateway refused the request or answered something unusable; `retryable` when a later try
    may succeed."""

    def __init__(self, message: str, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, (aiohttp.ClientConnectionError, asyncio.TimeoutError)) or (
        isinstance(exc, PolicyError) and exc.retryable)


class TokenPolicyClient:
    """One client per runner process (one connection pool), shared by its concurrent episodes."""

    def __init__(self, base_url: str, *, api_key: str | None = None, model: str = "policy",
                 request_timeout_s: float = 1800.0, max_wait_s: float = 3600.0):
        # `{policy_base_url}` is the gateway's OpenAI base (".../v1"); the token-in route is at its root.
        self.url = base_url.rstrip("/").removesuffix("/v1") + "/inference/v1/generate"
        self.model = model
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = aiohttp.ClientTimeout(total=request_timeout_s, sock_connect=10.0)
        self.max_wait_s = max_wait_s
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> TokenPolicyClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def generate(self, token_ids: Sequence[int], *, max_tokens: int, temperature: float = 1.0,
                       top_p: float = 1.0, top_k: int = -1, stop_token_ids: Sequence[int] | None = None,
                       seed: int | None = None) -> Completion:
        """The policy's answer to `token_ids` (one completion)."""
        sampling = {"max_tokens": int(max_tokens), "temperature": float(temperature), "top_p": float(top_p),
                    "top_k": int(top_k), "n": 1, "logprobs": 1, "skip_special_tokens": False}
        if stop_token_ids:
            sampling["stop_token_ids"] = [int(t) for t in stop_token_ids]
        if seed is not None:
            sampling["seed"] = int(seed)
        body = orjson.dumps({"model": self.model, "token_ids": [int(t) for t in token_ids], "sampling_params": sampling})
        try:  # the first try outside tenacity, which costs ~75 us a call even when nothing fails
            return await self._post(body)
        except Exception as exc:
            if not _retryable(exc):
                raise
        async for attempt in AsyncRetrying(retry=retry_if_exception(_retryable), reraise=True,
                                           stop=stop_after_delay(self.max_wait_s),
                                           wait=wait_random_exponential(multiplier=0.5, max=10.0)):
            with attempt:
                return await self._post(body)
        raise AssertionError("unreachable")

    async def _post(self, body: bytes) -> Completion:
        if self._session is None:
            # Keep-alive under uvicorn's 5 s: a connection the gateway has just closed is never reused.
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=4.0)
            self._session = aiohttp.ClientSession(timeout=self.timeout, connector=connector,
                                                  headers={"Content-Type": "application/json", **self.headers})
        async with self._session.post(self.url, data=body) as answer:
            raw = await answer.read()
            if answer.status != 200:
                text = raw.decode(errors="replace")
                raise PolicyError(f"the policy gateway answered HTTP {answer.status} at {self.url}: {text[:300]}",
                                  retryable=answer.status in _RETRIED_STATUS)
        try:
            choice = orjson.loads(raw)["choices"][0]
            token_ids = tuple(int(t) for t in choice["token_ids"])
            logprobs = tuple(float(e["logprob"]) for e in choice["logprobs"]["content"])
            return Completion(token_ids, logprobs, str(choice.get("finish_reason") or "stop"))
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise PolicyError(f"the policy gateway's answer at {self.url} is not a token-in completion: "
                              f"{type(exc).__name__}: {exc}; answer: {raw[:300].decode(errors='replace')}") from exc
