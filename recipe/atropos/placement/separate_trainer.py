"""`SeparateGRPOAtroposTrainer`: the recipe's trainer with its rollout servers on a pool of their own.

Chosen by `trainer.atropos.rollout_placement: separate` (`RayGRPOAtroposTrainer.__new__`). It is
`RayGRPOAtroposTrainer` (every hook of trajectory mode, unchanged) on verl's separation seam,
`verl.experimental.separation.ray_trainer.SeparateRayPPOTrainer` (MRO: this class,
RayGRPOAtroposTrainer, SeparateRayPPOTrainer, RayPPOTrainer), whose `init_workers` and `fit()` are
verl's. Only the slots verl's separated trainer leaves to a subclass are filled:

- `_create_actor_rollout_classes`: the legacy TaskRunner's actor worker class, with role `actor`
  (no rollout engine in it), under the name verl's `_init_models` looks for (`actor_rollout`); a
  reference policy, when one is needed, is a `ref` worker beside it (`_create_reference_policy_class`);
- `_init_async_rollout_manager`: verl's `LLMServerManager.create(config)` without a worker group,
  i.e. standalone replicas on `rollout_pool_<rank>` (`actor_rollout_ref.rollout.nnodes` x
  `n_gpus_per_node`), as verl's one-step-off trainer does, and verl's `AgentLoopManager` on them,
  which validation uses (trajectory mode's manager pulls training batches from run-api).

Weights go to those servers through `checkpoint_engine.backend` (gloo on CPU, nccl on GPU), by
`SeparatedCheckpointEngineManager` (placement/weight_sync.py), which keeps the policy gateway open
while the actor trains. Each actor update's time window is recorded for the step's metrics
(`atropos/async/...`, docs/async.md).
"""

from __future__ import annotations

import logging
import math
import time

import ray

from verl import DataProto
from verl.experimental.separation.ray_trainer import SeparateRayPPOTrainer
from verl.single_controller.ray import RayClassWithInitArgs
from verl.trainer.ppo.utils import Role
from verl.workers.rollout.llm_server import LLMServerManager

from recipe.atropos.grpo_atropos_trainer import RayGRPOAtroposTrainer
from recipe.atropos.placement.restarts import RolloutRestarts
from recipe.atropos.trajectory.rollout import GENERATED_AT

logger = logging.getLogger("verl.recipe.atropos")
SECTION = "trainer.atropos.rollout_placement=separate"
KEEP_WINDOWS = 64  # actor updates remembered to place samples' generation times


class SeparateGRPOAtroposTrainer(RayGRPOAtroposTrainer, SeparateRayPPOTrainer):
    def __init__(self, *args, config, **kwargs):
        super().__init__(*args, config=config, **kwargs)
        check_rollout_pool_config(self.config)
        if self.use_teacher_policy:
            raise ValueError(f"{SECTION} does not run distillation (a teacher model): set rollout_placement=colocated")
        self._actor_role = Role.ActorRolloutRef if Role.ActorRolloutRef in self.role_worker_mapping else Role.ActorRollout
        if self.use_reference_policy and not self.ref_in_actor:
            # verl's worker has no actor+ref role without a rollout: the reference is a worker of its own.
            self.role_worker_mapping[Role.RefPolicy] = self.role_worker_mapping[self._actor_role]
            self.resource_pool_manager.mapping[Role.RefPolicy] = self.resource_pool_manager.mapping[self._actor_role]
        self.update_windows: list[tuple[float, float]] = []  # wall clock, the last KEEP_WINDOWS updates

    # -- verl's separated trainer's slots ---------------------------------------------------------

    def _create_actor_rollout_classes(self):
        pool = self.resource_pool_manager.get_resource_pool(self._actor_role)
        self.resource_pool_to_cls[pool][str(Role.ActorRollout)] = RayClassWithInitArgs(
            cls=self.role_worker_mapping[self._actor_role], config=self.config.actor_rollout_ref, role=str(Role.Actor)
        )

    def _init_async_rollout_manager(self):
        from verl.experimental.agent_loop import AgentLoopManager

        check_ray_slots(self.config)  # a pool Ray cannot place would wait forever
        self.llm_server_manager = LLMServerManager.create(config=self.config)  # standalone replicas
        self.async_rollout_mode = True
        streams_rewards = not self.use_rm or self.config.reward.reward_model.enable_resource_pool
        self.async_rollout_manager = AgentLoopManager.create(
            config=self.config, llm_client=self.llm_server_manager.get_client(),
            reward_loop_worker_handles=self.reward_loop_manager.reward_loop_workers if streams_rewards else None,
        )

    # -- the recipe's part ------------------------------------------------------------------------

    def init_workers(self):
        super().init_workers()
        manager = self.checkpoint_manager
        manager.restarts = RolloutRestarts(self.llm_server_manager, self.atropos_mode.gateway)
        self.atropos_mode.rollout.idle_hook = manager.restart_if_dead
        logger.warning("%s: %d rollout server(s) on their own pool: %s", SECTION,
                       len(self.llm_server_manager.get_replicas()), self.llm_server_manager.get_addresses())

    def fit(self):
        try:
            return super().fit()
        finally:
            self._shutdown_dump_executor()  # verl's separated fit() leaves the last rollout dump queued

    def _update_actor(self, batch: DataProto) -> DataProto:
        started, started_at = time.monotonic(), time.time()
        output = super()._update_actor(batch)
        finished, finished_at = time.monotonic(), time.time()
        self.checkpoint_manager.update_window = (started, finished)
        output.meta_info["metrics"].update({
            "atropos/async/update_started_at": started_at,
            "atropos/async/update_finished_at": finished_at,
            **generated_during_updates(batch.non_tensor_batch.get(GENERATED_AT), self.update_windows),
        })
        self.update_windows = [*self.update_windows, (started_at, finished_at)][-KEEP_WINDOWS:]
        return output


