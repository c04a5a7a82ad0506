"""A reward an untrained tiny model can earn: the share of digits in its answer.

verl's GSM8K scorer gives 0 to every answer of a randomly initialised model, so every GRPO advantage
would be 0 and nothing would train. This one scores any response in [0, 1] (digits over non-space
characters), so the samples of a group differ and the policy has somewhere to go: more digits. For
CPU smoke runs and tests only. Used through verl's
`reward.custom_reward_function.path=pkg://recipe.atropos.cpu.toy_reward`.
"""

from __future__ import annotations

from typing import Any


def compute_score(
    data_source: str, solution_str: str, ground_truth: Any, extra_info: Any = None, **kwargs: Any
) -> float:
    """Fraction of the response's non-whitespace characters that are digits (0 for an empty one)."""
    characters = [c for c in solution_str if not c.isspace()]
    if not characters:
        return 0.0
    return sum(c.isdigit() for c in characters) / len(characters)
