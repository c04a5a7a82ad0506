"""The policy gateway: one stable endpoint in front of the policy's inference servers, closed while
their weights are being replaced.

In trajectory mode Atropos environments generate through the policy being trained. verl's rollout
servers (vLLM's OpenAI server on GPU, the HF rollout's on CPU) listen on ports chosen at start-up,
one per replica, and on GPU they sleep (weights and KV cache freed) from the end of a step's
generation until the next weight sync. The gateway gives the environments one address that does
not change, spreads their requests over the replicas (fewest requests in flight first), and holds
requests that arrive while the gate is closed until it opens again, rather than letting them reach
a sleeping server:

- `close_and_drain()` (before the replicas sleep) stops admitting requests and waits for those in
  flight to finish;
- `open(global_steps)` (after the new weights are loaded and the replicas woke up) lets the held
  requests through.

`GatedCheckpointEngineManager` (gated_checkpoint_manager.py) calls both from verl's own weight-sync
sequence. A request held longer than `hold_timeout_s` gets 503 with `Retry-After`.

Routes: `/v1/completions`, `/v1/chat/completions` and `/v1/models` are passed through as they are;
`/generate` (atroposlib's `server_type: vllm`, vllm_generate_api.py) is translated to
`/v1/completions` with vLLM's `return_token_ids`, which verl's vLLM servers answer; `/health` says
whether the gate is open and which training step's weights the servers hold. Errors are JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from recipe.atropos.vllm_generate_api import GenerateRequest, generate_answer

logger = logging.getLogger("verl.recipe.atropos")

_PASSED_HEADERS = ("content-type", "authorization", "accept")


class GateTimeout(Exception):
    """A request waited longer than `hold_timeout_s` at the closed gate."""


class _Backends:
    """The replicas' base URLs and how many requests each has in flight (gateway loop only)."""

    def __init__(self, urls: Sequence[str]):
        if not urls:
            raise ValueError("the policy gateway needs at least one inference server URL")
        self.urls = [url.rstrip("/") for url in urls]
        self.in_flight = dict.fromkeys(self.urls, 0)
        self._order = itertools.count()

    def pick(self) -> str:
        """The server with the fewest requests in flight (round robin among equals)."""
        turn = next(self._order)
        n = len(self.urls)
        rotated = [self.urls[(turn + i) % n] for i in range(n)]
        return min(rotated, key=self.in_flight.__getitem__)


class PolicyGate:
    """Open/closed state and in-flight accounting; every coroutine runs on the gateway's loop."""

    def __init__(self, backends: _Backends, hold_timeout_s: float):
        self.backends = backends
        self.hold_timeout_s = hold_timeout_s
        self.global_steps: int | None = None
        self.held = 0
        self._open = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def is_open(self) -> bool:
        return self._open.is_set()

    @property
    def in_flight(self) -> int:
        return sum(self.backends.in_flight.values())

    @contextlib.asynccontextmanager
    async def admitted(self) -> AsyncIterator[str]:
        """Wait for the gate (up to hold_timeout_s), then hold a slot on one server until done."""
        if not self._open.is_set():
            self.held += 1
            try:
                await asyncio.wait_for(self._open.wait(), timeout=self.hold_timeout_s)
            except asyncio.TimeoutError as exc:
                raise GateTimeout from exc
            finally:
                self.held -= 1
        url = self.backends.pick()
        self.backends.in_flight[url] += 1
        self._idle.clear()
        try:
            yield url
        finally:
            self.backends.in_flight[url] -= 1
            if self.in_flight == 0:
                self._idle.set()

    def open(self, global_steps: int | None) -> None:
        self.global_steps = global_steps
        self._open.set()

    async def close_and_drain(self, timeout_s: float) -> int:
        """Close the gate, wait up to timeout_s for requests in flight; returns how many remain."""
        self._open.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout=timeout_s)
        return self.in_flight


def _error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": message}, headers=headers or None)


