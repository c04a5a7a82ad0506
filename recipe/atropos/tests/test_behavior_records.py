"""The gateway's behaviour records (trajectory/behavior.py): per completion, the weights version that
generated it and its sampled tokens' log-probs, on every route, in front of the real CPU policy
server; the client's answer stays what it asked for."""

from __future__ import annotations

import numpy as np
import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

from recipe.atropos.tests.test_policy_gateway import health, policy_server, root_url, running_gateway  # noqa: F401
from recipe.atropos.trajectory.behavior import BehaviorRecords

SAMPLING = {"max_tokens": 6, "temperature": 1.0, "n": 2, "seed": 7}


def post(gateway, path: str, body: dict) -> dict:
    answer = requests.post(f"{root_url(gateway)}{path}", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_completions_are_recorded_with_their_version_and_the_servers_log_probs(policy_server):
    with running_gateway([policy_server.url], opened_at=3) as gateway:
        plain = post(gateway, "/v1/completions", {"model": "x", "prompt": "1 + 1 =", **SAMPLING})
        # The client did not ask for token ids or log-probs: its answer has neither.
        assert all(c.get("logprobs") is None and "token_ids" not in c for c in plain["choices"])
        asked = post(gateway, "/v1/completions", {"model": "x", "prompt": "1 + 1 =", **SAMPLING, "logprobs": 0,
                                                  "return_token_ids": True})
        assert [c["text"] for c in asked["choices"]] == [c["text"] for c in plain["choices"]]  # same seed
        for choice in asked["choices"]:
            record = gateway.records.lookup(choice["token_ids"])
            assert record is not None and record.version == 3
            np.testing.assert_allclose(record.logprobs_T, choice["logprobs"]["token_logprobs"], atol=1e-5)
        gateway.close_and_drain()
        gateway.open(4)
        again = post(gateway, "/v1/completions", {"model": "x", "prompt": "2 + 2 =", **SAMPLING, "logprobs": 0,
                                                  "return_token_ids": True})
        assert {gateway.records.lookup(c["token_ids"]).version for c in again["choices"]} == {4}
        stats = health(gateway)["behavior_records"]
        assert stats["recorded"] == 6 and stats["unrecorded"] == 0 and stats["bytes"] > 0


def test_chat_and_generate_are_recorded(policy_server):
    with running_gateway([policy_server.url], opened_at=5) as gateway:
        chat = post(gateway, "/v1/chat/completions", {"model": "x", "messages": [{"role": "user", "content": "hi"}],
                                                      **SAMPLING})
        assert all(c.get("logprobs") is None and "token_ids" not in c for c in chat["choices"])
        assert "prompt_token_ids" not in chat
        chat = post(gateway, "/v1/chat/completions", {"model": "x", "messages": [{"role": "user", "content": "hi"}],
                                                      **SAMPLING, "logprobs": True, "return_token_ids": True})
        for choice in chat["choices"]:
            record = gateway.records.lookup(choice["token_ids"])
            assert record is not None and record.version == 5
            np.testing.assert_allclose(record.logprobs_T, [e["logprob"] for e in choice["logprobs"]["content"]],
                                       atol=1e-5)
        in_context = health(gateway)["behavior_records"]["in_context"]
        generated = post(gateway, "/generate", {"prompt": {"prompt_token_ids": [1, 2, 3]}, "max_tokens": 5,
                                                "temperature": 1.0, "n": 2, "seed": 3})
        # Token ids in: each completion is recorded after its prompt's ids (what the sample will hold).
        assert health(gateway)["behavior_records"]["in_context"] == in_context + 2
        for token_ids, logprobs in zip(generated["token_ids"], generated["logprobs"]):
            record, in_context = gateway.records.find(token_ids, [1, 2, 3])
            assert record is not None and record.version == 5 and in_context
            np.testing.assert_allclose(record.logprobs_T, [next(iter(e[0].values())) for e in logprobs], atol=1e-5)


def test_a_stream_is_passed_through_unrecorded(policy_server):
    with running_gateway([policy_server.url], opened_at=1) as gateway:
        answer = requests.post(f"{root_url(gateway)}/v1/completions", timeout=60, json={
            "model": "x", "prompt": "1 +", "max_tokens": 3, "stream": True})
        assert answer.status_code in (200, 400, 422)  # the server's own answer to a stream request
        assert health(gateway)["behavior_records"]["unrecorded"] == 1


@settings(max_examples=50, deadline=None)
@given(
    keep=st.integers(1, 4),
    completions=st.lists(st.tuples(st.integers(0, 9), st.lists(st.integers(0, 50), min_size=1, max_size=6)),
                         max_size=30),
)
def test_records_keep_the_newest_versions_and_find_exact_tokens(keep, completions):
    records = BehaviorRecords(keep_versions=keep)
    latest: dict[tuple, int] = {}
    for version in sorted({v for v, _ in completions}):
        records.new_version(version)
        for v, tokens in completions:
            if v == version:
                records.add(v, tokens, [-0.5] * len(tokens))
                latest[tuple(tokens)] = v
    kept = sorted({v for v, _ in completions})[-keep:]
    for tokens, version in latest.items():
        record = records.lookup(list(tokens))
        if version in kept:
            assert record is not None and record.version == version
        else:
            assert record is None or record.version in kept  # the same tokens again, in a kept version
    assert records.stats()["versions"] <= keep
    assert records.lookup([99, 98]) is None


def test_a_record_needs_one_log_prob_per_token():
    with pytest.raises(ValueError, match="2 token ids but 1 log-probs"):
        BehaviorRecords().add(0, [1, 2], [-0.1])


def test_token_in_generate_is_recorded_and_never_retokenizes(policy_server):
    """`/inference/v1/generate` (verifiers' training client, the episode runners): exact prompt ids in,
    sampled ids and one log-prob each out, recorded with the weights version that answered."""
    import asyncio

    from recipe.atropos.episodes.policy import TokenPolicyClient

    async def two_turns(url: str):
        async with TokenPolicyClient(f"{url}/v1", model="anything") as client:
            first = await client.generate([5, 6, 7], max_tokens=5, seed=1)
            # The next turn's prompt: the exact tokens so far plus the environment's (never re-tokenized).
            second_prompt = [5, 6, 7, *first.token_ids, 9, 10]
            second = await client.generate(second_prompt, max_tokens=5, seed=2)
            return first, second_prompt, second

    with running_gateway([policy_server.url], opened_at=7) as gateway:
        first, second_prompt, second = asyncio.run(two_turns(root_url(gateway)))
        raw = post(gateway, "/inference/v1/generate", {"model": "x", "token_ids": second_prompt,
                                                       "sampling_params": {"max_tokens": 5, "seed": 2, "logprobs": 1}})
        for context, completion in (([5, 6, 7], first), (second_prompt, second)):
            record, in_context = gateway.records.find(list(completion.token_ids), context)
            assert record is not None and in_context and record.version == 7
            np.testing.assert_allclose(record.logprobs_T, completion.logprobs, atol=1e-5)
        assert raw["prompt_token_ids"] == second_prompt
        choice = raw["choices"][0]
        assert choice["token_ids"] == list(second.token_ids)  # same seed, same prompt ids
        assert [e["token"] for e in choice["logprobs"]["content"]] == [f"token_id:{t}" for t in choice["token_ids"]]
        # stop_token_ids: the completion ends with the first of them.
        stop = choice["token_ids"][1] if len(choice["token_ids"]) > 1 else choice["token_ids"][0]
        cut = post(gateway, "/inference/v1/generate", {"token_ids": second_prompt, "sampling_params": {
            "max_tokens": 5, "seed": 2, "stop_token_ids": [stop]}})["choices"][0]
        assert cut["token_ids"] == choice["token_ids"][: choice["token_ids"].index(stop) + 1]
        bad = requests.post(f"{root_url(gateway)}/inference/v1/generate", json={"token_ids": []}, timeout=30)
        assert bad.status_code == 422 and "token_ids" in bad.text
