"""The "hf" rollout backend as verl sees it: worker-side adapter, driver-side replica, registration.

verl picks a rollout backend by `actor_rollout_ref.rollout.name` (mode "async") in two registries:

- worker side, `verl.workers.rollout.base._ROLLOUT_REGISTRY[(name, "async")]`: the `BaseRollout`
  built inside each FSDP worker. `HFServerAdapter` holds no model; after every actor update verl
  (`checkpoint_engine.backend=naive`) calls its `update_weights` with the actor's full tensors, which
  it forwards, in buckets, to its replica's server actor.
- driver side, `RolloutReplicaRegistry`: `HFRolloutReplica.launch_servers` starts the server actor
  (`hf_server.HFRolloutServer`) next to the replica's worker; verl's agent loop reaches it through the
  replica's `server_handle`, environments through `server_address` (the OpenAI endpoint, which
  `LLMServerManager.get_addresses()` lists and logs).

The HF rollout does not shard a model: one server per worker (tensor/data/pipeline parallel size 1).

`register_cpu_vllm_rollout` points verl's "vllm" replica entry at `cpu/vllm_rollout.py` (verl's own
vLLM replica and server, with the one CPU gap filled), loaded only when a run asks for it.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import ray
import torch

from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.replica import RolloutMode, RolloutReplica
from verl.workers.rollout.utils import ensure_async_iterator

from recipe.atropos.cpu.hf_server import ROLLOUT_NAME, HFRolloutServer, server_actor_name

ADAPTER_PATH = f"{__name__}.HFServerAdapter"
UNSHARDED_ONLY = (
    f"rollout.name={ROLLOUT_NAME} runs one unsharded model per worker: "
    "set rollout.tensor_model_parallel_size, data_parallel_size and pipeline_model_parallel_size to 1"
)


def _rollout_world_size(config: Any) -> int:
    return config.tensor_model_parallel_size * config.data_parallel_size * config.pipeline_model_parallel_size


class HFServerAdapter(BaseRollout):
    """In the FSDP worker: sends the actor's weights to this rank's HF rollout server."""

    def __init__(self, config: Any, model_config: Any, device_mesh: Any, replica_rank: int = -1, **kwargs: Any):
        super().__init__(config, model_config, device_mesh)
        if _rollout_world_size(self.config) != 1:
            raise ValueError(UNSHARDED_ONLY)
        rank = int(os.environ.get("RANK", 0))
        self.replica_rank = rank if replica_rank == -1 else replica_rank
        self.bucket_bytes = int(self.config.checkpoint_engine.update_weights_bucket_megabytes) << 20
        self._server: ray.actor.ActorHandle | None = None

    def _server_handle(self) -> ray.actor.ActorHandle:
        # The server starts after the workers (LLMServerManager), so it is looked up when weights
        # come; again at every sync: a server that died was started again under the same name.
        self._server = ray.get_actor(server_actor_name(self.replica_rank))
        return self._server

    async def resume(self, tags: list[str]) -> None:
        return None  # weights and cache stay in CPU memory

    async def release(self) -> None:
        return None

    async def update_weights(
        self,
        weights: Generator[tuple[str, torch.Tensor], None, None],
        wire_format: str = "named_tensors",
        global_steps: int | None = None,
        peft_config: dict | None = None,
        **kwargs: Any,
    ) -> None:
        """Forward `weights` (HF names, full tensors) to the server, which swaps them in at once."""
        if wire_format != "named_tensors":
            raise NotImplementedError(
                f"rollout.name={ROLLOUT_NAME} takes wire_format='named_tensors', got {wire_format!r}"
            )
        if peft_config is not None:
            raise NotImplementedError(
                f"rollout.name={ROLLOUT_NAME} takes merged weights only: set model.lora.merge=true"
            )
        server = self._server_handle()
        bucket: list[tuple[str, torch.Tensor]] = []
        bucket_bytes = 0
        # Consume the whole generator: producing a full tensor may be a collective across ranks.
        # (A plain generator from the actor colocated with it; an async one from a checkpoint
        # engine when the server runs on a pool of its own.)
        async for name, tensor in ensure_async_iterator(weights):
            tensor = tensor.detach().to("cpu").contiguous()  # Ray copies it when the bucket is sent
            bucket.append((name, tensor))
            bucket_bytes += tensor.numel() * tensor.element_size()
            if bucket_bytes >= self.bucket_bytes:
                await server.receive_weights.remote(bucket)
                bucket, bucket_bytes = [], 0
        await server.commit_weights.remote(bucket, global_steps)


class HFRolloutReplica(RolloutReplica):
    """On the driver: one HF rollout server per replica, beside the replica's worker: the actor's
    FSDP worker (hybrid), or verl's `CheckpointEngineWorker` on the replica's own resource pool
    (standalone, `trainer.atropos.rollout_placement: separate`). Called again, `launch_servers`
    starts a new server (one that died is replaced)."""

    async def launch_servers(self) -> None:
        if self.rollout_mode not in (RolloutMode.HYBRID, RolloutMode.STANDALONE):
            raise NotImplementedError(
                f"rollout.name={ROLLOUT_NAME} runs beside the actor's worker (hybrid) or on a pool of its own "
                f"(standalone), not {self.rollout_mode}"
            )
        if self.world_size != 1 or len(self.workers) != 1:
            raise ValueError(UNSHARDED_ONLY)
        node_id = await self.workers[0].__ray_call__.remote(lambda worker: ray.get_runtime_context().get_node_id())
        server = (
            ray.remote(HFRolloutServer)
            .options(
                name=server_actor_name(self.replica_rank),
                scheduling_strategy=ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
                    node_id=node_id, soft=False
                ),
                max_concurrency=self.max_concurrency,
                num_cpus=0,
            )
            .remote(config=self.config, model_config=self.model_config, replica_rank=self.replica_rank)
        )
        self._server_address = await server.launch.remote()
        self._server_handle = server
        self.servers = [server]

    def openai_base_url(self) -> str:
        """Where environments reach this replica's policy: `http://host:port/v1`."""
        return f"http://{self.server_address}/v1"


def _load_replica_class() -> type[HFRolloutReplica]:
    return HFRolloutReplica


def register_hf_rollout() -> None:
    """Make `actor_rollout_ref.rollout.name=hf` resolve in verl's two rollout registries."""
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    from recipe.atropos.cpu.patches import register_worker_rollout

    register_worker_rollout(ROLLOUT_NAME, ADAPTER_PATH)
    RolloutReplicaRegistry.register(ROLLOUT_NAME, _load_replica_class)


VLLM_ROLLOUT_NAME = "vllm"


def _load_cpu_vllm_replica() -> type:
    from recipe.atropos.cpu.vllm_rollout import CPUvLLMReplica

    return CPUvLLMReplica


def register_cpu_vllm_rollout() -> None:
    """`rollout.name=vllm` in CPU mode: verl's vLLM replica with the CPU worker extension
    (cpu/vllm_rollout.py). The worker side stays verl's `ServerAdapter`."""
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    RolloutReplicaRegistry.register(VLLM_ROLLOUT_NAME, _load_cpu_vllm_replica)
