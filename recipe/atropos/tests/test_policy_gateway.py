"""The policy gateway (trajectory/gateway.py) in front of real inference servers, over loopback.

The backends are the repo's CPU policy server (a real process) and, where a test needs requests to
take a while, a small slow stand-in server defined here (uvicorn on its own thread). Clients are
plain HTTP requests and atroposlib's own `VLLMServer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait

import pytest
import requests
import uvicorn
from fastapi import FastAPI

from recipe.atropos.config import AtroposTrainerConfig
from recipe.atropos.trajectory.gateway import PolicyGateway
from recipe.atropos.tests.servers import (
    LOOPBACK_HOST,
    find_free_loopback_port,
    port_is_free,
    start_cpu_policy_server,
)

SEEDED_GENERATE = {"logprobs": 0, "n": 3, "max_tokens": 6, "temperature": 1.0, "seed": 1234}


@pytest.fixture(scope="module")
def policy_server(tiny_assets):
    server = start_cpu_policy_server(tiny_assets.model_dir)
    yield server
    server.stop()


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    """Threads for requests that must be in flight while the test does something else."""
    executor = ThreadPoolExecutor(max_workers=8)
    yield executor
    executor.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def running_gateway(server_urls: Sequence[str], *, opened_at: int | None = None, **options) -> Iterator[PolicyGateway]:
    """A gateway on a free loopback port; opened at `opened_at` unless that is None; always stopped."""
    gateway = PolicyGateway(server_urls, host=LOOPBACK_HOST, port=find_free_loopback_port(), **options).start()
    try:
        if opened_at is not None:
            gateway.open(opened_at)
        yield gateway
    finally:
        gateway.stop()


def root_url(gateway: PolicyGateway) -> str:
    return f"http://{gateway.host}:{gateway.port}"


def health(gateway: PolicyGateway) -> dict:
    response = requests.get(f"{root_url(gateway)}/health", timeout=10)
    assert response.status_code == 200
    return response.json()


def wait_until(condition: Callable[[], bool], timeout_s: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout_s} s")
        time.sleep(0.02)


def dead_url() -> str:
    """The URL of a loopback port nothing listens on."""
    return f"http://{LOOPBACK_HOST}:{find_free_loopback_port()}"


class SlowBackend:
    """A stand-in inference server whose `/v1/completions` answers after `delay_s`, counting requests."""

    def __init__(self, delay_s: float = 1.5):
        self.delay_s = delay_s
        self.received = 0  # requests that reached the handler
        self.answered = 0  # requests whose answer the handler has returned
        self.port = find_free_loopback_port()
        self.url = f"http://{LOOPBACK_HOST}:{self.port}"
        app = FastAPI()

        @app.post("/v1/completions")
        async def completions(body: dict) -> dict:
            self.received += 1
            await asyncio.sleep(self.delay_s)
            self.answered += 1
            return {"object": "text_completion", "backend": self.port, "prompt": body.get("prompt"),
                    "choices": [{"index": 0, "text": " slow", "finish_reason": "length", "logprobs": None}]}

        config = uvicorn.Config(app, host=LOOPBACK_HOST, port=self.port, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name=f"slow-backend-{self.port}", daemon=True)

    def start(self) -> SlowBackend:
        self._thread.start()
        wait_until(lambda: self._server.started or not self._thread.is_alive(), 20, "slow backend start")
        if not self._server.started:
            raise RuntimeError(f"the slow backend on port {self.port} did not start")
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=15)


@contextlib.contextmanager
def slow_backends(count: int, delay_s: float = 1.5) -> Iterator[list[SlowBackend]]:
    backends: list[SlowBackend] = []
    try:
        for _ in range(count):
            backends.append(SlowBackend(delay_s).start())
        yield backends
    finally:
        for backend in backends:
            backend.stop()


def post_completion(url: str, prompt: str = "hi", timeout_s: float = 60) -> requests.Response:
    return requests.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 2},
                         timeout=timeout_s)


# 1. /generate is translated faithfully ------------------------------------------------------------


@pytest.mark.timeout(180)
@pytest.mark.parametrize("prompt", [{"prompt_token_ids": [5, 6, 7]}, "12 + 7 ="], ids=["token_ids", "text"])
def test_generate_through_the_gateway_equals_the_servers_own(policy_server, prompt):
    body = {"prompt": prompt, **SEEDED_GENERATE}
    direct = requests.post(f"{policy_server.url}/generate", json=body, timeout=60)
    with running_gateway([policy_server.url], opened_at=1) as gateway:
        via_gateway = requests.post(f"{root_url(gateway)}/generate", json=body, timeout=60)
    assert direct.status_code == via_gateway.status_code == 200, via_gateway.text
    expected, got = direct.json(), via_gateway.json()

    assert got["prompt_token_ids"] == expected["prompt_token_ids"]
    assert got["token_ids"] == expected["token_ids"]
    assert got["finish_reasons"] == expected["finish_reasons"]
    assert got["text"] == expected["text"]
    assert len(got["token_ids"]) == 3 and all(len(ids) >= 1 for ids in got["token_ids"])
    assert len(got["logprobs"]) == len(expected["logprobs"]) == 3
    for got_tokens, expected_tokens in zip(got["logprobs"], expected["logprobs"]):
        assert len(got_tokens) == len(expected_tokens)
        for (got_entry,), (expected_entry,) in zip(got_tokens, expected_tokens):
            assert got_entry.keys() == expected_entry.keys()
            (token,) = expected_entry
            assert got_entry[token] == pytest.approx(expected_entry[token], abs=1e-5)


@pytest.mark.timeout(180)
def test_sglang_dialect_through_the_gateway_samples_what_the_vllm_dialect_does(policy_server):
    """atroposlib's `server_type: sglang` request, translated by the gateway, gives the same seeded
    completions as the vLLM dialect on the server itself, in SGLang's answer shape."""
    sglang = {"input_ids": [5, 6, 7], "return_logprob": True,
              "sampling_params": {"n": 3, "max_new_tokens": 6, "temperature": 1.0, "sampling_seed": 1234}}
    vllm = requests.post(f"{policy_server.url}/generate", json={"prompt": {"prompt_token_ids": [5, 6, 7]}, **SEEDED_GENERATE},
                         timeout=60).json()
    direct = requests.post(f"{policy_server.url}/generate", json=sglang, timeout=60)
    with running_gateway([policy_server.url], opened_at=1) as gateway:
        via_gateway = requests.post(f"{root_url(gateway)}/generate", json=sglang, timeout=60)
    assert direct.status_code == via_gateway.status_code == 200, via_gateway.text
    for answer in (direct.json(), via_gateway.json()):
        assert isinstance(answer, list) and len(answer) == 3
        assert [[item[1] for item in a["meta_info"]["output_token_logprobs"]] for a in answer] == vllm["token_ids"]
        for a, expected in zip(answer, vllm["logprobs"]):
            got_lps = [item[0] for item in a["meta_info"]["output_token_logprobs"]]
            assert got_lps == pytest.approx([next(iter(e[0].values())) for e in expected], abs=1e-5)
        assert [a["meta_info"]["finish_reason"]["type"] for a in answer] == vllm["finish_reasons"]
        assert [a["text"] for a in answer] == vllm["text"]


