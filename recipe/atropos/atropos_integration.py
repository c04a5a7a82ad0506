"""The recipe's integration API in one import (a shim for the seed's module name): the clients,
their errors, and the computer that turns an environment's answer into GRPO advantages.

    from recipe.atropos.atropos_integration import AtroposEnvironmentClient, AtroposGRPOComputer

Each piece lives in a module of its own (evaluate/client.py, trajectory/runapi_client.py, errors.py,
datatypes.py, grpo_computer.py, environments/advantages.py).
"""

from recipe.atropos.environments.advantages import compute_grpo_outcome_advantages_np, compute_grpo_process_advantages
from recipe.atropos.datatypes import ClientStats, EvaluationResult, InvalidSample, TrajectoryInfo, TrajectoryStatus
from recipe.atropos.errors import AtroposAPIError, AtroposProtocolError, AtroposRequestError, AtroposUnavailableError
from recipe.atropos.evaluate.client import AtroposEnvironmentClient
from recipe.atropos.grpo_computer import AdvantageOutput, AdvantageOverrides, AtroposGRPOComputer, advantage_metrics
from recipe.atropos.trajectory.runapi_client import AtroposRunAPIClient

__all__ = [
    "AdvantageOutput",
    "AdvantageOverrides",
    "AtroposAPIError",
    "AtroposEnvironmentClient",
    "AtroposGRPOComputer",
    "AtroposProtocolError",
    "AtroposRequestError",
    "AtroposRunAPIClient",
    "AtroposUnavailableError",
    "ClientStats",
    "EvaluationResult",
    "InvalidSample",
    "TrajectoryInfo",
    "TrajectoryStatus",
    "advantage_metrics",
    "compute_grpo_outcome_advantages_np",
    "compute_grpo_process_advantages",
]
