"""The recipe's integration API in one import: the environment client, its errors, and the computer
that turns an environment's answer into GRPO advantages.

    from recipe.atropos.atropos_integration import AtroposEnvironmentClient, AtroposGRPOComputer

Each piece lives in a module of its own (client.py, grpo_computer.py, advantages.py).
"""

from recipe.atropos.advantages import compute_grpo_outcome_advantages_np, compute_grpo_process_advantages
from recipe.atropos.client import (
    AtroposAPIError,
    AtroposEnvironmentClient,
    AtroposProtocolError,
    AtroposRequestError,
    AtroposUnavailableError,
    ClientStats,
    EvaluationResult,
    TrajectoryInfo,
    TrajectoryStatus,
)
from recipe.atropos.grpo_computer import AdvantageOutput, AdvantageOverrides, AtroposGRPOComputer, advantage_metrics

__all__ = [
    "AdvantageOutput",
    "AdvantageOverrides",
    "AtroposAPIError",
    "AtroposEnvironmentClient",
    "AtroposGRPOComputer",
    "AtroposProtocolError",
    "AtroposRequestError",
    "AtroposUnavailableError",
    "ClientStats",
    "EvaluationResult",
    "TrajectoryInfo",
    "TrajectoryStatus",
    "advantage_metrics",
    "compute_grpo_outcome_advantages_np",
    "compute_grpo_process_advantages",
]