# 2. OpenAI routes pass through ---------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_models_and_completions_pass_through(policy_server):
    completion = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 4, "n": 2, "seed": 7, "logprobs": 1,
                  "return_token_ids": True}
    bad_request = {"model": "tiny", "prompt": "hi", "max_tokens": 0}  # max_tokens 0 without echo: 400

    with running_gateway([policy_server.url], opened_at=1) as gateway:
        for method, path, body in [("GET", "/v1/models", None), ("POST", "/v1/completions", completion),
                                   ("POST", "/v1/completions", bad_request)]:
            direct = requests.request(method, f"{policy_server.url}{path}", json=body, timeout=60)
            via_gateway = requests.request(method, f"{root_url(gateway)}{path}", json=body, timeout=60)
            assert via_gateway.status_code == direct.status_code, (path, via_gateway.text)
            assert via_gateway.headers["content-type"] == direct.headers["content-type"] == "application/json"
            expected, got = direct.json(), via_gateway.json()
            if path == "/v1/completions" and direct.status_code == 200:
                for per_answer in ("id", "created"):  # a fresh id and time for every answer
                    expected.pop(per_answer), got.pop(per_answer)
            assert got == expected

    assert direct.status_code == 400  # the last one: an error answer passes through as it is


@pytest.mark.timeout(180)
def test_the_model_an_environment_names_becomes_the_one_the_server_serves(policy_server):
    """vLLM refuses a `model` it does not serve; environments name it as they like."""
    with running_gateway([policy_server.url], opened_at=1) as gateway:
        answer = requests.post(f"{gateway.base_url}/completions", timeout=60,
                               json={"model": "what-the-env-calls-it", "prompt": [5, 6], "max_tokens": 2})
        chat = requests.post(f"{gateway.base_url}/chat/completions", timeout=60,
                             json={"model": "what-the-env-calls-it", "messages": [{"role": "user", "content": "hi"}]})
    assert answer.status_code == 200 and answer.json()["model"] == "tiny"
    assert chat.status_code == 200 and chat.json()["model"] == "tiny"


