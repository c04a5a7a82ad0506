"""The policy gateway's routes: FastAPI app, pass-through relay, `/generate` translation, refusals.

`build_app(gate)` returns the app the gateway (gateway.py) serves; `GatewayRoutes` holds its state
(the gate, one aiohttp client to the servers, the model name each server serves) and one method
per route. What each route does is in gateway.py's docstring.
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from recipe.atropos.http_auth import CHALLENGE_HEADERS, authorization_header, bearer_refusal
from recipe.atropos.trajectory.behavior import BehaviorRecords
from recipe.atropos.trajectory.gate import ClientGone, GateFull, GateTimeout, GatewayStopping, PolicyGate
from recipe.atropos.trajectory.generate_api import Sample, TokenInGenerateRequest, completions_body, parse_generate_request

logger = logging.getLogger("verl.recipe.atropos")

_PASSED_HEADERS = ("content-type", "authorization", "accept")
_RETRY_AFTER_S = "5"
# Answered to a client that has gone (nobody reads it); nginx's "client closed request".
_CLIENT_GONE_STATUS = 499
_REFUSED = (GateTimeout, GateFull, ClientGone, GatewayStopping, aiohttp.ClientError)


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


def _ask_for_behavior(payload: dict[str, Any], chat: bool) -> tuple[str, ...]:
    """Ask the server for token ids and the sampled tokens' log-probs; returns what the client had
    not asked for (to be taken out of the answer)."""
    added = []
    if not payload.get("return_token_ids"):
        payload["return_token_ids"] = True
        added.append("return_token_ids")
    if chat and not payload.get("logprobs"):
        payload["logprobs"] = True
        added.append("logprobs")
    elif not chat and payload.get("logprobs") is None:
        payload["logprobs"] = 0  # the sampled token's log-prob, no alternatives
        added.append("logprobs")
    return tuple(added)


def _token_ids(value: Any) -> list[int] | None:
    """`value` when it is a non-empty list of token ids, else None."""
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return value
    return None


def _remove_unasked(content: dict[str, Any], added: tuple[str, ...], chat: bool) -> None:
    """The answer as the client asked for it: without the fields `_ask_for_behavior` added."""
    if "return_token_ids" in added:
        content.pop("prompt_token_ids", None)  # chat: on the answer; completions: on each choice
    for choice in content.get("choices") or ():
        if "return_token_ids" in added:
            choice.pop("token_ids", None)
            choice.pop("prompt_token_ids", None)
        if "logprobs" in added:
            choice["logprobs"] = None


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


class GatewayRoutes:
    """The gateway's state and its routes (one instance per app, used on the gateway's loop only)."""

    def __init__(self, gate: PolicyGate, records: BehaviorRecords):
        self.gate = gate
        self.records = records
        self.client: aiohttp.ClientSession | None = None  # opened by the app's lifespan
        self.served_names: dict[str, str | None] = {}
        self.unrecorded = 0  # completions answered without tokens or log-probs to record (streams included)
        self.resent = 0  # requests sent again after the server closed their kept-alive connection

    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI):
        # aiohttp, not httpx: httpx's pool cost ~3 ms of CPU per request at 64 in flight (a linear scan
        # of its connections, a poll of each socket), which the servers' cores then lack; aiohttp ~0.7 ms.
        # No bound on connections (as many as requests in flight, as when clients call the servers
        # directly); idle ones are closed after 4 s, before uvicorn's 5 s (vLLM's server) closes them
        # under a request just sent.
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=4)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10.0)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as self.client:
            yield

    async def served_model(self, url: str, headers: dict[str, str]) -> str | None:
        """The model name `url` serves, asked once; None when its `/v1/models` does not say (requests
        then go as they came)."""
        if url not in self.served_names:
            async with self.client.get(f"{url}/v1/models", headers=headers) as answer:
                status, text = answer.status, await answer.text()
            try:
                self.served_names[url] = json.loads(text)["data"][0]["id"]
            except (ValueError, KeyError, IndexError, TypeError):
                logger.warning("policy gateway: %s/v1/models names no model (HTTP %d)", url, status)
                self.served_names[url] = None
        return self.served_names[url]

    async def forward(self, method: str, url: str, body: bytes, headers: dict[str, str]) -> Response:
        """The server's answer to the request, read whole, as the gateway's answer.

        A kept-alive connection the server closes just as a request goes out on it (uvicorn, vLLM's
        server, closes idle ones after 5 s) fails with ServerDisconnectedError before any answer:
        the request goes once more, on a new connection, as proxies do."""
        for attempt in (1, 2):
            try:
                async with self.client.request(method, url, data=body, headers=headers) as answer:
                    return Response(content=await answer.read(), status_code=answer.status,
                                    media_type=answer.headers.get("content-type"))
            except aiohttp.ServerDisconnectedError:
                if attempt == 2:
                    raise
                self.resent += 1
        raise AssertionError("unreachable")

    async def relay(self, request: Request, path: str, *, names_model: bool = False, body: bytes | None = None) -> Response:
        """Pass the request through to one server; with `names_model`, a JSON body's `model` becomes
        the name that server serves (vLLM refuses others; environments need not know it)."""
        headers = {k: v for k, v in request.headers.items() if k.lower() in _PASSED_HEADERS}
        body = await request.body() if body is None else body
        try:
            async with self.gate.admitted(_disconnect_of(request)) as url:
                name = await self.served_model(url, headers) if names_model else None
                if name is not None:
                    body = _with_model(body, name)
                return await self.forward(request.method, f"{url}{path}", body, headers)
        except _REFUSED as exc:
            return self.refusal(exc)

    def refusal(self, exc: Exception) -> Response:
        """The answer to a request the gate or the server turned away."""
        if isinstance(exc, ClientGone):
            return Response(status_code=_CLIENT_GONE_STATUS)
        if isinstance(exc, GateTimeout):
            return _error(
                503,
                f"the policy's weights were still being replaced after {self.gate.hold_timeout_s:g} s "
                "(trainer.atropos.policy_hold_timeout_s); retry",
                **{"Retry-After": _RETRY_AFTER_S},
            )
        if isinstance(exc, GateFull):
            return _error(
                503,
                f"{self.gate.held} requests already wait for the policy's new weights "
                f"(trainer.atropos.policy_max_held_requests={self.gate.max_held}); retry",
                **{"Retry-After": _RETRY_AFTER_S},
            )
        if isinstance(exc, GatewayStopping):
            return _error(503, "the policy gateway is shutting down (the training run is ending)")
        return _error(502, f"inference server unreachable: {type(exc).__name__}: {exc}")

    async def health(self) -> dict[str, Any]:
        gate = self.gate
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
            "requests_resent": self.resent,
            "behavior_records": {**self.records.stats(), "unrecorded": self.unrecorded},
        }

    async def models(self, request: Request) -> Response:
        return await self.relay(request, "/v1/models")

    async def completions(self, request: Request) -> Response:
        return await self.recorded_relay(request, "/v1/completions", chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self.recorded_relay(request, "/v1/chat/completions", chat=True)

    async def recorded_relay(self, request: Request, path: str, *, chat: bool) -> Response:
        """Relay a completion request, asking the server for what the behaviour records need (token
        ids and sampled log-probs), recording each choice with the weights version that answered,
        and taking out of the answer what the client did not ask for."""
        body = await request.body()
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            payload = None
        if not isinstance(payload, dict) or payload.get("stream"):
            self.unrecorded += 1  # the server judges the body; a stream is passed through as it comes
            return await self.relay(request, path, names_model=True, body=body)
        added = _ask_for_behavior(payload, chat)
        headers = {k: v for k, v in request.headers.items() if k.lower() in _PASSED_HEADERS}
        try:
            async with self.gate.admitted(_disconnect_of(request)) as url:
                version = self.gate.global_steps  # the gate is closed around weight syncs: these weights answer
                name = await self.served_model(url, headers)
                if name is not None:
                    payload["model"] = name
                answer = await self.forward(request.method, f"{url}{path}", orjson.dumps(payload), headers)
        except _REFUSED as exc:
            return self.refusal(exc)
        if answer.status_code != 200:
            return answer
        content = orjson.loads(answer.body)
        for choice in content.get("choices") or ():
            # The prompt's ids: on the answer (chat) or on each choice (completions).
            self._record(choice, version, chat, _token_ids(choice.get("prompt_token_ids"))
                         or _token_ids(content.get("prompt_token_ids")))
        if not added:
            return answer
        _remove_unasked(content, added, chat)
        return Response(content=orjson.dumps(content), status_code=200, media_type="application/json")

    def _record(self, choice: dict[str, Any], version: int | None, chat: bool, prompt_ids: list[int] | None) -> None:
        try:
            token_ids = choice["token_ids"]
            logprobs = choice["logprobs"]
            values = [e["logprob"] for e in logprobs["content"]] if chat else logprobs["token_logprobs"]
            self.records.add(version, token_ids, values, prompt_ids)
        except (KeyError, TypeError, ValueError):  # a server or an answer that carries neither
            self.unrecorded += 1

    async def generate(self, raw: Request) -> Response:
        """atroposlib's `/generate` dialects, sent to `/v1/completions` with vLLM's `return_token_ids`."""
        try:
            request = parse_generate_request(await raw.json())
        except ValueError as exc:  # pydantic's ValidationError included
            return _error(422 if isinstance(exc, ValidationError) else 400, str(exc))
        body = {**completions_body(request), "logprobs": 0, "return_token_ids": True}
        samples = await self.sampled_completions(raw, body)
        if isinstance(samples, Response):
            return samples
        prompt_ids, samples = samples
        return JSONResponse(request.answer(prompt_ids or body["prompt"], samples))

    async def token_generate(self, raw: Request) -> Response:
        """`/inference/v1/generate` (token ids in; token ids and their log-probs out: verifiers' training
        client, the episode runners), sent to `/v1/completions` with the prompt as token ids."""
        try:
            request = TokenInGenerateRequest.model_validate_json(await raw.body())
        except ValidationError as exc:
            return _error(422, str(exc))
        body = request.completions_body()
        samples = await self.sampled_completions(raw, body)
        if isinstance(samples, Response):
            return samples
        _, samples = samples
        return JSONResponse(request.answer(f"gen-{uuid.uuid4().hex}", request.token_ids, samples))

    async def sampled_completions(self, raw: Request, body: dict[str, Any]) -> tuple[list[int] | None, list[Sample]] | Response:
        """`body` sent to a server's `/v1/completions`, each completion recorded with the weights
        version that answered; (prompt token ids when the server gave them, the completions), or the
        answer to pass back when the request was refused or failed."""
        headers = {k: v for k, v in raw.headers.items() if k.lower() == "authorization"}
        try:
            async with self.gate.admitted(_disconnect_of(raw)) as url:
                version = self.gate.global_steps
                name = await self.served_model(url, headers)
                if name is not None:
                    body["model"] = name
                answer = await self.forward("POST", f"{url}/v1/completions", json.dumps(body).encode(),
                                            {**headers, "content-type": "application/json"})
        except _REFUSED as exc:
            return self.refusal(exc)
        if answer.status_code != 200:
            return answer
        choices = sorted(json.loads(answer.body)["choices"], key=lambda c: c["index"])
        if any(c.get("token_ids") is None or not c.get("logprobs") for c in choices):
            return _error(502, "the inference server's completions carry no token_ids/logprobs (vLLM >= 0.10.2 needed)")
        samples = [Sample(c["text"], c["token_ids"], c["logprobs"]["token_logprobs"], c["finish_reason"]) for c in choices]
        # The ids the server was sent (what the environment's sequence holds), else those it tokenized.
        prompt_ids = _token_ids(body.get("prompt")) or (_token_ids(choices[0].get("prompt_token_ids")) if choices else None)
        for sample in samples:
            self.records.add(version, sample.token_ids, sample.log_probs, prompt_ids)
        return choices[0].get("prompt_token_ids") if choices else None, samples


def build_app(gate: PolicyGate, records: BehaviorRecords, api_key: str | None = None) -> FastAPI:
    """The gateway's FastAPI app over `gate`, recording completions in `records` (one HTTP client per
    app, opened with it); with `api_key`, every route but /health needs it as a bearer key."""
    routes = GatewayRoutes(gate, records)
    app = FastAPI(title="Atropos policy gateway", lifespan=routes.lifespan)
    app.get("/health")(routes.health)
    app.get("/v1/models")(routes.models)
    app.post("/v1/completions")(routes.completions)
    app.post("/v1/chat/completions")(routes.chat_completions)
    app.post("/generate")(routes.generate)
    app.post("/inference/v1/generate")(routes.token_generate)
    # The generation routes skip FastAPI's routing (added first: the bearer check stays outside it).
    direct = {"/v1/completions": routes.completions, "/v1/chat/completions": routes.chat_completions,
              "/generate": routes.generate, "/inference/v1/generate": routes.token_generate}
    app.add_middleware(_DirectRoutes, routes=direct)
    if api_key:
        app.add_middleware(_BearerKeyMiddleware, api_key=api_key, gate=gate)
    return app
