"""The GRPO estimator with token-level overrides (verl/trainer/ppo/core_algos.py), against upstream's GRPO."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from verl import _overlay, DataProto
from verl.trainer.ppo import core_algos

_spec = importlib.util.spec_from_file_location("pristine_core_algos", _overlay.installed_source_file("verl.trainer.ppo.core_algos"))
upstream = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(upstream)


@st.composite
def grpo_batches(draw, quantized: bool = True):
    """A batch: [B, T] rewards and mask, group labels, [B, T] overrides and a [B] override mask."""
    batch_size = draw(st.integers(1, 24))
    length = draw(st.integers(1, 12))
    num_groups = draw(st.integers(1, batch_size))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    if quantized:  # multiples of 1/4: sums and means are exact in float32, so only rounding differs
        rewards = torch.randint(-8, 9, (batch_size, length), generator=gen).float() / 4
    else:
        rewards = torch.randn(batch_size, length, generator=gen) * draw(st.sampled_from([1e-3, 1.0, 1e3]))
    sparse = draw(st.booleans())
    if sparse:  # verl's outcome rewards: one value at the last response token
        rewards = rewards * (torch.rand(batch_size, length, generator=gen) < 0.2)
    mask = (torch.rand(batch_size, length, generator=gen) < draw(st.sampled_from([0.3, 0.7, 1.0]))).float()
    labels = draw(st.sampled_from(["str", "int"]))
    groups = torch.randint(0, num_groups, (batch_size,), generator=gen).tolist()
    index = np.array([f"uid-{g}" for g in groups], dtype=object) if labels == "str" else np.array(groups)
    overrides = torch.randn(batch_size, length, generator=gen) * 3
    override_mask = torch.rand(batch_size, generator=gen) < draw(st.sampled_from([0.0, 0.5, 1.0]))
    return rewards, mask, index, overrides, override_mask


def _upstream_grpo(rewards, mask, index, norm):
    return upstream.compute_grpo_outcome_advantage(rewards.clone(), mask, index, norm_adv_by_std_in_grpo=norm)[0]


def _float32_tolerance(rewards, index, norm: bool) -> float:
    """Float32 rounding of s - mean (a few ulps of the largest score), amplified by 1 / (std + eps) when normalized."""
    scores = rewards.double().sum(-1)
    smallest_std = min(
        (float(scores[torch.tensor([i for i, g in enumerate(index) if g == label])].std()) for label in set(index.tolist())
         if sum(1 for g in index if g == label) > 1),
        default=1.0,
    )
    scale = float(scores.abs().max()) + 1.0
    ulps = 16 * torch.finfo(torch.float32).eps * scale
    return (ulps / (smallest_std + 1e-6) if norm else ulps) + 1e-6


@settings(max_examples=200, deadline=None)
@given(grpo_batches(), st.booleans())
def test_without_overrides_equals_upstream(batch, norm):
    rewards, mask, index, _, _ = batch
    ours, returns = core_algos.compute_grpo_outcome_advantage(rewards, mask, index, norm_adv_by_std_in_grpo=norm)
    torch.testing.assert_close(ours, _upstream_grpo(rewards, mask, index, norm), rtol=1e-5, atol=1e-5)
    assert returns is ours


@settings(max_examples=100, deadline=None)
@given(grpo_batches(quantized=False), st.booleans())
def test_without_overrides_equals_upstream_on_any_floats(batch, norm):
    rewards, mask, index, _, _ = batch
    ours, _ = core_algos.compute_grpo_outcome_advantage(rewards, mask, index, norm_adv_by_std_in_grpo=norm)
    theirs = _upstream_grpo(rewards, mask, index, norm)
    assert (ours - theirs).abs().max() <= _float32_tolerance(rewards, index, norm)


@settings(max_examples=200, deadline=None)
@given(grpo_batches(), st.booleans(), st.booleans())
def test_overrides_exact_and_other_rows_upstream(batch, norm, omit_mask):
    rewards, mask, index, overrides, override_mask = batch
    if omit_mask:
        override_mask = torch.ones_like(override_mask)
    ours, _ = core_algos.compute_grpo_outcome_advantage(
        rewards, mask, index, norm_adv_by_std_in_grpo=norm,
        token_level_advantages=overrides, advantage_override_mask=None if omit_mask else override_mask,
    )
    # Overridden rows: exactly overrides * mask.
    assert torch.equal(ours[override_mask], (overrides * mask)[override_mask])
    # Other rows: upstream GRPO computed on the whole batch (group statistics include overridden samples).
    torch.testing.assert_close(ours[~override_mask], _upstream_grpo(rewards, mask, index, norm)[~override_mask], rtol=1e-5, atol=1e-5)
    # Nothing outside the response.
    assert not ours[mask == 0].any()


def test_group_statistics_use_overridden_samples():
    rewards = torch.tensor([[1.0], [0.0], [0.0], [0.0]])
    mask = torch.ones(4, 1)
    index = np.array(["g"] * 4, dtype=object)
    override_mask = torch.tensor([True, False, False, False])
    ours, _ = core_algos.compute_grpo_outcome_advantage(
        rewards, mask, index, token_level_advantages=torch.full((4, 1), 9.0), advantage_override_mask=override_mask
    )
    # Group of 4 scores (1, 0, 0, 0): mean 0.25, std 0.5 -> the zeros get -0.5 (not 0, as a group of 3 zeros would).
    torch.testing.assert_close(ours[1:, 0], torch.full((3,), -0.25 / (0.5 + 1e-6)))
    assert ours[0, 0] == 9.0


def test_singleton_group_keeps_its_raw_score():
    ours, _ = core_algos.compute_grpo_outcome_advantage(torch.tensor([[0.0, 2.5]]), torch.ones(1, 2), np.array(["a"], dtype=object))
    torch.testing.assert_close(ours, torch.full((1, 2), 2.5 / (1 + 1e-6)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_is_kept(dtype):
    rewards = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=dtype)
    index = np.array([0, 0])
    plain, _ = core_algos.compute_grpo_outcome_advantage(rewards, torch.ones(2, 2, dtype=dtype), index)
    overridden, _ = core_algos.compute_grpo_outcome_advantage(
        rewards, torch.ones(2, 2, dtype=dtype), index,
        token_level_advantages=torch.ones(2, 2, dtype=torch.float32), advantage_override_mask=torch.tensor([True, False]),
    )
    assert plain.dtype == dtype and overridden.dtype == dtype
    assert plain.device == rewards.device and overridden.device == rewards.device


def test_non_finite_override_inside_the_mask_names_the_row():
    overrides = torch.zeros(3, 4)
    overrides[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite.*rows \[2\]"):
        core_algos.compute_grpo_outcome_advantage(
            torch.zeros(3, 4), torch.ones(3, 4), np.array([0, 0, 1]), token_level_advantages=overrides
        )


def test_non_finite_values_where_they_are_not_used_are_ignored():
    overrides = torch.zeros(3, 4)
    overrides[0, 3] = float("inf")  # overridden row, outside the mask
    overrides[1, 0] = float("nan")  # row not overridden
    mask = torch.ones(3, 4)
    mask[0, 3] = 0
    rewards = torch.tensor([[1.0], [0.0], [1.0]]).expand(3, 4).contiguous()
    ours, _ = core_algos.compute_grpo_outcome_advantage(
        rewards, mask, np.array([0, 0, 0]), token_level_advantages=overrides,
        advantage_override_mask=torch.tensor([True, False, True]),
    )
    assert torch.isfinite(ours).all()
    assert ours[0, 3] == 0
    torch.testing.assert_close(ours[1], _upstream_grpo(rewards, mask, np.array([0, 0, 0]), True)[1])


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"token_level_advantages": torch.zeros(2, 3)}, r"token_level_advantages \(2, 3\) does not match response_mask \(2, 4\)"),
        ({"token_level_advantages": torch.zeros(2, 4), "advantage_override_mask": torch.ones(3, dtype=torch.bool)},
         r"advantage_override_mask \(3,\) must be \[batch_size\] = \(2,\)"),
        ({"advantage_override_mask": torch.ones(2, dtype=torch.bool)}, "without token_level_advantages"),
        ({"response_mask": torch.ones(2, 5)}, r"token_level_rewards \(2, 4\) and response_mask \(2, 5\)"),
        ({"index": np.array([0, 0, 0])}, "index has 3 entries for a batch of 2"),
    ],
)
def test_shape_errors_name_tensor_and_shapes(kwargs, needle):
    args = {"token_level_rewards": torch.zeros(2, 4), "response_mask": torch.ones(2, 4), "index": np.array([0, 0]), **kwargs}
    with pytest.raises(ValueError, match=needle):
        core_algos.compute_grpo_outcome_advantage(**args)


def test_verls_compute_advantage_reaches_this_estimator():
    from verl.trainer.ppo import ray_trainer

    assert core_algos.get_adv_estimator_fn("grpo") is core_algos.compute_grpo_outcome_advantage
    assert ray_trainer.core_algos.compute_grpo_outcome_advantage is core_algos.compute_grpo_outcome_advantage
    rewards = torch.tensor([[0.0, 1.0], [0.0, 0.0], [0.0, 3.0], [0.0, 1.0]])
    mask = torch.ones(4, 2)
    data = DataProto.from_dict(
        tensors={"token_level_rewards": rewards, "response_mask": mask},
        non_tensors={"uid": np.array(["a", "a", "b", "b"], dtype=object)},
    )
    out = ray_trainer.compute_advantage(data, adv_estimator="grpo", num_repeat=2)
    expected, _ = core_algos.compute_grpo_outcome_advantage(rewards, mask, np.array(["a", "a", "b", "b"], dtype=object))
    torch.testing.assert_close(out.batch["advantages"], expected)