# 3. The gate holds requests until it opens -----------------------------------------------------


@pytest.mark.timeout(120)
def test_a_closed_gate_holds_requests_until_opened(policy_server, pool):
    with running_gateway([policy_server.url]) as gateway:  # never opened
        assert health(gateway)["gate"] == "closed"
        pending = pool.submit(post_completion, root_url(gateway))
        wait([pending], timeout=1.5)
        assert not pending.done(), "a request went through a gate that was never opened"
        state = health(gateway)
        assert state["gate"] == "closed" and state["held"] == 1 and state["in_flight"] == 0
        assert state["global_steps"] is None and state["servers"] == [policy_server.url]

        gateway.open(3)
        answer = pending.result(timeout=60)
        assert answer.status_code == 200, answer.text
        assert len(answer.json()["choices"]) == 1
        state = health(gateway)
        assert state["gate"] == "open" and state["global_steps"] == 3 and state["held"] == 0


# 4. Held too long: 503 ----------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"model": "tiny", "prompt": "hi"}),
    ("/generate", {"prompt": {"prompt_token_ids": [5, 6]}, "max_tokens": 2}),
])
def test_a_request_held_past_the_hold_timeout_gets_503(path, body):
    # The server behind is down: had the request reached it, the answer would be 502.
    with running_gateway([dead_url()], hold_timeout_s=0.5) as gateway:
        start = time.monotonic()
        answer = requests.post(f"{root_url(gateway)}{path}", json=body, timeout=30)
        waited = time.monotonic() - start
        assert answer.status_code == 503
        assert "policy_hold_timeout_s" in answer.json()["detail"]
        assert int(answer.headers["Retry-After"]) > 0
        # Held for hold_timeout_s (0.5 s, a lower bound by construction), not refused at once; the upper
        # bound only catches a hold that never ends (the client's 30 s), far above any scheduling delay.
        assert 0.4 <= waited < 20
        assert health(gateway)["held"] == 0


# 5. Drain -----------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_close_and_drain_waits_for_requests_in_flight_and_holds_new_ones(pool):
    with slow_backends(1, delay_s=1.5) as (backend,), running_gateway([backend.url], opened_at=1) as gateway:
        in_flight = pool.submit(post_completion, root_url(gateway), "first")
        wait_until(lambda: backend.received == 1, what="the first request reaching the server")
        assert backend.answered == 0 and health(gateway)["in_flight"] == 1

        gateway.close_and_drain()
        # It returned only once the server had answered the request in flight.
        assert backend.answered == 1
        first = in_flight.result(timeout=30)
        assert first.status_code == 200 and first.json()["prompt"] == "first"
        state = health(gateway)
        assert state["gate"] == "closed" and state["in_flight"] == 0

        # A request sent after the close is held: it does not reach the server until open().
        after_close = pool.submit(post_completion, root_url(gateway), "second")
        wait_until(lambda: health(gateway)["held"] == 1, what="the second request being held")
        wait([after_close], timeout=1.0)
        assert not after_close.done() and backend.received == 1

        gateway.open(2)
        second = after_close.result(timeout=30)
        assert second.status_code == 200 and second.json()["prompt"] == "second"
        assert backend.received == backend.answered == 2
        assert health(gateway)["global_steps"] == 2


@pytest.mark.timeout(60)
def test_close_and_drain_gives_up_after_the_drain_timeout(pool, caplog):
    with slow_backends(1, delay_s=3.0) as (backend,), \
            running_gateway([backend.url], opened_at=1, drain_timeout_s=0.3) as gateway:
        in_flight = pool.submit(post_completion, root_url(gateway))
        wait_until(lambda: backend.received == 1, what="the request reaching the server")
        with caplog.at_level(logging.WARNING, logger="verl.recipe.atropos"):
            gateway.close_and_drain()
        assert backend.answered == 0  # returned before the answer, and said so
        assert "1 request(s) still running" in caplog.text and "policy_drain_timeout_s" in caplog.text
        assert in_flight.result(timeout=30).status_code == 200  # the request itself still completes


