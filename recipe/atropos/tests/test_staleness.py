"""The trainer's side of the behaviour records (trajectory/staleness.py): each pulled sample matched
to what the policy gateway generated, the staleness bound, the batch filled from later groups, and
verl's rollout correction fed the result.

Real components: the gateway's BehaviorRecords, the conversion, verl's rollout-correction helper,
atroposlib's run-api (a process) and the rollout manager the trainer uses.
"""

from __future__ import annotations

import itertools
import math
import threading

import numpy as np
import pytest
import requests
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from tensordict import TensorDict

from recipe.atropos.trajectory.behavior import BehaviorRecords
from recipe.atropos.trajectory.scored_data import TrajectoryLimits, scored_groups_to_batch
from recipe.atropos.trajectory.staleness import (
    BEHAVIOR_MATCHED,
    StalenessFilter,
    _first_exact_subset,
    check_rollout_correction,
    fill_unmatched,
    match_group,
    match_sample,
    trained_runs,
)

M = -100
LIMITS = TrajectoryLimits(max_prompt_length=4, max_response_length=8, pad_token_id=0)


def logprobs_of(tokens) -> list[float]:
    return [-0.01 * t - 0.5 for t in tokens]


def recorded(records: BehaviorRecords, version: int, completion: list[int]) -> list[int]:
    records.add(version, completion, logprobs_of(completion))
    return completion


def sequence(prompt: list[int], *turns: tuple[list[int], bool]) -> tuple[list[int], list[int]]:
    """tokens and masks: a prompt, then turns (tokens, trained?)."""
    tokens, masks = list(prompt), [M] * len(prompt)
    for part, trained in turns:
        tokens += part
        masks += part if trained else [M] * len(part)
    return tokens, masks


def group(*sequences, scores=None) -> dict:
    return {"tokens": [s[0] for s in sequences], "masks": [s[1] for s in sequences],
            "scores": list(scores or [float(i) for i in range(len(sequences))])}


def test_trained_runs_are_the_completions():
    assert trained_runs(np.array([0, 1, 1, 0, 0, 1, 0, 1], dtype=bool)) == [slice(1, 3), slice(5, 6), slice(7, 8)]
    assert trained_runs(np.zeros(3, dtype=bool)) == []


def test_the_same_completion_after_other_tokens_is_matched_to_its_own_record():
    """A lone end-of-sequence token (2) is sampled after many prompts, each time with another log-prob
    (a CI run trained one with another prompt's: 0.028 off what its environment got). The context tells
    them apart; of one context's records in several versions, the environment's log-probs choose."""
    records = BehaviorRecords(keep_versions=8)
    records.add(3, [2], [-0.1], prompt_ids=[1, 5])
    records.add(3, [2], [-2.0], prompt_ids=[1, 6])  # the newest by the completion alone
    for prompt, logprob in (([1, 5], -0.1), ([1, 6], -2.0)):
        sample = match_sample(records, *sequence(prompt, ([2], True)))
        assert sample.version == 3 and sample.logprobs_T.tolist() == pytest.approx([logprob]) and sample.in_context
    # A later turn's context is everything before it: the prompt, the first answer, the environment's text.
    records.add(4, [2], [-0.7], prompt_ids=[1, 5, 2, 9])
    tokens, masks = sequence([1, 5], ([2], True), ([9], False), ([2], True))
    assert match_sample(records, tokens, masks).logprobs_T.tolist() == pytest.approx([-0.1, 0.0, -0.7])
    # One context, two versions: the environment's log-probs say which; without them, the newest.
    records.add(5, [2], [-0.3], prompt_ids=[1, 5])
    old = match_sample(records, *sequence([1, 5], ([2], True)), env_logprobs=[-0.1])
    new = match_sample(records, *sequence([1, 5], ([2], True)))
    assert (old.version, new.version) == (3, 5) and new.logprobs_T.tolist() == pytest.approx([-0.3])
    # A context no record knows (an environment whose sequence is not the prompt the server saw): the
    # completion alone, as before.
    unknown = match_sample(records, *sequence([8], ([2], True)))
    assert unknown.version == 5 and not unknown.in_context
    assert records.stats()["in_context"] == 4


