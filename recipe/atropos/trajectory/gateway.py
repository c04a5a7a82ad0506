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

`GatedCheckpointEngineManager` (weight_sync.py) calls both from verl's own weight-sync
sequence. A request held longer than `hold_timeout_s` gets 503 with `Retry-After`; so does one that
arrives when `max_held` requests are already held. A held request whose client disconnects is
dropped at once (never forwarded when the gate opens) and counted in `/health` as
`requests_abandoned`: a retrying environment would otherwise have the servers generate every
abandoned attempt once the step ends.

With `api_key` every route but `/health` needs `Authorization: Bearer <key>` (recipe/atropos/http_auth.py);
a gateway that listens beyond loopback refuses to start without one.

Routes: `/v1/completions`, `/v1/chat/completions` and `/v1/models` are passed through, with the
request's `model` replaced by the name the server serves (environments need not know it);
`/generate` (atroposlib's `server_type: vllm` and `sglang` dialects, generate_api.py) is translated
to `/v1/completions` with vLLM's `return_token_ids`, which verl's vLLM servers answer; `/health` says
whether the gate is open and which training step's weights the servers hold. Errors are JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import aiohttp
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from recipe.atropos.config import check_gateway_exposure
from recipe.atropos.trajectory.generate_api import Sample, completions_body, parse_generate_request
from recipe.atropos.http_auth import CHALLENGE_HEADERS, authorization_header, bearer_refusal

logger = logging.getLogger("verl.recipe.atropos")

_PASSED_HEADERS = ("content-type", "authorization", "accept")
_RETRY_AFTER_S = "5"
# Answered to a client that has gone (nobody reads it); nginx's "client closed request".
_CLIENT_GONE_STATUS = 499


class GateTimeout(Exception):
    """A request waited longer than `hold_timeout_s` at the closed gate."""


class GatewayStopping(Exception):
    """The gateway is shutting down: held requests are turned away."""


class GateFull(Exception):
    """`max_held` requests are already waiting at the closed gate."""


class ClientGone(Exception):
    """The client of a held request disconnected: nobody waits for its answer."""


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

    def __init__(self, backends: _Backends, hold_timeout_s: float, max_held: int = 1024):
        self.backends = backends
        self.hold_timeout_s = hold_timeout_s
        self.max_held = max_held
        self.global_steps: int | None = None
        self.held = 0
        self.requests_abandoned = 0  # held requests dropped because their client disconnected
        self.requests_refused_full = 0  # 503: max_held requests were already held
        self.requests_held_too_long = 0  # 503: held past hold_timeout_s
        self.requests_unauthorized = 0  # 401: no or a wrong bearer key
        self.times_opened = 0  # weight syncs done (fit() syncs once before the first step)
        self.times_closed = 0  # times the servers were put to sleep
        self.stopping = False
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
    async def admitted(self, disconnected: Callable[[], Awaitable[Any]] | None = None) -> AsyncIterator[str]:
        """Wait for the gate (up to hold_timeout_s), then hold a slot on one server until done.

        `disconnected` returns when the request's client has gone; a held request whose client goes
        raises ClientGone instead of being let through."""
        if not self._open.is_set():
            await self._hold(disconnected)
        if self.stopping:
            raise GatewayStopping
        url = self.backends.pick()
        self.backends.in_flight[url] += 1
        self._idle.clear()
        try:
            yield url
        finally:
            self.backends.in_flight[url] -= 1
            if self.in_flight == 0:
                self._idle.set()

    async def _hold(self, disconnected: Callable[[], Awaitable[Any]] | None) -> None:
        if self.held >= self.max_held:
            self.requests_refused_full += 1
            raise GateFull
        self.held += 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.hold_timeout_s
        client_gone = asyncio.ensure_future(disconnected()) if disconnected is not None else loop.create_future()
        try:
            # Checked again on every wake-up: a gate opened and closed at once lets nobody through.
            while not self._open.is_set() and not self.stopping and not client_gone.done():
                opened = asyncio.ensure_future(self._open.wait())
                try:
                    await asyncio.wait({opened, client_gone}, timeout=deadline - loop.time(), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    opened.cancel()
                if loop.time() >= deadline and not self._open.is_set():
                    self.requests_held_too_long += 1
                    raise GateTimeout
            if client_gone.done():  # also when it left just as the gate opened: nobody reads the answer
                self.requests_abandoned += 1
                raise ClientGone
        finally:
            client_gone.cancel()
            self.held -= 1

    async def open(self, global_steps: int | None) -> None:
        self.global_steps = global_steps
        self.times_opened += 1
        self._open.set()

    async def stop_admitting(self) -> None:
        """Turn away held and new requests (503), before the server shuts down."""
        self.stopping = True
        self._open.set()  # wakes the held requests, which then see `stopping`

    async def close_and_drain(self, timeout_s: float) -> int:
        """Close the gate, wait up to timeout_s for requests in flight; returns how many remain."""
        self._open.clear()
        self.times_closed += 1
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout=timeout_s)
        return self.in_flight


def _error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": message}, headers=headers or None)


def _with_model(body: bytes, name: str) -> bytes:
    """`body` with its JSON `model` set to `name` (a body that is not a JSON object is left as is)."""
    try:
        payload = json.loads(body)
    except ValueError:
        return body
    if not isinstance(payload, dict) or payload.get("model") == name:
        return body
    return json.dumps({**payload, "model": name}).encode()


async def _forward(client: aiohttp.ClientSession, method: str, url: str, body: bytes, headers: dict[str, str]) -> Response:
    """The server's answer to the request, read whole, as the gateway's answer."""
    async with client.request(method, url, data=body, headers=headers) as answer:
        return Response(content=await answer.read(), status_code=answer.status, media_type=answer.headers.get("content-type"))


def _disconnect_of(request: Request) -> Callable[[], Awaitable[None]]:
    """What returns once `request`'s client disconnects (its body read: the next ASGI message is that)."""

    async def wait() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    return wait


class _BearerKeyMiddleware:
    """Pure ASGI (bodies and disconnects untouched): every path but /health needs the key."""

    def __init__(self, app, api_key: str, gate: PolicyGate):
        self.app = app
        self.api_key = api_key
        self.gate = gate

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            reason = bearer_refusal(authorization_header(scope), self.api_key)
            if reason is not None:
                self.gate.requests_unauthorized += 1
                message = (f"the policy gateway needs 'Authorization: Bearer <key>' (trainer.atropos.policy_api_key); "
                           f"the request's key is {reason}")
                await _error(401, message, **CHALLENGE_HEADERS)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _DirectRoutes:
    """Pure ASGI: a POST to one of `routes` goes straight to its handler, past FastAPI's routing and
    request handling, which cost a third of the gateway's CPU per relayed request; the gateway's
    own cores are the inference servers' at 64 requests in flight."""

    def __init__(self, app, routes: dict[str, Callable[[Request], Awaitable[Response]]]):
        self.app = app
        self.routes = routes

    async def __call__(self, scope, receive, send) -> None:
        handler = self.routes.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if handler is None:
            await self.app(scope, receive, send)
            return
        response = await handler(Request(scope, receive, send))
        await response(scope, receive, send)


def build_app(gate: PolicyGate, api_key: str | None = None) -> FastAPI:
    """The gateway's FastAPI app over `gate` (one HTTP client per app, opened with it); with
    `api_key`, every route but /health needs it as a bearer key."""
    state: dict[str, Any] = {}
    direct_routes: dict[str, Callable[[Request], Awaitable[Response]]] = {}  # filled below

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        # aiohttp, not httpx: httpx's pool cost ~3 ms of CPU per request at 64 in flight (a linear scan
        # of its connections, a poll of each socket), which the servers' cores then lack; aiohttp ~0.7 ms.
        # No bound on connections (as many as requests in flight, as when clients call the servers
        # directly); idle ones are closed after 4 s, before uvicorn's 5 s (vLLM's server) closes them
        # under a request just sent.
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=4)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10.0)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as client:
            state["client"] = client
            yield

    app = FastAPI(title="Atropos policy gateway", lifespan=lifespan)
    # The generation routes skip FastAPI's routing (added first: the bearer check stays outside it).
    app.add_middleware(_DirectRoutes, routes=direct_routes)
    if api_key:
        app.add_middleware(_BearerKeyMiddleware, api_key=api_key, gate=gate)

    served_names: dict[str, str | None] = {}

    async def served_model(url: str, headers: dict[str, str]) -> str | None:
        """The model name `url` serves, asked once; None when its `/v1/models` does not say (requests
        then go as they came)."""
        if url not in served_names:
            async with state["client"].get(f"{url}/v1/models", headers=headers) as answer:
                status, text = answer.status, await answer.text()
            try:
                served_names[url] = json.loads(text)["data"][0]["id"]
            except (ValueError, KeyError, IndexError, TypeError):
                logger.warning("policy gateway: %s/v1/models names no model (HTTP %d)", url, status)
                served_names[url] = None
        return served_names[url]

    async def relay(request: Request, path: str, *, names_model: bool = False) -> Response:
        """Pass the request through to one server; with `names_model`, a JSON body's `model` becomes
        the name that server serves (vLLM refuses others; environments need not know it)."""
        headers = {k: v for k, v in request.headers.items() if k.lower() in _PASSED_HEADERS}
        body = await request.body()
        try:
            async with gate.admitted(_disconnect_of(request)) as url:
                name = await served_model(url, headers) if names_model else None
                if name is not None:
                    body = _with_model(body, name)
                return await _forward(state["client"], request.method, f"{url}{path}", body, headers)
        except (GateTimeout, GateFull, ClientGone, GatewayStopping, aiohttp.ClientError) as exc:
            return _refusal(exc)

    def _refusal(exc: Exception) -> Response:
        if isinstance(exc, ClientGone):
            return Response(status_code=_CLIENT_GONE_STATUS)
        if isinstance(exc, GateTimeout):
            return _error(
                503,
                f"the policy's weights were still being replaced after {gate.hold_timeout_s:g} s "
                "(trainer.atropos.policy_hold_timeout_s); retry",
                **{"Retry-After": _RETRY_AFTER_S},
            )
        if isinstance(exc, GateFull):
            return _error(
                503,
                f"{gate.held} requests already wait for the policy's new weights "
                f"(trainer.atropos.policy_max_held_requests={gate.max_held}); retry",
                **{"Retry-After": _RETRY_AFTER_S},
            )
        if isinstance(exc, GatewayStopping):
            return _error(503, "the policy gateway is shutting down (the training run is ending)")
        return _error(502, f"inference server unreachable: {type(exc).__name__}: {exc}")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "gate": "open" if gate.is_open else "closed",
            "global_steps": gate.global_steps,
            "times_opened": gate.times_opened,
            "times_closed": gate.times_closed,
            "in_flight": gate.in_flight,
            "held": gate.held,
            "max_held": gate.max_held,
            "requests_abandoned": gate.requests_abandoned,
            "requests_refused_full": gate.requests_refused_full,
            "requests_held_too_long": gate.requests_held_too_long,
            "requests_unauthorized": gate.requests_unauthorized,
            "servers": gate.backends.urls,
        }

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        return await relay(request, "/v1/models")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await relay(request, "/v1/completions", names_model=True)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await relay(request, "/v1/chat/completions", names_model=True)

    @app.post("/generate")
    async def generate(raw: Request) -> Response:
        try:
            request = parse_generate_request(await raw.json())
        except ValueError as exc:  # pydantic's ValidationError included
            return _error(422 if isinstance(exc, ValidationError) else 400, str(exc))
        body = {**completions_body(request), "logprobs": 0, "return_token_ids": True}
        headers = {k: v for k, v in raw.headers.items() if k.lower() == "authorization"}
        try:
            async with gate.admitted(_disconnect_of(raw)) as url:
                name = await served_model(url, headers)
                if name is not None:
                    body["model"] = name
                answer = await _forward(state["client"], "POST", f"{url}/v1/completions", json.dumps(body).encode(),
                                        {**headers, "content-type": "application/json"})
        except (GateTimeout, GateFull, ClientGone, GatewayStopping, aiohttp.ClientError) as exc:
            return _refusal(exc)
        if answer.status_code != 200:
            return answer
        choices = sorted(json.loads(answer.body)["choices"], key=lambda c: c["index"])
        if any(c.get("token_ids") is None or not c.get("logprobs") for c in choices):
            return _error(502, "the inference server's completions carry no token_ids/logprobs (vLLM >= 0.10.2 needed)")
        return JSONResponse(
            request.answer(
                choices[0].get("prompt_token_ids") or body["prompt"],
                [
                    Sample(c["text"], c["token_ids"], c["logprobs"]["token_logprobs"], c["finish_reason"])
                    for c in choices
                ],
            )
        )

    direct_routes.update({"/v1/completions": completions, "/v1/chat/completions": chat_completions, "/generate": generate})
    return app


