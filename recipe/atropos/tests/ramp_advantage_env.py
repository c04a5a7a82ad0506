"""The repo's atroposlib GSM8K environment, sending advantages no GRPO computation would give.

Trained token j of every answer (j counted over the tokens whose mask is not -100) gets
``ramp(j) = 0.25 - 0.01 * j``: a trainer that used these advantages has them token by token in its
rollout dump; one that fell back to GRPO has a constant per answer. Same CLI as the real one.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file path: put the repo root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from recipe.atropos.environments.atropos_gsm8k_env import AtroposGSM8KEnv  # noqa: E402
from recipe.atropos.protocol import IGNORE_INDEX  # noqa: E402


def ramp(num_trained_tokens: int) -> list[float]:
    return [0.25 - 0.01 * j for j in range(num_trained_tokens)]


def ramp_advantages(masks: list[list[int]]) -> list[list[float]]:
    """Aligned with the tokens: ramp over the trained positions, 0 elsewhere."""
    out = []
    for mask in masks:
        values = iter(ramp(sum(m != IGNORE_INDEX for m in mask)))
        out.append([next(values) if m != IGNORE_INDEX else 0.0 for m in mask])
    return out


class RampAdvantageEnv(AtroposGSM8KEnv):
    name = "gsm8k_ramp_advantages"

    async def collect_trajectories(self, item):
        group, backlog = await super().collect_trajectories(item)
        group["advantages"] = ramp_advantages(group["masks"])
        return group, backlog


if __name__ == "__main__":
    RampAdvantageEnv.cli()