def generated_during_updates(generated_at_B, windows: list[tuple[float, float]]) -> dict[str, float]:
    """``atropos/async/generated_during_update_fraction``: the share of the batch's samples whose
    completion the gateway recorded while an earlier actor update ran (NaN times are not counted)."""
    if generated_at_B is None:
        return {}
    times = [float(t) for t in generated_at_B if not math.isnan(float(t))]
    if not times:
        return {}
    during = sum(any(a <= t <= b for a, b in windows) for t in times)
    return {"atropos/async/generated_during_update_fraction": during / len(times)}


def check_rollout_pool_config(config) -> None:
    """What separate placement needs from verl's config, each refused with the key and the fix."""
    rollout = config.actor_rollout_ref.rollout
    if int(rollout.get("nnodes") or 0) < 1 or int(rollout.get("n_gpus_per_node") or 0) < 1:
        raise ValueError(
            f"{SECTION} runs the rollout servers on a resource pool of their own: set "
            f"actor_rollout_ref.rollout.nnodes and actor_rollout_ref.rollout.n_gpus_per_node to its size (>= 1; on CPU, "
            f"one process per logical GPU slot); got nnodes={rollout.get('nnodes')}, "
            f"n_gpus_per_node={rollout.get('n_gpus_per_node')}"
        )
    backend = rollout.checkpoint_engine.backend
    if backend == "naive":
        raise ValueError(
            f"{SECTION} sends weights to another process: set actor_rollout_ref.rollout.checkpoint_engine.backend "
            f"to gloo (CPU) or nccl (GPU); got {backend!r}, which only works inside the actor's own process"
        )
    if rollout.name in ("vllm", "sglang") and rollout.get("free_cache_engine", False):
        raise ValueError(
            f"{SECTION} keeps the rollout servers awake (environments generate while the actor trains): set "
            f"actor_rollout_ref.rollout.free_cache_engine=false (as verl's one_step_off_policy configs do)"
        )


def check_ray_slots(config) -> None:
    """Ray must hold the trainer's and the rollout's device slots at once."""
    trainer, rollout = config.trainer, config.actor_rollout_ref.rollout
    needed = trainer.nnodes * trainer.n_gpus_per_node + rollout.nnodes * rollout.n_gpus_per_node
    resource = "NPU" if "NPU" in ray.cluster_resources() else "GPU"
    have = ray.cluster_resources().get(resource, 0)
    if have < needed:
        raise ValueError(
            f"{SECTION} needs {needed} {resource} slots (trainer.nnodes x n_gpus_per_node + "
            f"actor_rollout_ref.rollout.nnodes x n_gpus_per_node), Ray has {have:g}: add devices, or on CPU set "
            f"ray_kwargs.ray_init.num_gpus={needed}"
        )