# 6. Load spreading --------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_concurrent_requests_spread_over_the_servers(pool):
    with slow_backends(2, delay_s=1.5) as backends, running_gateway([b.url for b in backends], opened_at=1) as gateway:
        futures: list[Future] = [pool.submit(post_completion, root_url(gateway), f"p{i}") for i in range(4)]
        answers = [f.result(timeout=30) for f in futures]
        assert [a.status_code for a in answers] == [200] * 4
        assert sorted(a.json()["prompt"] for a in answers) == ["p0", "p1", "p2", "p3"]
        assert [b.received for b in backends] == [2, 2]
        assert sorted(a.json()["backend"] for a in answers) == sorted([b.port for b in backends] * 2)


# 7. A server that is down -----------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method,path,body", [
    ("POST", "/v1/completions", {"model": "tiny", "prompt": "hi"}),
    ("GET", "/v1/models", None),
    ("POST", "/generate", {"prompt": {"prompt_token_ids": [5, 6]}, "max_tokens": 2}),
])
def test_a_server_that_is_down_gives_502(method, path, body):
    with running_gateway([dead_url()], opened_at=1) as gateway:
        answer = requests.request(method, f"{root_url(gateway)}{path}", json=body, timeout=30)
        assert answer.status_code == 502
        assert answer.headers["content-type"] == "application/json"
        assert "unreachable" in answer.json()["detail"]
        assert health(gateway)["in_flight"] == 0


# 8. atroposlib's client ---------------------------------------------------------------------------


@pytest.mark.timeout(180)
@pytest.mark.parametrize("server_type", ["vllm", "sglang"])
def test_atroposlib_servers_generate_through_the_gateway(policy_server, tiny_assets, server_type):
    from atroposlib.envs.server_handling.server_baseline import APIServerConfig
    from atroposlib.envs.server_handling.sglang_server import SGLangServer
    from atroposlib.envs.server_handling.vllm_server import VLLMServer

    with running_gateway([policy_server.url], opened_at=1) as gateway:
        config = APIServerConfig(model_name="tiny", tokenizer_name=str(tiny_assets.model_dir),
                                 base_url=gateway.base_url, api_key="x", server_type=server_type, timeout=60)
        server = {"vllm": VLLMServer, "sglang": SGLangServer}[server_type](config)
        prompt, outputs, logprobs, reasons = asyncio.run(
            server._tokens_and_logprobs_completion_wrapper(model="tiny", input_ids=[5, 6, 7], n=2, max_tokens=4)
        )
    assert prompt == [5, 6, 7] and len(outputs) == len(logprobs) == len(reasons) == 2
    assert all(1 <= len(o) == len(lp) <= 4 for o, lp in zip(outputs, logprobs))
    assert all(value <= 0 for lp in logprobs for value in lp)
    # SGLang's finish reason is {"type": ...}, which atroposlib's ManagedServer unwraps.
    assert all((r["type"] if isinstance(r, dict) else r) in ("stop", "length") for r in reasons)


# 9. Start and stop --------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_stop_frees_the_port_and_a_busy_port_fails_at_start():
    gateway = PolicyGateway([dead_url()], host=LOOPBACK_HOST, port=find_free_loopback_port()).start()
    try:
        port = gateway.port
        assert gateway.base_url == f"http://{LOOPBACK_HOST}:{port}/v1"
        assert health(gateway)["status"] == "ok"
        with pytest.raises(OSError):
            PolicyGateway([dead_url()], host=LOOPBACK_HOST, port=port).start()
        assert health(gateway)["status"] == "ok"  # the running one is unaffected
    finally:
        gateway.stop()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://{LOOPBACK_HOST}:{port}/health", timeout=5)
    assert port_is_free(port)


