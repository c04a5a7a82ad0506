"""A group's per-token credit: GRPO outcome, GRPO process supervision, or the environment's own.

The formulas are the project's (environments/advantages.py, the same as verl's estimator), applied
over each episode's whole token sequence and then masked: tokens the policy did not sample get 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from recipe.atropos.environments.advantages import compute_grpo_outcome_advantages_np, compute_grpo_process_advantages
from recipe.atropos.episodes.types import Episode

__all__ = ["CREDITS", "Credit", "group_advantages"]

Credit = Literal["outcome", "process"]
CREDITS = ("outcome", "process")


def group_advantages(
    episodes: Sequence[Episode], credit: Credit = "outcome", *, norm_adv_by_std: bool = True, epsilon: float = 1e-6
) -> list[np.ndarray]:
    """Per episode, float32 [len(token_ids)] advantages, 0 on tokens the policy did not sample.

    - Every episode carries `advantages` (the environment assigned its own credit): those, unchanged.
    - `outcome`: A_i = (R_i - mean(R)) / (std(R) + eps) over the group's rewards R (unbiased std; or
      R_i - mean(R) without `norm_adv_by_std`), on every sampled token of episode i.
    - `process` (DeepSeekMath 4.1.3): the step rewards of all episodes are normalized together,
      r~ = (r - mean) / (std + eps), and token t of episode i gets the sum of r~_{i,j} over its steps
      j ending at or after t. An episode without steps counts as one step, its reward, at its last
      sampled token.

    Raises ValueError when only some episodes carry advantages (a group is credited one way).
    """
    given = [e.advantages is not None for e in episodes]
    if any(given) and not all(given):
        raise ValueError(f"{sum(given)} of {len(episodes)} episodes of a group carry their own advantages; "
                         "a group is credited one way (all or none)")
    masks = [np.asarray(e.sampled_mask, dtype=bool) for e in episodes]
    if all(given) and episodes:
        values = [np.asarray(e.advantages, dtype=np.float32) for e in episodes]
    elif credit == "outcome":
        outcome_B = compute_grpo_outcome_advantages_np(
            [e.reward for e in episodes], [0] * len(episodes), epsilon=epsilon, norm_adv_by_std=norm_adv_by_std)
        values = [np.full(len(e.token_ids), a, dtype=np.float32) for e, a in zip(episodes, outcome_B)]
    elif credit == "process":
        steps = [_steps(e) for e in episodes]
        values = compute_grpo_process_advantages(
            [s[0] for s in steps], [s[1] for s in steps], [len(e.token_ids) for e in episodes],
            epsilon=epsilon, norm_adv_by_std=norm_adv_by_std)
    else:
        raise ValueError(f"credit {credit!r} is not one of {CREDITS}")
    return [np.where(mask, value, 0.0).astype(np.float32) for mask, value in zip(masks, values)]


def _steps(episode: Episode) -> tuple[list[float], list[int]]:
    if episode.step_rewards:
        return list(episode.step_rewards), list(episode.step_ends)
    last = len(episode.sampled_mask) - 1 - episode.sampled_mask[::-1].index(True)
    return [episode.reward], [last]
