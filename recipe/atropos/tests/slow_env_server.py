"""A slow environment for the service tests, served by the real service (`serve`, as any environment).

It judges like an environment that asks a remote model: each `score` waits `--env.delay_s`
seconds without holding the GIL, then scores every response 1.0.

    python recipe/atropos/tests/slow_env_server.py serve --slurm false --port P --env.delay_s 1.5
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file path: put the repo root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import numpy as np  # noqa: E402
from pydantic import Field  # noqa: E402

from recipe.atropos.environments.advantages import compute_grpo_outcome_advantages_np  # noqa: E402
from recipe.atropos.environments.base import EnvConfig, Environment, ScoredBatch  # noqa: E402
from recipe.atropos.environments.service import main  # noqa: E402


class SlowConfig(EnvConfig):
    delay_s: float = Field(1.5, ge=0, description="seconds each evaluation waits before scoring")


class SlowEnvironment(Environment):
    name = "slow"
    Config = SlowConfig

    def score(self, request):
        time.sleep(self.config.delay_s)
        return ScoredBatch(np.ones(request.batch_size), [{} for _ in range(request.batch_size)])

    def compute_advantages(self, request, scored):
        return [float(a) for a in compute_grpo_outcome_advantages_np(scored.scores_B, request.group_ids)]


if __name__ == "__main__":
    sys.exit(main(SlowEnvironment, prog="slow_env_server.py"))
