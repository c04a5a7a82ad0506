"""EnvironmentFeedback over real HTTP: overrides applied, fallback during an outage, resume, and stop."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from transformers import PreTrainedTokenizerFast

from recipe.atropos import protocol, wire
from recipe.atropos.errors import AtroposProtocolError
from recipe.atropos.config import AtroposTrainerConfig
from recipe.atropos.evaluate.feedback import EnvironmentFeedback, EnvironmentServiceError
from recipe.atropos.grpo_computer import AtroposGRPOComputer
from verl import DataProto
from verl.trainer.ppo import core_algos

from .fault_server import Fault, FaultInjectingServer

pytestmark = pytest.mark.timeout(60)
EVALUATE = protocol.EVALUATE_PATH


@pytest.fixture(scope="module")
def tokenizer(tiny_assets):
    return PreTrainedTokenizerFast.from_pretrained(tiny_assets.model_dir)


@pytest.fixture
def server():
    with FaultInjectingServer() as running:
        yield running


def make_batch(tokenizer) -> DataProto:
    """4 samples in 2 groups, prompts left-padded to 16 tokens, responses right-padded to 10."""
    prompts = ["Tom has 3 apples.", "Tom has 3 apples.", "Ana has 5 pens and gets 2 more.", "Ana has 5 pens and gets 2 more."]
    responses = ["3", "4", "7", "5 + 2 = 7"]  # the fault server scores response == ground truth
    pad = tokenizer.pad_token_id
    prompt_rows, response_rows = [], []
    for p, r in zip(prompts, responses):
        p_ids, r_ids = tokenizer(p).input_ids[-16:], tokenizer(r).input_ids[:10]
        prompt_rows.append([pad] * (16 - len(p_ids)) + p_ids)
        response_rows.append(r_ids + [pad] * (10 - len(r_ids)))
    prompts_BP, responses_BT = torch.tensor(prompt_rows), torch.tensor(response_rows)
    response_mask_BT = (responses_BT != pad).long()
    attention_mask = torch.cat([(prompts_BP != pad).long(), response_mask_BT], dim=-1)
    rewards_BT = torch.zeros(4, 10)
    rewards_BT[torch.arange(4), response_mask_BT.sum(-1) - 1] = torch.tensor([1.0, 0.0, 1.0, 1.0])
    uids = np.array(["g0", "g0", "g1", "g1"], dtype=object)
    advantages_BT, _ = core_algos.compute_grpo_outcome_advantage(rewards_BT, response_mask_BT, uids)
    return DataProto.from_dict(
        tensors={
            "prompts": prompts_BP, "responses": responses_BT, "response_mask": response_mask_BT,
            "attention_mask": attention_mask, "token_level_rewards": rewards_BT,
            "advantages": advantages_BT, "returns": advantages_BT,
        },
        non_tensors={"uid": uids, "reward_model": np.array([{"ground_truth": g} for g in ["3", "3", "7", "7"]], dtype=object)},
    )


def make_feedback(server, tokenizer, **overrides) -> EnvironmentFeedback:
    config = AtroposTrainerConfig.from_config({"api_url": server.url, "retry_attempts": 2, "retry_delay": 0.01,
                                               "max_wait_time": 2.0, "timeout": 1.0, **overrides})
    return EnvironmentFeedback(config, tokenizer, AtroposGRPOComputer(allow_fallback=config.fallback_to_grpo))


def test_service_advantages_become_the_batchs_advantages(server, tokenizer):
    feedback = make_feedback(server, tokenizer)
    assert feedback.check_health()
    batch = make_batch(tokenizer)
    feedback.submit(batch, step=1)
    metrics = feedback.apply(batch, step=1)
    sent = wire.decode(server.requests_to(EVALUATE)[0].body, wire.media_type(server.requests_to(EVALUATE)[0].headers["content-type"]))
    mask = batch.batch["response_mask"].bool()
    # What went out: decoded texts, the exact response tokens, verl's uids, the ground truths.
    assert sent["responses"] == ["3", "4", "7", "5 + 2 = 7"]
    assert sent["prompts"][2] == "Ana has 5 pens and gets 2 more."
    assert [list(ids) for ids in sent["response_token_ids"]] == [batch.batch["responses"][i][mask[i]].tolist() for i in range(4)]
    assert sent["group_ids"] == ["g0", "g0", "g1", "g1"] and sent["ground_truths"] == ["3", "3", "7", "7"]
    assert sent["metadata"] == {"step": 1}
    # What came back is what the batch now trains on: the fault server scores response == ground truth.
    scores = np.array([1.0, 0.0, 1.0, 0.0])
    for i, (a, b) in enumerate([(0, 1), (0, 1), (2, 3), (2, 3)]):
        group = scores[[a, b]]
        expected = (scores[i] - group.mean()) / (group.std() + 1e-6)
        assert torch.allclose(batch.batch["advantages"][i][mask[i]], torch.tensor(expected, dtype=torch.float32))
        assert not batch.batch["advantages"][i][~mask[i]].any()
    assert metrics["atropos/override_fraction"] == 1.0 and metrics["atropos/fallback"] == 0.0
    assert metrics["atropos/env/mean_reward"] == 0.5 and metrics["atropos/api_latency_s"] > 0
    assert metrics["atropos/fallback_steps_total"] == 0.0 and metrics["atropos/retries"] == 0.0


def test_outage_falls_back_warns_once_and_resumes(server, tokenizer, caplog):
    feedback = make_feedback(server, tokenizer)
    server.stop()
    caplog.set_level(logging.WARNING, logger="verl.recipe.atropos")
    for step in (1, 2):
        batch = make_batch(tokenizer)
        grpo = batch.batch["advantages"].clone()
        feedback.submit(batch, step=step)
        metrics = feedback.apply(batch, step=step)
        assert torch.equal(batch.batch["advantages"], grpo)  # verl's own GRPO stays
        assert metrics["atropos/fallback"] == 1.0 and metrics["atropos/fallback_steps_total"] == step
    assert sum("using standard GRPO" in r.message for r in caplog.records) == 1
    server.start()
    batch = make_batch(tokenizer)
    feedback.submit(batch, step=3)
    metrics = feedback.apply(batch, step=3)
    assert metrics["atropos/fallback"] == 0.0 and metrics["atropos/override_fraction"] == 1.0
    assert metrics["atropos/fallback_steps_total"] == 2.0
    assert any("answers again after 2 step(s)" in r.message for r in caplog.records)


def test_without_fallback_a_dead_service_stops_the_run(server, tokenizer):
    feedback = make_feedback(server, tokenizer, fallback_to_grpo=False)
    server.stop()
    with pytest.raises(EnvironmentServiceError, match=r"does not answer /health.*fallback_to_grpo=true"):
        feedback.check_health()
    batch = make_batch(tokenizer)
    feedback.submit(batch, step=5)
    with pytest.raises(EnvironmentServiceError, match=r"step 5: the environment service at .* failed: .*gave up"):
        feedback.apply(batch, step=5)


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_api_key_stops_the_run_even_with_fallback(server, tokenizer, status):
    """A wrong key is a setting to fix, not an outage: no run trains on plain GRPO because of it."""
    server.inject(EVALUATE, Fault(status=status), times=5)
    feedback = make_feedback(server, tokenizer, fallback_to_grpo=True)
    batch = make_batch(tokenizer)
    feedback.submit(batch, step=3)
    with pytest.raises(EnvironmentServiceError, match=rf"step 3: .*refused the API key \(HTTP {status}\).*trainer.atropos.api_key"):
        feedback.apply(batch, step=3)
    assert len(server.requests_to(EVALUATE)) == 1  # not retried either


def test_wrong_token_list_lengths_are_caught_before_the_update(server, tokenizer):
    bad = {"advantages": [[0.5] * 9] * 4, "scores": [0.0] * 4, "metrics": {}}
    server.inject(EVALUATE, Fault(status=200, body=bad), times=2)
    strict = make_feedback(server, tokenizer, fallback_to_grpo=False)
    batch = make_batch(tokenizer)
    strict.submit(batch, step=1)
    with pytest.raises(AtroposProtocolError, match=r"advantages\[0\]: 9 token advantages for a response of \d tokens"):
        strict.apply(batch, step=1)
    lenient = make_feedback(server, tokenizer)
    batch = make_batch(tokenizer)
    grpo = batch.batch["advantages"].clone()
    lenient.submit(batch, step=1)
    metrics = lenient.apply(batch, step=1)
    assert metrics["atropos/shape_mismatches"] == 4.0 and metrics["atropos/override_fraction"] == 0.0
    assert torch.allclose(batch.batch["advantages"], grpo)


def test_use_advantages_false_runs_grpo_on_the_service_scores(server, tokenizer):
    feedback = make_feedback(server, tokenizer, use_advantages=False)
    batch = make_batch(tokenizer)
    feedback.submit(batch, step=1)
    feedback.apply(batch, step=1)
    mask = batch.batch["response_mask"].bool()
    # scores (1, 0) in each group: unbiased std 0.707 -> +-0.707
    assert torch.allclose(batch.batch["advantages"][0][mask[0]], torch.tensor(0.5 / (0.5**0.5 + 1e-6)))
    assert torch.allclose(batch.batch["advantages"][1][mask[1]], torch.tensor(-0.5 / (0.5**0.5 + 1e-6)))


def test_unknown_config_keys_and_bad_values_are_named():
    with pytest.raises(ValueError, match=r"unknown keys \['api_ur'\]"):
        AtroposTrainerConfig.from_config({"api_ur": "x"})
    with pytest.raises(ValueError, match=r"trainer.atropos.timeout must be float, got 'slow'"):
        AtroposTrainerConfig.from_config({"timeout": "slow"})
    with pytest.raises(ValueError, match="encoding must be one of"):
        AtroposTrainerConfig.from_config({"encoding": "xml"})


def test_api_key_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("ATROPOS_API_KEY", "secret")
    assert AtroposTrainerConfig.from_config({}).api_key == "secret"
    assert AtroposTrainerConfig.from_config({"api_key": "given"}).api_key == "given"


def test_retries_of_the_steps_request_are_counted(server, tokenizer):
    server.inject(EVALUATE, Fault(status=503), times=1)
    feedback = make_feedback(server, tokenizer)
    batch = make_batch(tokenizer)
    feedback.submit(batch, step=1)
    feedback._pending.future.result()  # the request is done before the update asks, as usual
    metrics = feedback.apply(batch, step=1)
    assert metrics["atropos/retries"] == 1.0 and metrics["atropos/fallback"] == 0.0


def test_token_lists_follow_the_mask_they_were_made_for(server, tokenizer):
    """verl's rollout correction may drop response tokens after the request went out."""
    feedback = make_feedback(server, tokenizer)
    batch = make_batch(tokenizer)
    feedback.submit(batch, step=1)
    sent_mask = batch.batch["response_mask"].clone()
    batch.batch["response_mask"][0, 0] = 0  # rejected after the request
    metrics = feedback.apply(batch, step=1)
    assert metrics["atropos/shape_mismatches"] == 0.0 and metrics["atropos/override_fraction"] == 1.0
    advantages = batch.batch["advantages"]
    assert advantages[0, 0] == 0  # the dropped token trains on nothing
    assert torch.equal(advantages[1][sent_mask[1].bool()], advantages[1][sent_mask[1].bool()][0].expand(int(sent_mask[1].sum())))
    assert (advantages[0][1:][sent_mask[0, 1:].bool()] != 0).all()


