"""verl's own vLLM rollout (`rollout.name=vllm`) on vLLM's CPU build: the one gap verl leaves on CPU.

Everything runs as verl wrote it: `vLLMReplica` starts `vLLMHttpServer` actors, which run vLLM's
engine and OpenAI server; the FSDP workers' `ServerAdapter` sends every weight update through
`BucketedWeightSender`/`BucketedWeightReceiver` over shared memory (the CPU platform answers
`is_ipc_supported() = False`); sleep mode is off (config/cpu/vllm.yaml). What differs on CPU:

vLLM's CPU linear layers drop their weights once packed for oneDNN, so verl's weight sync has
nothing to load into (patches.VLLM_WORKER_PATCHES says why). That patch must run in vLLM's worker
processes, before the model loads; verl chooses the class vLLM's workers extend through a hook method,
`vLLMHttpServer._get_worker_extension_cls`, so the worker extension below (verl's own, unchanged)
applies it when vLLM builds its worker. The server and replica subclasses exist only to name that
extension; `rollout.register_cpu_vllm_rollout` registers the replica under "vllm" in verl's
`RolloutReplicaRegistry` when CPU mode is selected, so the Ray actor names, the worker-side adapter
and every method stay verl's.

This module imports vLLM: only the registry's loader imports it, when a run asks for rollout.name=vllm.
"""

from __future__ import annotations

from typing import Any

import ray
from vllm import __version__ as vllm_version

from verl.workers.rollout.vllm_rollout.utils import vLLMColocateWorkerExtension
from verl.workers.rollout.vllm_rollout.vllm_async_server import vLLMHttpServer, vLLMReplica

from recipe.atropos.cpu.patches import VLLM_WORKER_PATCHES, apply_patches

EXTENSION_PATH = f"{__name__}.CPUColocateWorkerExtension"


class CPUColocateWorkerExtension(vLLMColocateWorkerExtension):
    """verl's vLLM worker extension; building it applies the vLLM worker patches in this process."""

    def __new__(cls, **kwargs: Any):
        apply_patches(VLLM_WORKER_PATCHES)
        return super().__new__(cls, **kwargs)


class CPUvLLMHttpServer(vLLMHttpServer):
    """verl's vLLM server actor, with the CPU worker extension."""

    def _get_worker_extension_cls(self) -> str:
        return EXTENSION_PATH

    async def launch_server(self, *args: Any, **kwargs: Any) -> None:
        await super().launch_server(*args, **kwargs)
        if self.node_rank == 0:
            # verl runs vLLM with VLLM_LOGGING_LEVEL=WARN: say once where its engine serves the policy.
            host, port = self.get_server_address()
            print(
                f"vLLM {vllm_version} engine (CPU) serving {self.model_config.local_path} for replica "
                f"{self.replica_rank}: OpenAI API at http://{host}:{port}/v1",
                flush=True,
            )


class CPUvLLMReplica(vLLMReplica):
    """verl's vLLM replica, starting `CPUvLLMHttpServer` actors (same names, same launch)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.server_class = ray.remote(CPUvLLMHttpServer)