def test_a_multi_turn_sample_is_matched_run_by_run_with_its_oldest_version():
    records = BehaviorRecords(keep_versions=8)
    first, second = recorded(records, 3, [11, 12, 2]), recorded(records, 5, [13, 14])
    tokens, masks = sequence([1, 2], (first, True), ([7, 7, 7], False), (second, True))
    sample = match_sample(records, tokens, masks)
    assert sample.matched and sample.version == 3
    # Aligned with the response ([11, 12, 2, 7, 7, 7, 13, 14]): the records' values on trained tokens, 0 on env text.
    np.testing.assert_allclose(sample.logprobs_T, logprobs_of(first) + [0.0] * 3 + logprobs_of(second), rtol=1e-6)
    # One run the gateway never generated (re-tokenized text) makes the sample unmatched.
    tokens, masks = sequence([1, 2], (first, True), ([7], False), ([13, 99], True))
    assert match_sample(records, tokens, masks).matched is False
    # A completion extended by a token (an EOS the environment added) is not the same completion.
    assert match_sample(records, *sequence([1], (first + [0], True))).matched is False
    # A sequence too malformed to split is left to the conversion.
    assert match_sample(records, [1, 2], [M]).matched is None
    assert match_sample(records, [1, 2], [M, M]).matched is None


def test_the_environments_own_log_probs_are_compared_with_the_records():
    records = BehaviorRecords()
    completion = recorded(records, 0, [5, 6, 7])
    tokens, masks = sequence([1], (completion, True))
    env = [1.0] + [v + 0.001 for v in logprobs_of(completion)]  # atroposlib writes 1.0 on the prompt
    pulled = match_group(records, {**group((tokens, masks)), "inference_logprobs": [env]})
    assert pulled.samples[0].env_logprobs_max_abs_diff == pytest.approx(0.001, abs=1e-6)


def test_stale_groups_are_dropped_and_the_batch_filled_from_later_ones_the_surplus_kept():
    records = BehaviorRecords(keep_versions=16)
    groups = []
    for version in (1, 5, 6, 6, 7):  # one group of two samples per version listed
        a, b = recorded(records, version, [20 + version, 3]), recorded(records, version, [40 + version, 4])
        groups.append(group(sequence([1], (a, True)), sequence([1], (b, True))))
    staleness = StalenessFilter(records, max_staleness=2)
    staleness.add(groups[:2])  # one /batch answer of four rows
    assert staleness.take(4, current_version=7) is None  # version 1 is 6 behind: dropped, one group left
    staleness.add(groups[2:4])
    selection = staleness.take(4, current_version=7)
    assert [p.oldest_version for p in selection.pulled] == [5, 6]  # the oldest kept first
    assert selection.dropped_groups == {"stale": 1}
    metrics = selection.metrics()
    assert metrics["atropos/staleness/max"] == 2.0 and metrics["atropos/staleness/mean"] == 1.5
    assert metrics["atropos/dropped_groups/stale"] == 1.0 and metrics["atropos/behavior_matched_fraction"] == 1.0
    assert [p.oldest_version for p in staleness.waiting] == [6]  # the surplus waits for the next step
    staleness.add(groups[4:])
    # Two steps later the waiting group is 3 behind: checked again, dropped.
    assert staleness.take(4, current_version=9) is None
    assert staleness.dropped == {"stale": 1} and staleness.dropped_total == {"stale": 2}


def test_a_sample_older_than_the_records_window_is_stale_not_unmatched():
    records = BehaviorRecords(keep_versions=2)
    old = recorded(records, 0, [5, 6])
    for version in (1, 2, 3):
        records.new_version(version)
    assert records.lookup(old) is None and records.evicted_version(old) == 0
    assert records.evicted_version([5, 7]) is None  # never generated
    fresh = recorded(records, 3, [7])
    sample = match_sample(records, *sequence([1], (old, True)))
    assert sample.matched and sample.version == 0 and sample.logprobs_T is None
    # Dropped as stale even under a bound wider than the window (and never kept as unmatched).
    staleness = StalenessFilter(records, max_staleness=8, unmatched="keep")
    staleness.add([group(sequence([1], (old, True)), sequence([1], (fresh, True)))])
    assert staleness.take(2, current_version=3) is None and staleness.dropped_total == {"stale": 1}


