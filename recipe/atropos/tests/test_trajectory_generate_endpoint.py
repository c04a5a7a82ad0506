"""The CPU policy server's `/generate`, as atroposlib's `server_type: vllm` (VLLMServer) calls it."""

from __future__ import annotations

import asyncio

import pytest
import requests

from recipe.atropos.tests.servers import start_cpu_policy_server


@pytest.fixture(scope="module")
def policy_server(tiny_assets):
    server = start_cpu_policy_server(tiny_assets.model_dir)
    yield server
    server.stop()


@pytest.mark.timeout(120)
def test_generate_returns_tokens_logprobs_and_finish_reasons(policy_server):
    body = {"prompt": {"prompt_token_ids": [5, 6, 7]}, "logprobs": 0, "n": 3, "max_tokens": 5, "temperature": 1.0}
    answer = requests.post(f"{policy_server.url}/generate", json=body, timeout=60).json()
    assert answer["prompt_token_ids"] == [5, 6, 7]
    assert len(answer["logprobs"]) == len(answer["finish_reasons"]) == len(answer["token_ids"]) == 3
    for ids, per_token, reason in zip(answer["token_ids"], answer["logprobs"], answer["finish_reasons"]):
        assert 1 <= len(ids) <= 5 and reason in ("stop", "length")
        assert [int(next(iter(entry[0]))) for entry in per_token] == ids
        assert all(next(iter(entry[0].values())) <= 0 for entry in per_token)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("body", "named"),
    [({"prompt": {"ids": [1]}}, "prompt_token_ids"), ({"sampling_params": {"n": 2}}, "input_ids or text")],
    ids=["vllm", "sglang"],
)
def test_generate_rejects_a_prompt_in_neither_form(policy_server, body, named):
    response = requests.post(f"{policy_server.url}/generate", json=body, timeout=30)
    assert response.status_code == 400 and named in response.json()["detail"]


@pytest.mark.timeout(120)
def test_atroposlib_vllm_server_reads_the_answer(policy_server, tiny_assets):
    from atroposlib.envs.server_handling.server_baseline import APIServerConfig
    from atroposlib.envs.server_handling.vllm_server import VLLMServer

    config = APIServerConfig(model_name="tiny", tokenizer_name=str(tiny_assets.model_dir),
                             base_url=f"{policy_server.url}/v1", api_key="x", server_type="vllm", timeout=60)
    server = VLLMServer(config)
    prompt, outputs, logprobs, reasons = asyncio.run(
        server._tokens_and_logprobs_completion_wrapper(model="tiny", input_ids=[5, 6, 7], n=2, max_tokens=4)
    )
    assert prompt == [5, 6, 7] and len(outputs) == len(logprobs) == len(reasons) == 2
    assert all(len(o) == len(lp) >= 1 for o, lp in zip(outputs, logprobs))
