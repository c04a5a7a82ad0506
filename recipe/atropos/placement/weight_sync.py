"""verl's weight-sync manager for rollout servers on their own devices (`rollout_placement: separate`).

verl's seam, as in colocated trajectory mode (trajectory/weight_sync.py):
`actor_rollout_ref.rollout.checkpoint_manager_class`, which verl's separated trainer
(`SeparateRayPPOTrainer.init_workers`) builds. Here:

- `sleep_replicas` (which `fit()` calls after each step's generation) does nothing: the servers do
  not share the actor's devices, and environments keep generating through the gateway while the
  actor computes log-probs and updates;
- `update_weights` (after each update) closes the gateway, waits for requests in flight to finish,
  starts again any server that died (placement/restarts.py), runs verl's own sync (abort, a process
  group between actor rank 0 and the rollout workers, send and receive through
  `checkpoint_engine.backend`, resume), and opens the gateway on the new version. What it returns
  verl adds to the step's metrics (`SeparateRayPPOTrainer._fit_update_weights`):

  - `atropos/async/weight_sync_s`: verl's sync alone;
  - `atropos/async/gateway_paused_s`: the gateway closed (drain, restarts, sync);
  - `atropos/async/drain_s`: waiting for requests in flight when it closed;
  - `atropos/async/update_served_fraction`: the share of the step's actor update during which the
    gateway had a request in flight (trajectory/activity.py), i.e. generation overlapping training;
  - `atropos/async/server_restarts`: servers started again since the run began.
"""

from __future__ import annotations

import asyncio
import time

from verl.checkpoint_engine import CheckpointEngineManager
from verl.utils.ray_utils import auto_await

from recipe.atropos.placement.restarts import RolloutRestarts
from recipe.atropos.trajectory.gateway import PolicyGateway

CLASS_PATH = f"{__name__}.SeparatedCheckpointEngineManager"


class SeparatedCheckpointEngineManager(CheckpointEngineManager):
    gateway: PolicyGateway | None = None
    restarts: RolloutRestarts | None = None
    # The last actor update, (start, end) in time.monotonic() seconds (set by the trainer).
    update_window: tuple[float, float] | None = None

    @auto_await
    async def sleep_replicas(self):
        return None  # on devices of their own: they keep serving the environments

    @auto_await
    async def update_weights(self, global_steps: int | None = None):
        closed = time.monotonic()
        if self.gateway is not None:
            await asyncio.to_thread(self.gateway.close_and_drain)
        drained = time.monotonic()
        served = self._served_fraction()  # every request of the update has finished (drained)
        if self.restarts is not None:
            dead = await asyncio.to_thread(self.restarts.dead_replicas)
            if dead:
                await self.restarts.restart(dead)
        synced_from = time.monotonic()
        sync_metrics = await super().update_weights(global_steps)
        synced = time.monotonic()
        if self.gateway is not None:
            self.gateway.open(global_steps)
        metrics = {
            **(sync_metrics or {}),
            "atropos/async/weight_sync_s": synced - synced_from,
            "atropos/async/gateway_paused_s": time.monotonic() - closed,
            "atropos/async/drain_s": drained - closed,
            "atropos/async/server_restarts": float(self.restarts.restarts if self.restarts is not None else 0),
        }
        if served is not None:
            metrics["atropos/async/update_served_fraction"] = served
        return metrics

    def _served_fraction(self) -> float | None:
        if self.gateway is None or self.update_window is None:
            return None
        start, end = self.update_window
        self.update_window = None
        return self.gateway.activity.busy_fraction(start, end)

    def restart_if_dead(self) -> None:
        """Between polls while the trainer waits for a batch: a dead server would leave environments
        nothing to generate with, so it is started again now, with the weights the others hold."""
        if self.restarts is None or not self.restarts.dead_replicas():
            return
        version = self.gateway.global_steps if self.gateway is not None else None
        self.update_weights(version)  # closes the gateway, restarts, syncs the current weights, opens