def test_unmatched_samples_are_kept_or_their_groups_dropped_by_the_setting():
    records = BehaviorRecords()
    matched = group(sequence([1], (recorded(records, 0, [5, 6]), True)), sequence([1], (recorded(records, 0, [7]), True)))
    unmatched = group(sequence([1], ([9, 9], True)), sequence([1], (recorded(records, 0, [8]), True)))
    keep = StalenessFilter(records, max_staleness=0, unmatched="keep")
    keep.add([unmatched, matched])
    selection = keep.take(4, current_version=0)
    assert selection.metrics()["atropos/behavior_matched_fraction"] == 0.75
    drop = StalenessFilter(records, max_staleness=0, unmatched="drop")
    drop.add([unmatched, matched])
    selection = drop.take(2, current_version=0)
    assert selection.groups == [matched] and selection.dropped_groups == {"unmatched": 1}


def test_behaviour_log_probs_line_up_with_the_converted_batch():
    records = BehaviorRecords()
    a = recorded(records, 2, [5, 6, 2])
    b1, b2 = recorded(records, 3, [8]), recorded(records, 3, [9, 10])
    groups = [group(sequence([1, 2], (a, True)), sequence([3], (b1, True), ([4], False), (b2, True))),
              group(sequence([1], ([30, 31], True)), ([1, 2], [M, 2, 3]))]  # unmatched; malformed (placeholder)
    staleness = StalenessFilter(records, max_staleness=4)
    staleness.add(groups)
    selection = staleness.take(4, current_version=3)
    batch = scored_groups_to_batch(selection.groups, LIMITS, drop_malformed=True)
    logprobs_BT, matched_B = selection.behavior_tensors(batch.group_index_B, batch.sample_index_B, batch.response_mask_BT)
    assert matched_B.tolist() == [True, True, False, False]
    assert logprobs_BT.shape == batch.response_mask_BT.shape
    mask = batch.response_mask_BT.bool()
    torch.testing.assert_close(logprobs_BT[0][mask[0]], torch.tensor(logprobs_of(a)))
    torch.testing.assert_close(logprobs_BT[1][mask[1]], torch.tensor(logprobs_of(b1) + logprobs_of(b2)))
    assert (logprobs_BT[~mask] == 0).all()


def test_verls_rollout_correction_weighs_unmatched_samples_one_and_stale_ones_not():
    """fill_unmatched, then verl's own helper: exp(old - rollout) on each row's trained tokens."""
    from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_rejection_mask

    old_BT = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.5, 0.0], [-0.7, -0.2, -0.9]])
    response_mask_BT = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]])
    tensors = TensorDict({
        "rollout_log_probs": torch.stack([old_BT[0], torch.zeros(3), old_BT[2] - 0.3]),  # on-policy, unmatched, stale
        BEHAVIOR_MATCHED: torch.tensor([True, False, True]),
    }, batch_size=[3])
    assert fill_unmatched(tensors, old_BT) == 1
    weights, _, metrics = compute_rollout_correction_and_rejection_mask(
        old_log_prob=old_BT, rollout_log_prob=tensors["rollout_log_probs"], response_mask=response_mask_BT,
        rollout_is="token", rollout_is_threshold=10.0,
    )
    w_BT = weights.batch["rollout_is_weights"]
    assert torch.allclose(w_BT[:2][response_mask_BT[:2].bool()], torch.tensor(1.0))
    assert torch.allclose(w_BT[2], torch.full((3,), math.exp(0.3)))
    assert metrics["rollout_corr/rollout_is_max"] == pytest.approx(math.exp(0.3), rel=1e-5)


def test_bypass_mode_needs_unmatched_samples_dropped():
    with pytest.raises(ValueError, match=r"trainer.atropos.unmatched_samples=drop"):
        check_rollout_correction({"bypass_mode": True}, "keep")
    check_rollout_correction({"bypass_mode": True}, "drop")
    check_rollout_correction({"bypass_mode": False, "rollout_is": "token"}, "keep")
    check_rollout_correction(None, "keep")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 6), max_size=9), st.integers(1, 12))
