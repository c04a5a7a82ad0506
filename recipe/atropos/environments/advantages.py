"""GRPO advantages on the environment side (numpy): outcome and process supervision.

The trainer computes GRPO with verl's estimator (verl/trainer/ppo/core_algos.py, torch); these
functions give environments the same formulas, so that an environment that returns advantages
computes exactly what verl would. Here, not on the trainer's side: environment processes (the
service, atroposlib environments) run without torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from recipe.atropos.datatypes import group_index


def compute_grpo_outcome_advantages_np(
    scores_B: Sequence[float] | np.ndarray,
    group_ids: Sequence[object],
    epsilon: float = 1e-6,
    norm_adv_by_std: bool = True,
) -> np.ndarray:
    """verl's GRPO outcome advantage of each sample, one float per sample.

    A_i = (s_i - mean_g) / (std_g + epsilon), or s_i - mean_g when `norm_adv_by_std` is false, with
    g the group of sample i, std unbiased, and a singleton group mean 0 and std 1 (so it keeps its
    raw score, as in verl). Returns float64 [B].
    """
    scores_B = np.asarray(scores_B, dtype=np.float64)
    if len(group_ids) != len(scores_B):
        raise ValueError(f"group_ids has {len(group_ids)} entries for {len(scores_B)} scores")
    if len(scores_B) == 0:
        return scores_B
    group_B = group_index(group_ids)
    count_G = np.bincount(group_B).astype(np.float64)
    mean_G = np.bincount(group_B, weights=scores_B) / count_G
    centered_B = scores_B - mean_G[group_B]
    std_G = np.sqrt(np.bincount(group_B, weights=centered_B * centered_B) / np.maximum(count_G - 1, 1))
    singleton_G = count_G == 1
    mean_G[singleton_G], std_G[singleton_G] = 0.0, 1.0
    centered_B = scores_B - mean_G[group_B]
    return centered_B / (std_G[group_B] + epsilon) if norm_adv_by_std else centered_B


def compute_grpo_process_advantages(
    step_rewards: Sequence[Sequence[float]],
    step_end_indices: Sequence[Sequence[int]],
    response_lengths: Sequence[int],
    epsilon: float = 1e-6,
    norm_adv_by_std: bool = True,
) -> list[np.ndarray]:
    """GRPO process supervision (DeepSeekMath, arXiv 2402.03300, 4.1.3) for one group of samples.

    The step rewards of all samples of the group are normalized together:
    r~ = (r - mean(R)) / (std(R) + epsilon) (unbiased std; or r - mean(R) when `norm_adv_by_std`
    is false; with fewer than 2 steps in the whole group, mean 0 and std 1). Token t of sample i gets
    A_{i,t} = sum of r~_{i,j} over its steps j with end token index(j) >= t, so tokens after the
    last step get 0.

    Args:
        step_rewards: per sample, the reward of each step, in order.
        step_end_indices: per sample, the index of each step's last response token (non-decreasing).
        response_lengths: per sample, the number of response tokens.

    Returns:
        per sample, a float32 array of `response_lengths[i]` token advantages.
    """
    num_samples = len(response_lengths)
    if len(step_rewards) != num_samples or len(step_end_indices) != num_samples:
        raise ValueError(
            f"step_rewards ({len(step_rewards)}), step_end_indices ({len(step_end_indices)}) and "
            f"response_lengths ({num_samples}) must have one entry per sample"
        )
    all_rewards = np.concatenate([np.asarray(r, dtype=np.float64) for r in step_rewards] or [np.zeros(0)])
    if all_rewards.size >= 2:
        mean, std = all_rewards.mean(), all_rewards.std(ddof=1)
    else:
        mean, std = 0.0, 1.0
    advantages = []
    for i, (rewards, ends, length) in enumerate(zip(step_rewards, step_end_indices, response_lengths)):
        rewards_S = np.asarray(rewards, dtype=np.float64)
        ends_S = np.asarray(ends, dtype=np.int64)
        if rewards_S.shape != ends_S.shape:
            raise ValueError(f"sample {i}: {len(rewards_S)} step rewards but {len(ends_S)} step end indices")
        if ends_S.size and (ends_S.min() < 0 or ends_S.max() >= length or np.any(np.diff(ends_S) < 0)):
            raise ValueError(
                f"sample {i}: step end indices {ends_S.tolist()} must be non-decreasing and within [0, {length})"
            )
        normalized_S = rewards_S - mean
        if norm_adv_by_std:
            normalized_S = normalized_S / (std + epsilon)
        # Token t collects every step ending at or after t: a reversed cumulative sum over end positions.
        per_token_T = np.zeros(length, dtype=np.float64)
        np.add.at(per_token_T, ends_S, normalized_S)
        advantages.append(np.cumsum(per_token_T[::-1])[::-1].astype(np.float32))
    return advantages
