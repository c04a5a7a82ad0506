"""Trajectory mode with fallback on: a token id outside the tokenizer's vocabulary costs its sample, and a
GET /batch answer of the wrong size costs that answer; both counted, neither stops the run.

Real components: atroposlib's run-api (a process), the run-api client, the conversion and the
rollout manager the trainer uses. Run under the loopback-only wrapper.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import requests
import torch
from omegaconf import OmegaConf

from recipe.atropos.trajectory.runapi_client import AtroposRunAPIClient
from recipe.atropos.tests.servers import start_atropos_run_api
from recipe.atropos.trajectory.scored_data import TrajectoryFormatError, TrajectoryLimits, scored_groups_to_batch
from recipe.atropos.trajectory.rollout import TrajectoryBatchTimeout, TrajectoryRolloutManager

M = -100
VOCAB = 64
LIMITS = TrajectoryLimits(max_prompt_length=4, max_response_length=6, pad_token_id=0, vocab_size=VOCAB)


def client_of(url: str, cls=AtroposRunAPIClient) -> AtroposRunAPIClient:
    return cls(url, retry_delay=0.01, timeout=5.0, max_wait_time=10.0)


def push(url: str, *groups: dict) -> None:
    for group in groups:
        requests.post(f"{url}/scored_data", json=group, timeout=5).raise_for_status()


def pair(first: int = 1, scores=(1.0, 0.0)) -> dict:
    return {"tokens": [[first, 2, 3], [first, 2, 4]], "masks": [[M, 2, 3], [M, 2, 4]], "scores": list(scores)}


@pytest.mark.timeout(120)
def test_token_ids_outside_the_vocabulary_cost_their_sample():
    groups = [
        pair(),
        # sequence 0: an id the model has no embedding for; sequence 1: the vocabulary's last id
        {"tokens": [[1, 2, 10_000], [1, 2, VOCAB - 1]], "masks": [[M, 2, 3], [M, 2, 4]], "scores": [1.0, 0.0]},
        # sequence 1: a negative id (not a token list at all: "sequence")
        {"tokens": [[1, 2, 3], [1, -7, 4]], "masks": [[M, 2, 3], [M, 2, 4]], "scores": [1.0, 0.0]},
    ]
    with start_atropos_run_api() as run_api:
        client = client_of(run_api.url)
        client.register_trainer(batch_size=6, max_token_len=16, num_steps=2)
        client.get_batch()
        push(run_api.url, *groups)
        pulled = client.get_batch()
    assert pulled is not None and sum(len(g["tokens"]) for g in pulled) == 6

    with pytest.raises(TrajectoryFormatError, match=r"token id 10000 is not in the tokenizer's vocabulary of 64"):
        scored_groups_to_batch(pulled, LIMITS)  # fallback off: the run stops, naming the sequence
    batch = scored_groups_to_batch(pulled, LIMITS, drop_malformed=True)
    assert batch.batch_size == 6 and batch.dropped == {"token_id": 1, "sequence": 1}
    assert batch.dropped_metrics()["atropos/trajectory/dropped/token_id"] == 1.0
    # Rows 2 and 5 train nothing; what the model sees stays inside its vocabulary.
    assert batch.response_mask_BT.sum(-1).tolist() == [2, 2, 0, 2, 2, 0]
    assert int(batch.input_ids_BL.max()) == VOCAB - 1 and int(batch.input_ids_BL.min()) >= 0
    # Without a vocabulary size (a caller that does not know it) the id goes through, as before.
    unchecked = TrajectoryLimits(max_prompt_length=4, max_response_length=6, pad_token_id=0)
    assert scored_groups_to_batch(pulled, unchecked, drop_malformed=True).dropped == {"sequence": 1}


def manager(client: AtroposRunAPIClient, *, fallback: bool, batch_timeout_s: float = 30.0) -> TrajectoryRolloutManager:
    config = OmegaConf.create({
        "data": {"train_batch_size": 2, "max_prompt_length": 4, "max_response_length": 6},
        "actor_rollout_ref": {"rollout": {"n": 2}},
        "trainer": {"default_local_dir": "unused", "save_freq": -1, "atropos": {"fallback_to_grpo": fallback}},
    })
    return TrajectoryRolloutManager(client, LIMITS, validation_manager=None, config=config, total_steps=3,
                                    batch_timeout_s=batch_timeout_s, poll_interval_s=0.05, progress_interval_s=60)


@pytest.mark.timeout(120)
def test_wrong_size_answers_are_dropped_and_counted_with_fallback_on(caplog):
    """run-api keeps the batch size of the first trainer that registered: one left from an earlier
    run (2 sequences) makes every answer the wrong size for this one (4)."""
    with start_atropos_run_api() as run_api:
        earlier = client_of(run_api.url)
        earlier.register_trainer(batch_size=2, max_token_len=16, num_steps=2)
        earlier.get_batch()
        push(run_api.url, pair(), pair(5))

        strict = manager(client_of(run_api.url), fallback=False)
        strict.register(starting_step=0)
        with pytest.raises(ValueError, match=r"a batch of 2 sequences in 1 groups; this step needs 4"):
            strict._pull_batch(4)

        lenient = manager(client_of(run_api.url), fallback=True, batch_timeout_s=2.0)
        with caplog.at_level(logging.WARNING, logger="verl.recipe.atropos"), pytest.raises(TrajectoryBatchTimeout) as stuck:
            lenient._pull_batch(4)
    assert lenient.dropped_batches == 1 and lenient.dropped_batch_rows == 2
    assert "dropped 1 answer(s) of another size (the last: 2 sequences in 1 groups)" in str(stuck.value)
    assert "restart run-api" in str(stuck.value)
    assert "dropped, waiting for the next" in caplog.text


class FirstAnswerTooSmall(AtroposRunAPIClient):
    """The real client, except that its first batch (the first answer that holds one) keeps one group only."""

    cut = False

    def get_batch(self):
        batch = super().get_batch()
        if batch and not self.cut:
            self.cut = True
            return batch[:1]
        return batch


@pytest.mark.timeout(180)
def test_a_step_after_a_wrong_size_answer_trains_and_reports_it():
    from verl import DataProto

    with start_atropos_run_api() as run_api:
        rollout = manager(client_of(run_api.url, FirstAnswerTooSmall), fallback=True)
        rollout.register(starting_step=0)
        push(run_api.url, pair(), pair(5), pair(6), pair(7))  # two batches of 4
        gen_batch = DataProto.from_dict(tensors={"input_ids": torch.zeros(4, 3, dtype=torch.long)},
                                        meta_info={"global_steps": 1})
        output = rollout.generate_sequences(gen_batch)
    assert len(output) == 4
    assert rollout.last_metrics["atropos/trajectory/dropped/batch"] == 2.0
    assert output.batch["response_mask"].sum().item() == 8
    assert np.asarray(output.non_tensor_batch["atropos_group_index"]).tolist() == [0, 0, 1, 1]