def test_the_first_exact_subset_is_the_earliest_one_there_is(sizes, target):
    found = _first_exact_subset(sizes, target)
    candidates = [list(c) for r in range(len(sizes) + 1) for c in itertools.combinations(range(len(sizes)), r)
                  if sum(sizes[i] for i in c) == target]
    if not candidates:
        assert found is None
        return
    assert found is not None and sum(sizes[i] for i in found) == target
    # Lexicographically first over the groups of some rows (empty groups ride along when passed).
    assert [i for i in found if sizes[i]] == min([i for i in c if sizes[i]] for c in candidates)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.integers(0, 12), st.integers(1, 4), st.booleans()), min_size=1, max_size=12),
    st.integers(0, 5), st.integers(4, 14), st.sampled_from(["keep", "drop"]), st.sampled_from([2, 4, 6]),
)
def test_what_is_taken_is_within_the_bound_and_every_group_is_accounted_for(specs, max_staleness, current, unmatched,
                                                                              num_rows):
    """Groups (version, size, generated through the gateway?) in arrival order: every group is taken,
    dropped with its reason, or still waiting; nothing taken is beyond the bound; a batch is taken
    whenever the groups within it can make one."""
    records = BehaviorRecords(keep_versions=64)
    groups, versions = [], []
    for g, (version, size, through_gateway) in enumerate(specs):
        samples = []
        for i in range(size):
            completion = [100 + g, 10 + i]  # unique per sample
            if through_gateway:
                records.add(version, completion, logprobs_of(completion))
            samples.append(sequence([1], (completion, True)))
        groups.append(group(*samples))
        versions.append(version if through_gateway else None)
    staleness = StalenessFilter(records, max_staleness, unmatched)
    staleness.add(groups)
    selection = staleness.take(num_rows, current)

    def beyond(g):
        return (versions[g] is not None and current - versions[g] > max_staleness) or (
            versions[g] is None and unmatched == "drop")

    fits = [len(groups[g]["tokens"]) for g in range(len(groups)) if not beyond(g)]
    assert (selection is not None) == (_first_exact_subset(fits, num_rows) is not None)
    taken = [] if selection is None else [groups.index(g) for g in selection.groups]
    waiting = [groups.index(p.group) for p in staleness.waiting]
    dropped = [g for g in range(len(groups)) if beyond(g)]
    assert sorted(taken + waiting + dropped) == list(range(len(groups)))
    counted = staleness.dropped_total
    assert counted["stale"] == sum(1 for g in dropped if versions[g] is not None)
    assert counted["unmatched"] == sum(1 for g in dropped if versions[g] is None)
    if selection is not None:
        assert sum(len(groups[g]["tokens"]) for g in taken) == num_rows
        metrics = selection.metrics()
        known = [current - versions[g] for g in taken for _ in groups[g]["tokens"] if versions[g] is not None]
        if known:
            assert metrics["atropos/staleness/max"] == max(known) <= max_staleness
        assert metrics["atropos/behavior_matched_fraction"] == pytest.approx(len(known) / num_rows)


# ---- the rollout manager the trainer uses, against atroposlib's run-api ---------------------------------


def manager(client, records: BehaviorRecords, *, max_staleness: int, unmatched: str = "keep"):
    from recipe.atropos.trajectory.rollout import TrajectoryRolloutManager

    config = OmegaConf.create({
        "data": {"train_batch_size": 2, "max_prompt_length": 4, "max_response_length": 8},
        "actor_rollout_ref": {"rollout": {"n": 2}},
        "trainer": {"default_local_dir": "unused", "save_freq": -1,
                    "atropos": {"max_staleness": max_staleness, "unmatched_samples": unmatched}},
    })
    return TrajectoryRolloutManager(client, LIMITS, validation_manager=None, config=config, total_steps=3,
                                    batch_timeout_s=3.0, poll_interval_s=0.05, progress_interval_s=60, records=records)


