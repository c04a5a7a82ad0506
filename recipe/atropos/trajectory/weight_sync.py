"""verl's weight-sync manager, closing the policy gateway around every weight replacement.

verl's seam: `actor_rollout_ref.rollout.checkpoint_manager_class` names the CheckpointEngineManager
that `fit()` calls to put the rollout replicas to sleep after generation (`sleep_replicas`) and to
load new weights and wake them (`update_weights`). The trainer sets it to this class in trajectory
mode and attaches its `PolicyGateway`; environments' requests then never reach a sleeping server or
one with half-loaded weights: they wait at the gateway and are answered by the new weights.
"""

from __future__ import annotations

import asyncio

from verl.checkpoint_engine import CheckpointEngineManager
from verl.utils.ray_utils import auto_await

from recipe.atropos.trajectory.gateway import PolicyGateway

CLASS_PATH = f"{__name__}.GatedCheckpointEngineManager"


class GatedCheckpointEngineManager(CheckpointEngineManager):
    gateway: PolicyGateway | None = None

    @auto_await
    async def sleep_replicas(self):
        if self.gateway is not None:
            await asyncio.to_thread(self.gateway.close_and_drain)
        return await super().sleep_replicas()

    @auto_await
    async def update_weights(self, global_steps: int | None = None):
        result = await super().update_weights(global_steps)
        if self.gateway is not None:
            self.gateway.open(global_steps)
        return result