def _listening_socket(host: str, port: int) -> socket.socket:
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return socket.create_server((host.strip("[]"), port), family=family)
    except OSError as exc:
        raise OSError(
            f"the policy gateway cannot listen on {host}:{port} ({exc.strerror}): free the port or set "
            "trainer.atropos.policy_gateway_port (and policy_gateway_host)"
        ) from exc


def check_port_free(host: str, port: int) -> None:
    """Raise, naming trainer.atropos.policy_gateway_port, when the gateway could not listen there."""
    if port != 0:
        _listening_socket(host, port).close()


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
        max_held: int = 1024,
        api_key: str | None = None,
    ):
        check_gateway_exposure(host, api_key)  # before anything listens
        self.host = host
        self.port = port
        self.drain_timeout_s = drain_timeout_s
        self._backends = _Backends(server_urls)
        self._hold_timeout_s = hold_timeout_s
        self._max_held = max_held
        self._api_key = api_key
        self._loop: asyncio.AbstractEventLoop | None = None
        self._gate: PolicyGate | None = None
        self._server = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        """What environments get as `--openai.base_url`."""
        host = f"[{self.host.strip('[]')}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    def start(self, timeout_s: float = 30.0) -> PolicyGateway:
        import uvicorn

        sock = _listening_socket(self.host, self.port)  # bound here: a busy port fails now, not later
        self.port = sock.getsockname()[1]

        def serve() -> None:
            try:  # uvloop (uvicorn's own choice when installed): ~12% less CPU per request relayed
                import uvloop

                self._loop = uvloop.new_event_loop()
            except ImportError:
                self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            self._gate = PolicyGate(self._backends, self._hold_timeout_s, self._max_held)
            app = build_app(self._gate, api_key=self._api_key)
            # Requests still running get a short grace period at shutdown (their clients retry).
            # No access log and no X-Forwarded-For rewriting: per-request work the gateway does not use.
            config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2,
                                    access_log=False, proxy_headers=False)
            self._server = uvicorn.Server(config)
            try:
                self._loop.run_until_complete(self._server.serve(sockets=[sock]))
                # uvicorn cancels the requests still running after the grace period but does not wait
                # for them: let them end (their connections close) before the loop does.
                pending = asyncio.all_tasks(self._loop)
                for task in pending:
                    task.cancel()
                self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            finally:
                self._loop.close()
                sock.close()

        self._thread = threading.Thread(target=serve, name="atropos-policy-gateway", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not (self._server is not None and self._server.started):  # started: its loop runs
            if time.monotonic() > deadline or not self._thread.is_alive():
                self.stop()
                sock.close()
                raise RuntimeError(f"the policy gateway on {self.host}:{self.port} did not start within {timeout_s:g} s")
            time.sleep(0.01)
        logger.warning(
            "policy gateway for environments: %s -> %s (closed until the first weight sync)",
            self.base_url, ", ".join(self._backends.urls),
        )
        return self

    def _call(self, coroutine_fn, *args, timeout_s: float = 30.0):
        """Run one of the gate's coroutines on the gateway's loop and wait for its result."""
        if self._loop is None:
            raise RuntimeError("the policy gateway is not running")
        return asyncio.run_coroutine_threadsafe(coroutine_fn(*args), self._loop).result(timeout=timeout_s)

    def open(self, global_steps: int | None) -> None:
        """Let requests through to servers that hold the weights of training step `global_steps`."""
        self._call(self._gate.open, global_steps)

    def close_and_drain(self) -> None:
        """Hold new requests; wait (up to drain_timeout_s) for those in flight to finish."""
        start = time.monotonic()
        remaining = self._call(self._gate.close_and_drain, self.drain_timeout_s, timeout_s=self.drain_timeout_s + 30)
        if remaining:
            logger.warning(
                "policy gateway: %d request(s) still running after %.0f s (trainer.atropos.policy_drain_timeout_s); "
                "the inference servers go to sleep under them", remaining, time.monotonic() - start,
            )

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            if self._thread.is_alive():
                self._call(self._gate.stop_admitting)
            self._server.should_exit = True
            self._thread.join(timeout=10)
        self._server = self._thread = None