@pytest.mark.timeout(60)
def test_stop_does_not_hang_on_held_requests(pool):
    gateway = PolicyGateway([dead_url()], host=LOOPBACK_HOST, port=find_free_loopback_port()).start()
    try:
        held = pool.submit(post_completion, root_url(gateway), "held", 30)
        wait_until(lambda: health(gateway)["held"] == 1, what="the request being held")
    finally:
        start = time.monotonic()
        gateway.stop()
    # A stop that waited for the held request would take its 30 s; 15 s is far above any scheduling delay.
    assert time.monotonic() - start < 15
    # The held request is turned away with a JSON 503 when the gateway stops, its client not left waiting.
    answer = held.result(timeout=20)
    assert answer.status_code == 503 and "shutting down" in answer.json()["detail"]
    assert port_is_free(gateway.port)


# 10. Held requests whose clients have gone; a bound on held requests ------------------------------


def raw_post(gateway: PolicyGateway, path: str, body: dict) -> socket.socket:
    """A connection that has sent one complete POST and never reads its answer (a client that will leave)."""
    data = json.dumps(body).encode()
    sock = socket.create_connection((gateway.host, gateway.port), timeout=10)
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: {gateway.host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data
    )
    return sock


@pytest.mark.timeout(120)
@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"model": "tiny", "prompt": "gone", "max_tokens": 2}),
    ("/generate", {"prompt": {"prompt_token_ids": [5, 6]}, "max_tokens": 2}),
])
def test_held_requests_whose_clients_disconnect_are_dropped_not_forwarded(pool, path, body):
    clients = 300
    with slow_backends(1, delay_s=0.2) as (backend,), running_gateway([backend.url]) as gateway:  # closed
        sockets = [raw_post(gateway, path, body) for _ in range(clients)]
        wait_until(lambda: health(gateway)["held"] == clients, what=f"{clients} requests held")
        for sock in sockets:  # every client gives up while the weights are being replaced
            sock.close()
        wait_until(lambda: health(gateway)["held"] == 0, what="the abandoned requests leaving the gate")
        assert health(gateway)["requests_abandoned"] == clients

        staying = pool.submit(post_completion, root_url(gateway), "stays")
        wait_until(lambda: health(gateway)["held"] == 1, what="the staying request being held")
        gateway.open(1)
        answer = staying.result(timeout=30)
        assert answer.status_code == 200 and answer.json()["prompt"] == "stays"
        time.sleep(0.5)  # room for anything wrongly let through to reach the server
        assert backend.received == 1, f"{backend.received - 1} abandoned request(s) were forwarded after the gate opened"
        state = health(gateway)
        assert state["requests_abandoned"] == clients and state["held"] == 0 and state["in_flight"] == 0


@pytest.mark.timeout(120)
def test_requests_beyond_the_held_bound_get_503_with_retry_after(pool):
    with slow_backends(1, delay_s=0.2) as (backend,), running_gateway([backend.url], max_held=3) as gateway:
        held = [pool.submit(post_completion, root_url(gateway), f"held{i}") for i in range(3)]
        wait_until(lambda: health(gateway)["held"] == 3, what="3 requests held")

        refused = post_completion(root_url(gateway), "one too many", timeout_s=10)
        assert refused.status_code == 503
        assert int(refused.headers["Retry-After"]) > 0
        assert "policy_max_held_requests=3" in refused.json()["detail"]
        state = health(gateway)
        assert state["requests_refused_full"] == 1 and state["held"] == 3 and state["max_held"] == 3
        assert backend.received == 0

        gateway.open(1)  # the held ones go through; the bound counts held requests only
        assert sorted(f.result(timeout=30).json()["prompt"] for f in held) == ["held0", "held1", "held2"]
        assert post_completion(root_url(gateway), "open").status_code == 200
        assert backend.received == 4


