"""ScoredData groups from atroposlib's trajectory API -> verl batch tensors (recipe/atropos/trajectory/scored_data.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recipe.atropos.trajectory.metrics import trajectory_metrics
from recipe.atropos.trajectory.scored_data import (
    TrajectoryFormatError,
    TrajectoryLengthError,
    TrajectoryLimits,
    scored_groups_to_batch,
)

M = -100  # atroposlib's "not trained" mask value
PAD = 99
LIMITS = TrajectoryLimits(max_prompt_length=6, max_response_length=8, pad_token_id=PAD)


def seq(prompt: list[int], response: list[int], masked: set[int] = frozenset()) -> tuple[list[int], list[int]]:
    """tokens and masks of one sequence; `masked` are response positions with mask -100."""
    tokens = prompt + response
    masks = [M] * len(prompt) + [M if j in masked else tok for j, tok in enumerate(response)]
    return tokens, masks


def group(sequences, scores, **extra):
    return {"tokens": [s[0] for s in sequences], "masks": [s[1] for s in sequences], "scores": scores, **extra}


@pytest.mark.timeout(30)
def test_prompt_left_padded_response_right_padded_with_verl_position_ids():
    from verl.utils.model import compute_position_id_with_mask

    g = group([seq([1, 2, 3], [10, 11]), seq([4], [12, 13, 14, 15])], [1.0, 0.0])
    batch = scored_groups_to_batch([g], LIMITS, uid_prefix="u")

    assert batch.prompts_BP.tolist() == [[PAD, PAD, PAD, 1, 2, 3], [PAD] * 5 + [4]]
    assert batch.responses_BT.tolist() == [[10, 11] + [PAD] * 6, [12, 13, 14, 15] + [PAD] * 4]
    assert batch.input_ids_BL.tolist()[0] == [PAD, PAD, PAD, 1, 2, 3, 10, 11] + [PAD] * 6
    assert batch.attention_mask_BL.tolist()[0] == [0, 0, 0, 1, 1, 1, 1, 1] + [0] * 6
    assert batch.position_ids_BL.tolist()[0] == [0, 0, 0, 0, 1, 2, 3, 4] + [4] * 6
    assert torch.equal(batch.position_ids_BL, compute_position_id_with_mask(batch.attention_mask_BL))
    assert batch.response_mask_BT.tolist() == [[1, 1] + [0] * 6, [1, 1, 1, 1] + [0] * 4]
    assert batch.rm_scores_BT[0].tolist() == [0.0, 1.0] + [0.0] * 6  # score at the last response token
    assert batch.rm_scores_BT.sum(-1).tolist() == [1.0, 0.0]
    assert batch.uid_B.tolist() == ["u0", "u0"]
    assert batch.token_level_advantages_BT is None and batch.advantage_override_mask_B is None
    assert batch.rollout_log_probs_BT is None


@pytest.mark.timeout(30)
def test_pad_to_batch_longest_when_asked():
    limits = TrajectoryLimits(max_prompt_length=6, max_response_length=8, pad_token_id=0, pad_to_limits=False)
    batch = scored_groups_to_batch([group([seq([1, 2], [3]), seq([4], [5, 6, 7])], [0.0, 1.0])], limits)
    assert batch.prompts_BP.shape == (2, 2) and batch.responses_BT.shape == (2, 3)
    assert batch.prompts_BP.tolist() == [[1, 2], [0, 4]]


@pytest.mark.timeout(30)
def test_interior_minus_100_stretch_is_response_but_never_trained():
    # turn 1 (trained) | environment text (-100) | turn 2 (trained) | trailing env text (-100)
    tokens, masks = seq([1, 2], [10, 11, 50, 51, 52, 12, 60], masked={2, 3, 4, 6})
    batch = scored_groups_to_batch([group([(tokens, masks)], [0.5])], LIMITS)
    assert batch.responses_BT[0, :7].tolist() == [10, 11, 50, 51, 52, 12, 60]
    assert batch.response_mask_BT[0].tolist() == [1, 1, 0, 0, 0, 1, 0, 0]
    assert batch.attention_mask_BL[0, 6:].tolist() == [1] * 7 + [0]
    assert batch.rm_scores_BT[0, 6].item() == 0.5  # last response token, as verl's agent loop


@pytest.mark.timeout(30)
def test_one_uid_per_group_and_fresh_uids_per_call():
    groups = [group([seq([1], [2]), seq([1], [3])], [0.0, 1.0]), group([seq([4], [5])], [1.0], env_id=3)]
    batch = scored_groups_to_batch(groups, LIMITS)
    assert batch.uid_B[0] == batch.uid_B[1] != batch.uid_B[2]
    assert batch.group_index_B.tolist() == [0, 0, 1] and batch.sample_index_B.tolist() == [0, 1, 0]
    assert batch.env_id_B.tolist() == [None, None, 3]
    again = scored_groups_to_batch(groups, LIMITS)
    assert set(again.uid_B).isdisjoint(batch.uid_B)


@pytest.mark.timeout(30)
def test_advantages_full_length_or_response_length_become_overrides():
    full = group(
        [seq([1, 2], [10, 11, 12], masked={1}), seq([3], [13, 14])],
        [1.0, 0.0],
        advantages=[[9.0, 9.0, 0.5, 7.0, 0.7], [-0.4, -0.5]],  # first: whole sequence; second: response only
    )
    batch = scored_groups_to_batch([full], LIMITS)
    assert batch.advantage_override_mask_B.tolist() == [True, True]
    torch.testing.assert_close(batch.token_level_advantages_BT[0, :3], torch.tensor([0.5, 0.0, 0.7]))  # masked -> 0
    torch.testing.assert_close(batch.token_level_advantages_BT[1, :2], torch.tensor([-0.4, -0.5]))
    assert batch.token_level_advantages_BT[:, 3:].abs().sum() == 0


@pytest.mark.timeout(30)
def test_advantages_absent_and_mixed_groups():
    with_adv = group([seq([1], [2, 3]), seq([1], [4, 5])], [1.0, 0.0], advantages=[[0.1, 0.2], [0.3, 0.4]])
    none_adv = group([seq([1], [2]), seq([1], [3])], [1.0, 0.0], advantages=None)
    empty_adv = group([seq([1], [2]), seq([1], [3])], [1.0, 0.0], advantages=[])  # atroposlib's default
    assert scored_groups_to_batch([none_adv, empty_adv], LIMITS).token_level_advantages_BT is None
    mixed = scored_groups_to_batch([none_adv, with_adv, empty_adv], LIMITS)
    assert mixed.advantage_override_mask_B.tolist() == [False, False, True, True, False, False]
    assert mixed.token_level_advantages_BT[[0, 1, 4, 5]].abs().sum() == 0


@pytest.mark.timeout(30)
def test_set_advantage_to_zero_overrides_that_sample_only():
    g = group(
        [seq([1], [2, 3]), seq([1], [4, 5]), seq([1], [6, 7])],
        [1.0, 0.0, 1.0],
        overrides=[{}, {"set_advantage_to_zero": True}, {"set_advantage_to_zero": False}],
    )
    batch = scored_groups_to_batch([g], LIMITS)
    assert batch.advantage_override_mask_B.tolist() == [False, True, False]
    assert batch.token_level_advantages_BT.abs().sum() == 0
    assert batch.rm_scores_BT.sum(-1).tolist() == [1.0, 0.0, 1.0]  # the score is kept for the group statistics
    # also when the group carries its own advantages
    g_adv = dict(g, advantages=[[1.0, 1.0], [5.0, 5.0], [2.0, 2.0]])
    batch = scored_groups_to_batch([g_adv], LIMITS)
    assert batch.advantage_override_mask_B.tolist() == [True, True, True]
    assert batch.token_level_advantages_BT[:, :2].tolist() == [[1.0, 1.0], [0.0, 0.0], [2.0, 2.0]]


@pytest.mark.timeout(60)
def test_batch_goes_through_the_repo_grpo_estimator():
    from verl.trainer.ppo import core_algos

    g = group(
        [seq([1], [2, 3]), seq([1], [4, 5, 6]), seq([1], [7])],
        [1.0, 0.0, 0.0],
        overrides=[{}, {}, {"set_advantage_to_zero": True}],
    )
    data = scored_groups_to_batch([g, group([seq([1], [8, 9])], [1.0], advantages=[[0.25, 0.5]])], LIMITS)
    proto = data.to_data_proto()
    for key in ("prompts", "responses", "input_ids", "attention_mask", "position_ids", "response_mask", "rm_scores"):
        assert key in proto.batch.keys()
    assert len(proto.non_tensor_batch["multi_modal_inputs"]) == 4
    advantages_BT, _ = core_algos.compute_grpo_outcome_advantage(
        token_level_rewards=proto.batch["rm_scores"],
        response_mask=proto.batch["response_mask"],
        index=proto.non_tensor_batch["uid"],
        token_level_advantages=proto.batch["token_level_advantages"],
        advantage_override_mask=proto.batch["advantage_override_mask"],
    )
    mean, std = 1 / 3, float(np.std([1.0, 0.0, 0.0], ddof=1))
    torch.testing.assert_close(advantages_BT[0, :2], torch.full((2,), (1 - mean) / (std + 1e-6)))
    torch.testing.assert_close(advantages_BT[1, :3], torch.full((3,), (0 - mean) / (std + 1e-6)))
    assert advantages_BT[2].abs().sum() == 0  # set_advantage_to_zero
    torch.testing.assert_close(advantages_BT[3, :2], torch.tensor([0.25, 0.5]))
    assert (advantages_BT * (1 - proto.batch["response_mask"])).abs().sum() == 0


@pytest.mark.timeout(30)
def test_inference_logprobs_become_rollout_log_probs_outside_masked_positions():
    tokens, masks = seq([1, 2], [10, 11, 50, 12], masked={2})
    logprobs = [1.0, 1.0, -0.5, -0.6, 1.0, -0.7]  # atroposlib: 1.0 at every masked position
    batch = scored_groups_to_batch([group([(tokens, masks)], [1.0], inference_logprobs=[logprobs])], LIMITS)
    lp = batch.rollout_log_probs_BT[0]
    torch.testing.assert_close(lp[:4], torch.tensor([-0.5, -0.6, 0.0, -0.7]))
    assert (lp > 0).sum() == 0
    assert (lp * (1 - batch.response_mask_BT[0])).abs().sum() == 0
    # one group without them: no rollout_log_probs for the batch
    other = group([seq([1], [2])], [0.0])
    both = scored_groups_to_batch([group([(tokens, masks)], [1.0], inference_logprobs=[logprobs]), other], LIMITS)
    assert both.rollout_log_probs_BT is None
    assert "rollout_log_probs" not in both.tensors()


@pytest.mark.timeout(30)
def test_over_long_sequences_are_rejected_naming_group_and_lengths():
    ok = group([seq([1], [2])], [0.0])
    long_prompt = group([seq([1], [2]), seq(list(range(7)), [2])], [0.0, 1.0], env_id=5)
    with pytest.raises(TrajectoryLengthError) as info:
        scored_groups_to_batch([ok, long_prompt], LIMITS)
    message = str(info.value)
    assert "group 1 (env_id 5), sequence 1" in message
    assert "prompt of 7 tokens" in message and "max_prompt_length=6" in message
    assert (info.value.group_index, info.value.sample_index) == (1, 1)

    long_response = group([seq([1], list(range(9)))], [0.0])
    with pytest.raises(TrajectoryLengthError, match=r"group 0, sequence 0: .*response of 9 tokens.*max_response_length=8"):
        scored_groups_to_batch([long_response], LIMITS)
    # exactly at the limits is fine
    scored_groups_to_batch([group([seq(list(range(6)), list(range(8)))], [0.0])], LIMITS)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "bad, match",
    [
        (group([seq([1], [2])], [0.0, 1.0]), r"group 0: tokens \(1\), masks \(1\) and scores \(2\)"),
        ({"tokens": [[1, 2]], "masks": [[M]], "scores": [0.0]}, r"group 0, sequence 0: tokens and masks"),
        ({"tokens": [[1, 2]], "masks": [[M, M]], "scores": [0.0]}, r"no response"),
        (group([seq([1], [2])], [float("nan")]), r"score nan is not a finite number"),
        (group([seq([1], [2]), seq([1], [3])], [0.0, 1.0], advantages=[[0.1]]), r"advantages has 1 entries for 2"),
        (group([seq([1], [2, 3])], [0.0], advantages=[[0.1, 0.2, 0.3, 0.4]]), r"advantages has 4 values; expected 3"),
        (group([seq([1], [2])], [0.0], advantages=[[float("inf")]]), r"non-finite"),
        (group([seq([1], [2])], [0.0], inference_logprobs=[[0.1, 0.2, 0.3]]), r"inference_logprobs has 3 values"),
    ],
)
def test_malformed_groups_are_rejected_naming_the_field(bad, match):
    with pytest.raises(TrajectoryFormatError, match=match):
        scored_groups_to_batch([bad], LIMITS)


@pytest.mark.timeout(30)
def test_empty_batch_is_rejected():
    with pytest.raises(TrajectoryFormatError, match="no groups"):
        scored_groups_to_batch([], LIMITS)


@st.composite
def random_sequences(draw):
    prompt = draw(st.lists(st.integers(0, 50), min_size=1, max_size=6))
    response = draw(st.lists(st.integers(0, 50), min_size=1, max_size=8))
    trained = draw(st.lists(st.booleans(), min_size=len(response), max_size=len(response)))
    trained[0] = True  # the response starts at the first trained token
    advantages = draw(st.lists(st.floats(-5, 5, width=32), min_size=len(response), max_size=len(response)))
    return prompt, response, trained, advantages


@pytest.mark.timeout(120)
@settings(max_examples=60, deadline=None)
@given(st.lists(random_sequences(), min_size=1, max_size=4))
def test_random_masks_keep_every_trained_token_and_its_values(sequences):
    tokens = [p + r for p, r, _, _ in sequences]
    masks = [[M] * len(p) + [tok if keep else M for tok, keep in zip(r, t)] for p, r, t, _ in sequences]
    advantages = [[7.0] * len(p) + a for p, _, _, a in sequences]
    logprobs = [[1.0] * len(p) + [-(k + 1) / 10 if keep else 1.0 for k, keep in enumerate(t)] for p, _, t, _ in sequences]
    g = {"tokens": tokens, "masks": masks, "scores": [0.0] * len(tokens), "advantages": advantages,
         "inference_logprobs": logprobs}
    batch = scored_groups_to_batch([g], LIMITS)
    for b, (prompt, response, trained, adv) in enumerate(sequences):
        rows = batch.response_mask_BT[b].bool()
        want = [j for j, keep in enumerate(trained) if keep]
        # the j-th trained response token keeps its token, advantage and log-prob
        assert batch.responses_BT[b][rows].tolist() == [response[j] for j in want]
        torch.testing.assert_close(batch.token_level_advantages_BT[b][rows], torch.tensor([adv[j] for j in want]))
        torch.testing.assert_close(batch.rollout_log_probs_BT[b][rows], torch.tensor([-(j + 1) / 10 for j in want]))
        assert batch.prompts_BP[b, LIMITS.max_prompt_length - len(prompt) :].tolist() == prompt
        assert batch.attention_mask_BL[b].sum() == len(prompt) + len(response)
        assert batch.rm_scores_BT.shape == batch.response_mask_BT.shape


@pytest.mark.timeout(30)
def test_metrics_of_a_batch():
    groups = [
        group([seq([1], [2]), seq([1], [3])], [1.0, 1.0], generation_params={"policy_step": 3}),
        group([seq([1], [2]), seq([1], [3])], [0.0, 1.0], advantages=[[0.1], [0.2]],
              overrides=[{"set_advantage_to_zero": True}, {}]),
        group([seq([1], [2])], [0.5], generation_params={"policy_step": 5}),
    ]
    metrics = trajectory_metrics(groups)
    assert metrics["atropos/batch_groups"] == 3
    assert metrics["atropos/batch_samples"] == 5
    assert math.isclose(metrics["atropos/mean_score"], 3.5 / 5)
    assert metrics["atropos/identical_score_rate"] == 0.5  # the singleton group does not count
    assert math.isclose(metrics["atropos/advantage_groups_fraction"], 1 / 3)
    # One sequence of five asked for set_advantage_to_zero; the old name read as "advantages that are 0".
    assert metrics["atropos/set_advantage_to_zero_fraction"] == 0.2
    assert "atropos/zero_advantage_fraction" not in metrics
    assert metrics["atropos/group_size/min"] == 1 and metrics["atropos/group_size/max"] == 2
    # Staleness comes from the gateway's records (trajectory/staleness.py), not an env's policy_step.
    assert not [k for k in metrics if k.startswith("atropos/staleness/")]
