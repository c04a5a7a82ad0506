"""AtroposGRPOComputer: environment answers aligned with verl's response_mask, and the process-supervision formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recipe.atropos.environments.advantages import compute_grpo_outcome_advantages_np, compute_grpo_process_advantages
from recipe.atropos.errors import AtroposProtocolError
from recipe.atropos.grpo_computer import AdvantageOverrides, AtroposGRPOComputer
from verl.trainer.ppo import core_algos


@st.composite
def answered_batches(draw):
    """A left/right-padded response mask with holes, and an environment answer of each kind per sample."""
    batch_size = draw(st.integers(1, 12))
    length = draw(st.integers(1, 10))
    mask = torch.tensor(draw(st.lists(st.lists(st.booleans(), min_size=length, max_size=length), min_size=batch_size, max_size=batch_size))).float()
    answers = []
    for i in range(batch_size):
        kind = draw(st.sampled_from(["list", "float", "none"]))
        n = int(mask[i].sum())
        if kind == "list":
            answers.append(draw(st.lists(st.floats(-10, 10, width=32), min_size=n, max_size=n)))
        elif kind == "float":
            answers.append(draw(st.floats(-10, 10, width=32)))
        else:
            answers.append(None)
    return mask, answers


@settings(max_examples=200, deadline=None)
@given(answered_batches())
def test_each_answer_lands_on_its_response_tokens(batch):
    mask, answers = batch
    batch_size = mask.shape[0]
    rewards = torch.zeros_like(mask)
    rewards[:, -1] = torch.arange(batch_size) % 2
    index = np.array([i // 2 for i in range(batch_size)])
    out = AtroposGRPOComputer().compute(rewards, mask, index, answers)
    grpo, _ = core_algos.compute_grpo_outcome_advantage(rewards, mask, index)
    for i, answer in enumerate(answers):
        positions = mask[i].nonzero().flatten().tolist()  # the j-th response token is the j-th 1, left to right
        row = out.advantages_BT[i]
        if isinstance(answer, list):
            assert row[positions].tolist() == [float(np.float32(a)) for a in answer]
        elif answer is not None:
            assert row[positions].tolist() == [float(np.float32(answer))] * len(positions)
        else:
            assert torch.equal(row, grpo[i])
        assert not row[mask[i] == 0].any()
    overridden = sum(a is not None for a in answers)
    assert out.metrics["atropos/override_fraction"] == overridden / batch_size
    # A step where no sample took the environment's advantages is a step of standard GRPO.
    assert out.metrics["atropos/fallback"] == (1.0 if overridden == 0 else 0.0)
    assert out.metrics["atropos/shape_mismatches"] == 0.0


def _left_padded(lengths, width):
    return torch.stack([torch.cat([torch.zeros(width - n), torch.ones(n)]) for n in lengths])


def test_wrong_length_falls_back_and_is_counted():
    mask = _left_padded([3, 2, 4], 5)
    rewards = torch.zeros(3, 5)
    rewards[0, -1] = 1.0
    index = np.array([0, 0, 0])
    out = AtroposGRPOComputer(allow_fallback=True).compute(rewards, mask, index, [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], None])
    grpo, _ = core_algos.compute_grpo_outcome_advantage(rewards, mask, index)
    assert out.advantages_BT[0, 2:].tolist() == [1.0, 2.0, 3.0]
    assert torch.equal(out.advantages_BT[1], grpo[1])  # 3 values for 2 tokens: GRPO instead
    assert out.metrics["atropos/shape_mismatches"] == 1.0
    assert out.metrics["atropos/override_fraction"] == pytest.approx(1 / 3)


def test_wrong_length_without_fallback_names_sample_and_lengths():
    mask = _left_padded([3, 2], 4)
    with pytest.raises(AtroposProtocolError, match=r"advantages\[1\]: 3 token advantages for a response of 2 tokens") as info:
        AtroposGRPOComputer(allow_fallback=False).compute(torch.zeros(2, 4), mask, np.array([0, 0]), [[0.0] * 3, [0.0] * 3])
    assert (info.value.sample_index, info.value.expected, info.value.actual) == (1, 2, 3)


def test_non_finite_answer_falls_back_or_raises():
    mask = torch.ones(2, 2)
    answers = [[float("nan"), 0.0], float("inf")]
    out = AtroposGRPOComputer().compute(torch.zeros(2, 2), mask, np.array([0, 0]), answers)
    assert torch.isfinite(out.advantages_BT).all() and out.metrics["atropos/shape_mismatches"] == 2.0
    with pytest.raises(AtroposProtocolError, match=r"advantages\[0\]: token advantages are not all finite"):
        AtroposGRPOComputer(allow_fallback=False).compute(torch.zeros(2, 2), mask, np.array([0, 0]), answers)


def test_batch_size_mismatch_is_an_error():
    with pytest.raises(AtroposProtocolError, match="advantages has 1 entries for a batch of 2"):
        AtroposGRPOComputer().compute(torch.zeros(2, 2), torch.ones(2, 2), np.array([0, 0]), [None])


def test_no_answer_is_plain_grpo_and_reported_as_fallback():
    rewards = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    mask = torch.ones(2, 2)
    out = AtroposGRPOComputer().compute(rewards, mask, np.array([0, 0]), None)
    grpo, _ = core_algos.compute_grpo_outcome_advantage(rewards, mask, np.array([0, 0]))
    assert torch.equal(out.advantages_BT, grpo)
    assert out.metrics["atropos/fallback"] == 1.0 and out.metrics["atropos/override_fraction"] == 0.0
    on_tokens = grpo[mask.bool()]
    assert out.metrics["atropos/advantages/mean"] == pytest.approx(on_tokens.mean().item())
    assert out.metrics["atropos/advantages/std"] == pytest.approx(on_tokens.std().item())
    assert out.metrics["atropos/advantages/min"] == on_tokens.min().item()
    assert out.metrics["atropos/advantages/max"] == on_tokens.max().item()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=1, max_size=10), st.booleans())
def test_numpy_outcome_advantages_equal_the_estimator(scores, norm):
    groups = [i % 3 for i in range(len(scores))]
    ours = compute_grpo_outcome_advantages_np(scores, groups, norm_adv_by_std=norm)
    rewards = torch.tensor(scores, dtype=torch.float64).unsqueeze(-1)
    expected, _ = core_algos.compute_grpo_outcome_advantage(rewards, torch.ones_like(rewards), np.array(groups), norm_adv_by_std_in_grpo=norm)
    np.testing.assert_allclose(ours, expected[:, 0].numpy(), rtol=1e-9, atol=1e-9)


@st.composite
def process_groups(draw):
    num = draw(st.integers(1, 4))
    lengths, rewards, ends = [], [], []
    for _ in range(num):
        length = draw(st.integers(1, 12))
        steps = draw(st.integers(0, 4))
        ends.append(sorted(draw(st.lists(st.integers(0, length - 1), min_size=steps, max_size=steps))))
        rewards.append(draw(st.lists(st.sampled_from([-1.0, 0.0, 1.0, 2.0]), min_size=steps, max_size=steps)))
        lengths.append(length)
    return rewards, ends, lengths


@settings(max_examples=200, deadline=None)
@given(process_groups(), st.booleans())
def test_process_supervision_follows_the_formula(group, norm):
    rewards, ends, lengths = group
    ours = compute_grpo_process_advantages(rewards, ends, lengths, norm_adv_by_std=norm)
    flat = [r for rs in rewards for r in rs]
    mean, std = (float(np.mean(flat)), float(np.std(flat, ddof=1))) if len(flat) >= 2 else (0.0, 1.0)
    for i, length in enumerate(lengths):
        assert ours[i].shape == (length,) and ours[i].dtype == np.float32
        for t in range(length):
            # A_{i,t} = sum of normalized rewards of the steps ending at or after t
            expected = sum(((r - mean) / (std + 1e-6) if norm else r - mean) for r, end in zip(rewards[i], ends[i]) if end >= t)
            assert ours[i][t] == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_process_supervision_rejects_bad_step_indices():
    with pytest.raises(ValueError, match="sample 0: step end indices \\[5\\] must be non-decreasing and within \\[0, 3\\)"):
        compute_grpo_process_advantages([[1.0]], [[5]], [3])
    with pytest.raises(ValueError, match="sample 0: 2 step rewards but 1 step end indices"):
        compute_grpo_process_advantages([[1.0, 0.0]], [[1]], [3])


def test_integration_module_exports_the_public_api():
    from recipe.atropos import atropos_integration

    for name in atropos_integration.__all__:
        assert getattr(atropos_integration, name) is not None
    assert issubclass(atropos_integration.AtroposUnavailableError, atropos_integration.AtroposAPIError)


def test_a_finite_number_beyond_float32_falls_back_alone():
    """Issue 14: 1e300 is finite as sent but inf as float32; it must cost that sample, not the run."""
    rewards, mask, index = torch.zeros(2, 3), torch.ones(2, 3), np.array(["a", "a"], dtype=object)
    out = AtroposGRPOComputer(allow_fallback=True).compute(rewards, mask, index, [1e300, 0.5])
    grpo, _ = core_algos.compute_grpo_outcome_advantage(rewards, mask, index)
    assert torch.equal(out.advantages_BT[0], grpo[0]) and out.advantages_BT[1].tolist() == [0.5] * 3
    assert out.metrics["atropos/fallback_samples/out_of_range"] == 1.0 and out.metrics["atropos/fallback"] == 0.0
    for answer in ([1e300, 0.5], [[0.0, 1e300, 0.0], 0.5], [-(10**400), 0.5]):
        with pytest.raises(AtroposProtocolError, match=r"advantages\[0\]: .*beyond float"):
            AtroposGRPOComputer(allow_fallback=False).compute(rewards, mask, index, answer)


def test_overrides_are_checked_in_the_training_dtype():
    """float32-finite overrides that overflow the rewards' dtype (fp16 here) fall back, on both entry points."""
    rewards, mask, index = torch.zeros(2, 3, dtype=torch.float16), torch.ones(2, 3), np.array([0, 0])
    out = AtroposGRPOComputer().compute(rewards, mask, index, [[1e5, 0.0, 0.0], 2.0])
    assert torch.isfinite(out.advantages_BT).all() and out.advantages_BT[1].tolist() == [2.0] * 3
    assert out.metrics["atropos/fallback_samples/out_of_range"] == 1.0
    # The trajectory path hands over tensors; NaN outside the response mask is not an error.
    overrides = AdvantageOverrides(torch.tensor([[float("nan"), 1.0, 1.0], [7e4, 1.0, 1.0]]), torch.tensor([True, True]))
    out = AtroposGRPOComputer().compute_from_overrides(rewards, torch.tensor([[0, 1, 1], [1, 1, 1]]), index, overrides)
    assert out.advantages_BT[0].tolist() == [0.0, 1.0, 1.0] and out.metrics["atropos/fallback_samples/out_of_range"] == 1.0
    with pytest.raises(AtroposProtocolError, match=r"advantages\[0\]: .*training dtype torch.float16"):
        AtroposGRPOComputer(allow_fallback=False).compute_from_overrides(rewards, mask, index, overrides)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.none(), st.booleans(), st.text(max_size=3), st.integers(-(2**80), 2**80),
            st.floats(allow_nan=True, allow_infinity=True),
            st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**70), 2**70), st.none()), max_size=5),
            st.lists(st.lists(st.floats(), max_size=2), max_size=3),
        ),
        min_size=3, max_size=3,
    ),
    st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
)
def test_no_answer_makes_the_computer_raise_with_fallback_on(answers, dtype):
    mask = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 1, 1]])
    out = AtroposGRPOComputer().compute(torch.zeros(3, 3, dtype=dtype), mask, np.array([0, 0, 1]), answers)
    assert torch.isfinite(out.advantages_BT).all() and not out.advantages_BT[mask == 0].any()
    fell_back = sum(v for k, v in out.metrics.items() if k.startswith("atropos/fallback_samples/"))
    assert fell_back == out.metrics["atropos/shape_mismatches"] <= 3 - sum(a is None for a in answers)
