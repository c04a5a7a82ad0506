"""Trajectory mode with fallback on: a malformed sequence or group from run-api costs its rows, not the step.

Real components: atroposlib's run-api (a process) holds what an environment pushed, the client
pulls it, the conversion drops what cannot be trained (counted per reason) and the GRPO computer
trains the rest. A hypothesis test then throws arbitrary group contents at the conversion.
"""

from __future__ import annotations

import numpy as np
import pytest
import requests
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recipe.atropos.trajectory.runapi_client import AtroposRunAPIClient
from recipe.atropos.grpo_computer import AdvantageOverrides, AtroposGRPOComputer
from recipe.atropos.trajectory.metrics import trajectory_metrics
from recipe.atropos.trajectory.scored_data import (
    DROP_REASONS,
    TrajectoryFormatError,
    TrajectoryLimits,
    scored_groups_to_batch,
)
from recipe.atropos.tests.servers import start_atropos_run_api

M = -100
LIMITS = TrajectoryLimits(max_prompt_length=4, max_response_length=6, pad_token_id=0)


@pytest.mark.timeout(120)
def test_malformed_groups_from_run_api_are_dropped_and_counted():
    good = {"tokens": [[1, 2, 3], [1, 2, 4, 5]], "masks": [[M, 2, 3], [M, 2, 4, 5]], "scores": [1.0, 0.0],
            "advantages": [[0.0, 0.5, 0.5], [0.0, -0.5, -0.5, -0.5]]}
    groups = [
        good,
        # sequence 1: tokens and masks of different lengths
        {"tokens": [[1, 2, 3], [1, 2, 4]], "masks": [[M, 2, 3], [M, 2]], "scores": [1.0, 0.0]},
        # sequence 0: advantages of the wrong length (GRPO instead); sequence 1: a negative token id
        {"tokens": [[1, 2, 3], [1, -7, 4]], "masks": [[M, 2, 3], [M, 2, 4]], "scores": [1.0, 0.0],
         "advantages": [[0.5], [0.0, 0.1, 0.1]]},
        # three scores for two sequences: the group cannot be trusted
        {"tokens": [[1, 2, 3], [1, 2, 4]], "masks": [[M, 2, 3], [M, 2, 4]], "scores": [1.0, 0.0, 1.0]},
    ]
    with start_atropos_run_api() as run_api:
        client = AtroposRunAPIClient(run_api.url, retry_delay=0.01, timeout=5.0, max_wait_time=10.0)
        client.register_trainer(batch_size=8, max_token_len=16, num_steps=2)
        client.get_batch()
        for group in groups:
            requests.post(f"{run_api.url}/scored_data", json=group, timeout=5).raise_for_status()
        pulled = client.get_batch()
    assert pulled is not None and sum(len(g["tokens"]) for g in pulled) == 8
    with pytest.raises(TrajectoryFormatError):  # fallback off: the run stops, naming the group
        scored_groups_to_batch(pulled, LIMITS)

    batch = scored_groups_to_batch(pulled, LIMITS, drop_malformed=True)
    assert batch.batch_size == 8  # every row is still there: verl's batch keeps its size
    assert batch.dropped == {"sequence": 2, "advantages": 1, "group": 2}
    metrics = batch.dropped_metrics()
    assert metrics["atropos/trajectory/dropped/group"] == 2.0 and metrics["atropos/trajectory/dropped/score"] == 0.0
    dropped_rows = [3, 5, 6, 7]
    assert batch.response_mask_BT[dropped_rows].sum() == 0 and batch.response_mask_BT[[0, 1, 2, 4]].sum(-1).tolist() == [2, 3, 2, 2]
    assert len(set(batch.uid_B[dropped_rows])) == 4 and batch.uid_B[2] not in set(batch.uid_B[dropped_rows])
    assert batch.advantage_override_mask_B.tolist() == [True, True, False, False, False, False, False, False]

    rewards = batch.rm_scores_BT
    overrides = AdvantageOverrides(batch.token_level_advantages_BT, batch.advantage_override_mask_B)
    out = AtroposGRPOComputer().compute_from_overrides(rewards, batch.response_mask_BT, batch.uid_B, overrides)
    assert torch.isfinite(out.advantages_BT).all() and not out.advantages_BT[dropped_rows].any()
    assert out.advantages_BT[0, :2].tolist() == [0.5, 0.5]
    # Group 2 lost sequence 1: sequence 0 is GRPO in a group of one (its raw score, 1.0).
    assert out.advantages_BT[2, :2].tolist() == pytest.approx([1.0, 1.0], rel=1e-5)
    assert trajectory_metrics(pulled)["atropos/batch_samples"] == 9.0  # what was sent, scores included


numbers = st.one_of(st.integers(-200, 300), st.floats(allow_nan=True, allow_infinity=True), st.just(1e300))
anything = st.recursive(
    st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=3)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=3), inner, max_size=3)),
    max_leaves=10,
)


@st.composite
def groups(draw):
    n = draw(st.integers(1, 3))
    lists = st.lists(st.one_of(st.just(M), st.integers(-5, 50)), min_size=1, max_size=12)
    tokens = draw(st.lists(lists, min_size=n, max_size=n))
    group = {
        "tokens": tokens,
        "masks": draw(st.one_of(st.just([[M] + t[1:] for t in tokens]), st.lists(st.one_of(lists, anything), max_size=4))),
        "scores": draw(st.lists(numbers, min_size=n, max_size=n) | st.lists(anything, max_size=4) | anything),
    }
    for key in ("advantages", "inference_logprobs", "overrides"):
        if draw(st.booleans()):
            group[key] = draw(st.lists(st.one_of(st.lists(numbers, max_size=12), anything), min_size=0, max_size=4))
    return group


@settings(max_examples=400, deadline=None)
@given(st.lists(groups(), min_size=1, max_size=4))
def test_any_group_content_costs_its_rows_not_the_batch(pulled):
    try:
        batch = scored_groups_to_batch(pulled, LIMITS, drop_malformed=True)
    except TrajectoryFormatError as exc:  # only when nothing at all can be trained
        assert "no sequence of the batch can be trained" in str(exc)
        return
    assert batch.batch_size == sum(len(g["tokens"]) for g in pulled)
    assert set(batch.dropped) <= set(DROP_REASONS)
    if batch.token_level_advantages_BT is not None:
        assert torch.isfinite(batch.token_level_advantages_BT[batch.response_mask_BT.bool()]).all()
    assert torch.isfinite(batch.rm_scores_BT).all()
    rewards = batch.rm_scores_BT
    overrides = None
    if batch.token_level_advantages_BT is not None:
        overrides = AdvantageOverrides(batch.token_level_advantages_BT, batch.advantage_override_mask_B)
    out = AtroposGRPOComputer().compute_from_overrides(rewards, batch.response_mask_BT, batch.uid_B, overrides)
    assert torch.isfinite(out.advantages_BT).all()
    metrics = trajectory_metrics(pulled)
    assert all(isinstance(v, float) for v in metrics.values())
    assert np.isfinite([v for k, v in metrics.items() if k != "atropos/mean_score"]).all()