def test_a_bad_score_costs_that_sample_when_advantages_come_from_scores(server, tokenizer):
    """use_advantages=false: GRPO on the service's scores; a NaN score drops that sample alone."""
    body = {"advantages": [None] * 4, "scores": [1.0, 0.0, float("nan"), 0.0], "metrics": {}}
    server.inject(EVALUATE, Fault(status=200, body=body, content_type=wire.MSGPACK))
    feedback = make_feedback(server, tokenizer, use_advantages=False)
    batch = make_batch(tokenizer)
    grpo = batch.batch["advantages"].clone()
    feedback.submit(batch, step=1)
    metrics = feedback.apply(batch, step=1)
    mask = batch.batch["response_mask"].bool()
    assert torch.allclose(batch.batch["advantages"][0][mask[0]], torch.tensor(0.5 / (0.5**0.5 + 1e-6)))
    assert torch.equal(batch.batch["advantages"][2], grpo[2])  # its own GRPO, from verl's reward
    assert batch.batch["advantages"][3][mask[3]].tolist() == [0.0] * int(mask[3].sum())  # a group of one now
    assert metrics["atropos/fallback_samples/invalid_score"] == 1.0 and metrics["atropos/fallback"] == 0.0
    assert metrics["atropos/env/mean_score"] == pytest.approx(1 / 3)

    server.inject(EVALUATE, Fault(status=200, body=body, content_type=wire.MSGPACK))
    strict = make_feedback(server, tokenizer, use_advantages=False, fallback_to_grpo=False)
    strict.submit(batch, step=2)
    with pytest.raises(AtroposProtocolError, match=r"scores\[2\]: nan is not a finite number"):
        strict.apply(batch, step=2)


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        (Fault(status=503), "unavailable"),
        (Fault(status=422), "request_rejected"),
        (Fault(status=200, body={"advantages": [0.5], "scores": [0.0], "metrics": {}}), "invalid_answer"),
        (Fault(status=200, body={"advantages": [None] * 4, "scores": [0.0] * 4}), "no_overrides"),
        (Fault(status=200, body={"advantages": ["x", None, [1e300], float("inf")], "scores": [0.0] * 4},
               content_type=wire.MSGPACK), "no_overrides"),
    ],
)
def test_every_step_fallback_is_counted_with_its_reason(server, tokenizer, fault, reason):
    server.inject(EVALUATE, fault, times=2)
    feedback = make_feedback(server, tokenizer)
    batch = make_batch(tokenizer)
    feedback.submit(batch, step=1)
    metrics = feedback.apply(batch, step=1)
    assert metrics["atropos/fallback"] == 1.0
    assert {k: v for k, v in metrics.items() if k.startswith("atropos/fallback/") and v} == {f"atropos/fallback/{reason}": 1.0}