def build_app(gate: PolicyGate, client_factory=httpx.AsyncClient) -> FastAPI:
    """The gateway's FastAPI app over `gate` (one HTTP client per app, opened with it)."""
    state: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        async with client_factory(timeout=httpx.Timeout(None, connect=10.0)) as client:
            state["client"] = client
            yield

    app = FastAPI(title="Atropos policy gateway", lifespan=lifespan)

    async def forward(method: str, path: str, body: bytes | None, headers: dict[str, str]) -> httpx.Response:
        async with gate.admitted() as url:
            return await state["client"].request(method, f"{url}{path}", content=body, headers=headers)

    async def relay(request: Request, path: str) -> Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() in _PASSED_HEADERS}
        try:
            answer = await forward(request.method, path, await request.body(), headers)
        except GateTimeout:
            return _held_too_long()
        except httpx.HTTPError as exc:
            return _error(502, f"inference server unreachable: {type(exc).__name__}: {exc}")
        return Response(content=answer.content, status_code=answer.status_code, media_type=answer.headers.get("content-type"))

    def _held_too_long() -> JSONResponse:
        return _error(
            503,
            f"the policy's weights were still being replaced after {gate.hold_timeout_s:g} s "
            "(trainer.atropos.policy_hold_timeout_s); retry",
            **{"Retry-After": "5"},
        )

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "gate": "open" if gate.is_open else "closed",
            "global_steps": gate.global_steps,
            "in_flight": gate.in_flight,
            "held": gate.held,
            "servers": gate.backends.urls,
        }

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        return await relay(request, "/v1/models")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await relay(request, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await relay(request, "/v1/chat/completions")

    @app.post("/generate")
    async def generate(request: GenerateRequest, raw: Request) -> Response:
        try:
            prompt = request.prompt_token_ids()
        except ValueError as exc:
            return _error(400, str(exc))
        body = {
            **request.sampling_fields(),
            "prompt": prompt if prompt is not None else request.prompt,
            "logprobs": 0,
            "return_token_ids": True,
        }
        headers = {k: v for k, v in raw.headers.items() if k.lower() == "authorization"}
        try:
            async with gate.admitted() as url:
                # vLLM checks `model` against the names it serves: ask the server itself.
                models_answer = await state["client"].get(f"{url}/v1/models", headers=headers)
                models_answer.raise_for_status()
                body["model"] = models_answer.json()["data"][0]["id"]
                answer = await state["client"].post(f"{url}/v1/completions", json=body, headers=headers)
        except GateTimeout:
            return _held_too_long()
        except httpx.HTTPError as exc:
            return _error(502, f"inference server unreachable: {type(exc).__name__}: {exc}")
        if answer.status_code != 200:
            return Response(content=answer.content, status_code=answer.status_code, media_type=answer.headers.get("content-type"))
        completion = answer.json()
        choices = sorted(completion["choices"], key=lambda c: c["index"])
        missing = [c["index"] for c in choices if c.get("token_ids") is None or not c.get("logprobs")]
        if missing:
            return _error(502, "the inference server's completions carry no token_ids/logprobs (vLLM >= 0.10.2 needed)")
        return JSONResponse(
            generate_answer(
                choices[0].get("prompt_token_ids") or prompt or [],
                texts=[c["text"] for c in choices],
                token_ids=[c["token_ids"] for c in choices],
                log_probs=[c["logprobs"]["token_logprobs"] for c in choices],
                finish_reasons=[c["finish_reason"] for c in choices],
            )
        )

    return app


class PolicyGateway:
    """Runs the gateway's uvicorn server on its own thread and event loop, controlled from any thread."""

    def __init__(
        self,
        server_urls: Sequence[str],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        hold_timeout_s: float = 1800.0,
        drain_timeout_s: float = 120.0,
    ):
        self.host = host
        self.port = port
        self.drain_timeout_s = drain_timeout_s
        self._backends = _Backends(server_urls)
        self._hold_timeout_s = hold_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._gate: PolicyGate | None = None
        self._server = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        """What environments get as `--openai.base_url`."""
        return f"http://{self.host}:{self.port}/v1"

    def start(self, timeout_s: float = 30.0) -> PolicyGateway:
        import socket

        import uvicorn

        ready = threading.Event()
        sock = socket.create_server((self.host, self.port))  # bound here: a busy port fails now, not later
        self.port = sock.getsockname()[1]

        def serve() -> None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            self._gate = PolicyGate(self._backends, self._hold_timeout_s)
            # Held requests get no answer past a short grace period at shutdown (their clients retry).
            config = uvicorn.Config(build_app(self._gate), log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
            self._server = uvicorn.Server(config)
            self._loop.call_soon(ready.set)
            self._loop.run_until_complete(self._server.serve(sockets=[sock]))
            # uvicorn cancels the requests still running after the grace period but does not wait for them:
            # let them end (their connections close) before the loop does, or their clients wait forever.
            pending = asyncio.all_tasks(self._loop)
            for task in pending:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self._loop.close()

        self._thread = threading.Thread(target=serve, name="atropos-policy-gateway", daemon=True)
        self._thread.start()
        if not ready.wait(timeout_s):
            raise RuntimeError(f"the policy gateway did not start within {timeout_s:g} s")
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"the policy gateway on {self.host}:{self.port} did not start")
            time.sleep(0.01)
        logger.warning(
            "policy gateway for environments: %s -> %s (closed until the first weight sync)",
            self.base_url, ", ".join(self._backends.urls),
        )
        return self

    def _call(self, coro_or_fn, *args):
        if self._loop is None:
            raise RuntimeError("the policy gateway is not running")
        if asyncio.iscoroutinefunction(coro_or_fn):
            return asyncio.run_coroutine_threadsafe(coro_or_fn(*args), self._loop).result()
        return self._loop.call_soon_threadsafe(coro_or_fn, *args)

    def open(self, global_steps: int | None) -> None:
        """Let requests through to servers that hold the weights of training step `global_steps`."""
        self._call(self._gate.open, global_steps)

    def close_and_drain(self) -> None:
        """Hold new requests; wait (up to drain_timeout_s) for those in flight to finish."""
        start = time.monotonic()
        remaining = self._call(self._gate.close_and_drain, self.drain_timeout_s)
        if remaining:
            logger.warning(
                "policy gateway: %d request(s) still running after %.0f s (trainer.atropos.policy_drain_timeout_s); "
                "the inference servers go to sleep under them", remaining, time.monotonic() - start,
            )

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
        self._server = self._thread = None
