"""The training client's transport to the gateway (verifiers/transport.py) over real loopback HTTP: what
`renderers.client.generate` sends arrives as sent, and each way a call can fail reaches verifiers as the
same `ProviderError` status the OpenAI SDK gave, so the runner counts it as the same failure kind."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

pytest.importorskip("verifiers")

import openai  # noqa: E402
import verifiers.v1 as vf  # noqa: E402
from aiohttp import web  # noqa: E402
from verifiers.v1.clients import train  # noqa: E402
from verifiers.v1.errors import model_error  # noqa: E402
from verifiers.v1.trace import Error  # noqa: E402

from recipe.atropos.server_process import find_free_loopback_port  # noqa: E402
from recipe.atropos.verifiers import patches  # noqa: E402
from recipe.atropos.verifiers.convert import _kind  # noqa: E402
from recipe.atropos.verifiers.transport import GatewayTransport  # noqa: E402

ANSWER = {"choices": [{"token_ids": [5, 6], "logprobs": {"token_logprobs": [-0.1, -0.2]}, "finish_reason": "stop"}]}


async def _serve(handler, port: int) -> web.AppRunner:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


def _kind_recorded(sdk_error: openai.OpenAIError) -> str:
    """The failure kind the runner counts for an SDK error: TrainClient raises `model_error(e)`, the
    trace records it as `Trace.record_error` does, convert.py reads the record."""
    error = model_error(sdk_error)
    return _kind(Error(type=type(error).__name__, message=str(error), status_code=error.status_code))


def _config(port: int, **timeout) -> vf.TrainClientConfig:
    return vf.TrainClientConfig(base_url=f"http://127.0.0.1:{port}/v1", api_key_var="TRANSPORT_TEST_KEY",
                                headers={"X-Extra": "1"}, timeout=timeout or {})


def test_generate_calls_arrive_as_sent_and_answers_come_back(monkeypatch):
    monkeypatch.setenv("TRANSPORT_TEST_KEY", "secret")
    seen = []

    async def handler(request: web.Request) -> web.Response:
        seen.append((request.method, request.path, dict(request.headers), await request.read()))
        if request.path == "/v1/models":
            return web.json_response({"data": [{"id": "policy", "max_model_len": 512}]})
        return web.json_response(ANSWER)

    async def main():
        port = find_free_loopback_port()
        server = await _serve(handler, port)
        transport = GatewayTransport(_config(port))
        try:
            # As renderers.client.generate calls it: an absolute URL, the raw answer, extra headers.
            body = {"model": "policy", "token_ids": [1, 2, 3], "sampling_params": {"max_tokens": 4, "logprobs": 1}}
            url = f"{transport.base_url.rstrip('/').removesuffix('/v1')}/inference/v1/generate"
            raw = await transport.post(url, cast_to=httpx.Response, body=body, options={"headers": {"X-Session-ID": "t1"}})
            models = await transport.get("/models", cast_to=dict)
        finally:
            await transport.close()
            await server.cleanup()
        return body, raw, models

    body, raw, models = asyncio.run(main())
    assert json.loads(raw.content) == ANSWER and models["data"][0]["max_model_len"] == 512
    (method, path, headers, sent), (get_method, get_path, _, _) = seen
    assert (method, path, json.loads(sent)) == ("POST", "/inference/v1/generate", body)
    assert headers["Authorization"] == "Bearer secret" and headers["X-Session-ID"] == "t1" and headers["X-Extra"] == "1"
    assert (get_method, get_path) == ("GET", "/v1/models")


async def _generate_error(handler, expected: type[Exception], **timeout) -> Exception:
    """The error a generate call raises against `handler` served on loopback (None: nothing listens)."""
    port = find_free_loopback_port()
    server = await _serve(handler, port) if handler is not None else None
    transport = GatewayTransport(_config(port, **timeout))
    try:
        with pytest.raises(expected) as caught:
            await transport.post(f"http://127.0.0.1:{port}/inference/v1/generate", cast_to=httpx.Response, body={})
    finally:
        await transport.close()
        if server is not None:
            await server.cleanup()
    return caught.value


@pytest.mark.parametrize("status,kind", [(503, "server"), (500, "server"), (400, "error"), (422, "error")])
def test_an_http_error_keeps_its_status(status, kind):
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "no"}}, status=status)

    sdk_error = asyncio.run(_generate_error(handler, openai.APIStatusError))
    assert model_error(sdk_error).status_code == status and _kind_recorded(sdk_error) == kind


def test_no_gateway_and_a_silent_gateway_are_server_failures():
    async def silent(request: web.Request) -> web.Response:
        await asyncio.sleep(1.0)  # past the 0.2 s read timeout
        return web.json_response(ANSWER)

    no_answer = asyncio.run(_generate_error(None, openai.APIConnectionError))
    timed_out = asyncio.run(_generate_error(silent, openai.APITimeoutError, read=0.2))
    assert (model_error(no_answer).status_code, model_error(timed_out).status_code) == (503, 504)
    assert _kind_recorded(no_answer) == _kind_recorded(timed_out) == "server"


def test_the_patch_gives_verifiers_training_client_this_transport():
    patches.use_gateway_transport()
    client = train.TrainClient(vf.TrainClientConfig(base_url="http://127.0.0.1:9/v1", api_key_var="TRANSPORT_TEST_KEY"))
    assert isinstance(client.client, GatewayTransport)
    asyncio.run(client.close())
