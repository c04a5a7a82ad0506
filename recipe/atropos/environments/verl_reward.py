"""verl's own reward function for the data sources the repo's environments serve
(``reward.custom_reward_function``: ``path: pkg://recipe.atropos.environments.verl_reward``,
``name: compute_score``).

In evaluate mode verl scores every sample itself too: the run's reward, and what GRPO trains on
when an environment is down. Its default scorer knows ``openai/gsm8k`` but no
``reasoning_gym/<task>``: a run with reasoning-gym data needs this function (the mixed demo's
``mixed_grpo_cpu.yaml`` sets it).
"""

from __future__ import annotations

import functools
from typing import Any


def compute_score(data_source: str, solution_str: str, ground_truth: Any, extra_info: Any = None, **kwargs: Any) -> float:
    """verl's own reward in the mixed demo (``reward.custom_reward_function`` of mixed_grpo_cpu.yaml):
    reasoning-gym rows by the task's own verifier, as the reasoning-gym service judges them; every
    other row by verl's default scorer. verl scores every sample itself (the run's reward, and the
    fallback when an environment is down), and its default scorer knows no reasoning_gym/<task>."""
    if str(data_source).startswith("reasoning_gym/"):
        return _reasoning_gym_judge().score(solution_str, str(ground_truth))
    from verl.utils.reward_score import default_compute_score

    return default_compute_score(data_source, solution_str, ground_truth, extra_info, **kwargs)


@functools.cache
def _reasoning_gym_judge() -> Any:
    from recipe.atropos.environments.reasoning_gym_env import ReasoningGymJudge

    return ReasoningGymJudge()