# 11. The bearer key --------------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_a_gateway_with_a_key_refuses_requests_without_it(policy_server, tiny_assets):
    from atroposlib.envs.server_handling.server_baseline import APIServerConfig
    from atroposlib.envs.server_handling.vllm_server import VLLMServer

    key = "k3y-for-the-policy"
    completion = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 2}
    with running_gateway([policy_server.url], opened_at=1, api_key=key) as gateway:
        url = f"{root_url(gateway)}/v1/completions"
        for headers, reason in [({}, "missing"), ({"Authorization": "Bearer wrong"}, "wrong"),
                                ({"Authorization": f"Basic {key}"}, "not a Bearer key")]:
            answer = requests.post(url, json=completion, headers=headers, timeout=30)
            assert answer.status_code == 401, (headers, answer.text)
            assert answer.headers["WWW-Authenticate"] == "Bearer"
            assert reason in answer.json()["detail"] and "policy_api_key" in answer.json()["detail"]
            assert key not in answer.text
        for scheme in ("Bearer", "bearer", "BEARER"):  # the scheme is case-insensitive (RFC 7235)
            answer = requests.post(url, json=completion, headers={"Authorization": f"{scheme} {key}"}, timeout=60)
            assert answer.status_code == 200, (scheme, answer.text)
        generate = requests.post(f"{root_url(gateway)}/generate", json={"prompt": {"prompt_token_ids": [5]}}, timeout=30)
        assert generate.status_code == 401
        # atroposlib's own client sends its api_key as the bearer key.
        config = APIServerConfig(model_name="tiny", tokenizer_name=str(tiny_assets.model_dir), base_url=gateway.base_url,
                                 api_key=key, server_type="vllm", timeout=60)
        prompt, outputs, _, _ = asyncio.run(
            VLLMServer(config)._tokens_and_logprobs_completion_wrapper(model="tiny", input_ids=[5, 6, 7], n=1, max_tokens=2)
        )
        assert prompt == [5, 6, 7] and len(outputs) == 1
        state = health(gateway)  # /health needs no key
        assert state["status"] == "ok" and state["requests_unauthorized"] == 4


@pytest.mark.timeout(60)
@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_a_gateway_beyond_loopback_needs_a_key(host, monkeypatch):
    with pytest.raises(ValueError, match=r"trainer\.atropos\.policy_api_key") as refused:
        PolicyGateway([dead_url()], host=host, port=find_free_loopback_port())
    assert "ATROPOS_POLICY_API_KEY" in str(refused.value) and host in str(refused.value)

    # The trainer's settings refuse it before anything starts, and take the key from the environment.
    settings = {"mode": "trajectory", "policy_gateway_host": host}
    monkeypatch.delenv("ATROPOS_POLICY_API_KEY", raising=False)
    with pytest.raises(ValueError, match=r"trainer\.atropos\.policy_api_key"):
        AtroposTrainerConfig.from_config(settings)
    monkeypatch.setenv("ATROPOS_POLICY_API_KEY", "from-the-environment")
    assert AtroposTrainerConfig.from_config(settings).policy_api_key == "from-the-environment"

    # With a key it listens there (this test runs in a loopback-only namespace) and guards it.
    gateway = PolicyGateway([dead_url()], host=host, port=find_free_loopback_port(), api_key="k").start()
    try:
        local = f"http://{'127.0.0.1' if host == '0.0.0.0' else '[::1]'}:{gateway.port}"
        assert requests.get(f"{local}/health", timeout=10).status_code == 200
        assert requests.get(f"{local}/v1/models", timeout=10).status_code == 401
    finally:
        gateway.stop()


class ClosingBackend:
    """A raw HTTP server on its own thread: it closes the first `closes` connections a completion
    request arrives on without answering (as a server closing a kept-alive connection under a
    request just sent), then answers 200; `/v1/models` is always answered."""

    def __init__(self, closes: int):
        self.closes = closes
        self.completion_connections = 0
        self.sock = socket.create_server((LOOPBACK_HOST, 0))
        self.url = f"http://{LOOPBACK_HOST}:{self.sock.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                request = conn.recv(65536)
                if b"/v1/models" in request.split(b"\r\n", 1)[0]:
                    body = b'{"data": [{"id": "served"}]}'
                else:
                    self.completion_connections += 1
                    if self.completion_connections <= self.closes:
                        continue  # closed without an answer
                    body = b'{"choices": [{"index": 0, "text": " ok", "finish_reason": "length"}]}'
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                             b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)

    def __enter__(self) -> ClosingBackend:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.sock.close()


@pytest.mark.parametrize(("closes", "status"), [(1, 200), (2, 502)])
def test_a_request_whose_connection_the_server_closed_goes_once_more(closes, status):
    with ClosingBackend(closes) as backend, running_gateway([backend.url], opened_at=0) as gateway:
        answer = requests.post(f"{root_url(gateway)}/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=30)
        assert answer.status_code == status, answer.text
        assert health(gateway)["requests_resent"] == 1 and backend.completion_connections == 2
        if status == 502:
            assert "ServerDisconnectedError" in answer.json()["detail"]