@pytest.mark.timeout(120)
def test_the_rollout_manager_drops_stale_groups_and_fills_the_step_from_run_api():
    from verl import DataProto

    from recipe.atropos.tests.servers import start_atropos_run_api
    from recipe.atropos.trajectory.rollout import TrajectoryBatchTimeout
    from recipe.atropos.trajectory.runapi_client import AtroposRunAPIClient

    records = BehaviorRecords(keep_versions=5)
    pairs = []
    for n, version in enumerate((0, 4, 4, 4, 4, 4)):
        a, b = recorded(records, version, [20 + n, 3]), recorded(records, version, [40 + n, 3])
        pairs.append(group(sequence([1], (a, True)), sequence([1], (b, True)), scores=[1.0, 0.0]))

    def step(rollout, global_steps):
        gen_batch = DataProto.from_dict(tensors={"input_ids": torch.zeros(4, 3, dtype=torch.long)},
                                        meta_info={"global_steps": global_steps})
        return rollout.generate_sequences(gen_batch)

    with start_atropos_run_api() as run_api:
        client = AtroposRunAPIClient(run_api.url, retry_delay=0.01, timeout=5.0, max_wait_time=10.0)
        rollout = manager(client, records, max_staleness=1)
        rollout.register(starting_step=0)
        push = lambda *gs: [requests.post(f"{run_api.url}/scored_data", json=g, timeout=5).raise_for_status() for g in gs]
        push(*pairs[:2])  # one /batch answer: (v0, v4); the next, (v4, v4), comes while the step waits
        later = threading.Timer(0.5, push, pairs[2:4])
        later.start()
        # Step 6: the servers hold version 5. The v0 group is 5 behind: dropped, the step filled from
        # the next answer, whose surplus group waits.
        output = step(rollout, 6)
        later.join()
        metrics = rollout.last_metrics
        assert metrics["atropos/dropped_groups/stale"] == 1.0 and metrics["atropos/staleness/max"] == 1.0
        assert metrics["atropos/behavior_matched_fraction"] == 1.0
        assert len(rollout.staleness.waiting) == 1
        # rollout_log_probs: the records', on the trained tokens.
        mask = output.batch["response_mask"].bool()
        assert output.batch[BEHAVIOR_MATCHED].all()
        torch.testing.assert_close(output.batch["rollout_log_probs"][0][mask[0]], torch.tensor(logprobs_of([21, 3])))
        # Step 7 (version 6): the waiting group is 2 behind now: dropped too; nothing else to pull.
        with pytest.raises(TrajectoryBatchTimeout, match=r"groups dropped meanwhile: \{'stale': 1\}"):
            step(rollout, 7)
        push(*pairs[4:])
        step(rollout, 5)  # version 4: on-policy
        assert rollout.last_metrics["atropos/staleness/max"] == 0.0
        assert rollout.last_metrics["atropos/dropped_groups/stale"] == 0.0


def test_trajectory_mode_reports_a_fallback_only_when_sent_advantages_could_not_be_used():
    """GRPO on the environments' scores (no advantages sent) is trajectory mode's design: not a fallback."""
    from types import SimpleNamespace

    from verl import DataProto

    from recipe.atropos.config import AtroposTrainerConfig
    from recipe.atropos.grpo_computer import AtroposGRPOComputer
    from recipe.atropos.trajectory.mode import TrajectoryMode

    mode = TrajectoryMode(AtroposTrainerConfig.parse({"mode": "trajectory"}), AtroposGRPOComputer())

    def batch() -> DataProto:
        return DataProto.from_dict(
            tensors={"token_level_rewards": torch.tensor([[0.0, 1.0], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0]]),
                     "response_mask": torch.ones(4, 2, dtype=torch.long),
                     BEHAVIOR_MATCHED: torch.ones(4, dtype=torch.bool)},
            non_tensors={"atropos_uid": np.array(["a", "a", "b", "b"], dtype=object)},
        )

    mode.rollout = SimpleNamespace(last_metrics={"atropos/trajectory/dropped/advantages": 0.0})
    plain = batch()
    assert mode.before_update(plain, step=1)["atropos/fallback"] == 0.0
    assert BEHAVIOR_MATCHED not in plain.batch.keys()  # consumed before the update; the actor never sees it
    mode.rollout.last_metrics = {"atropos/trajectory/dropped/advantages": 1.0}  # one sequence's were unusable
    assert mode.before_update(batch(), step=2)["atropos/fallback"] == 1.0
