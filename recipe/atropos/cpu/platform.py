"""verl's "cpu" platform: what verl asks its platform, answered for a machine with no accelerator.

Registered in verl's own `PlatformRegistry` under the name "cpu" and chosen with `VERL_PLATFORM=cpu`
(never by auto-detection: a machine whose GPU is merely invisible to one process must not silently
train on CPU). What it answers:

- device "cpu", device module `recipe.atropos.cpu.device` (torch.cpu plus zeroed memory statistics);
- collectives over gloo;
- Ray resource "GPU": verl's resource pools and `_check_resource_available` count "GPU" (or "NPU")
  slots only, so a CPU run declares logical GPUs to Ray (`ray_init.num_gpus`), one per worker. Ray
  sets `CUDA_VISIBLE_DEVICES` for them, which a CPU build of torch ignores;
- no IPC, no profiler, no CUDA runtime: verl's vLLM rollout then sends weights to vLLM through
  shared memory (`ServerAdapter.use_shm = not is_support_ipc()`);
- vLLM's CPU settings for the rollout servers verl starts (`rollout_env_vars`, which verl passes to
  each vLLM server actor's environment): a KV-cache size (vLLM's default fraction of memory fails on
  these machines) and one OpenMP thread per engine, unbound (see `VLLM_CPU_ENV`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import torch

from verl.plugin.platform.platform_base import PlatformBase

PLATFORM_NAME = "cpu"

# vLLM CPU settings for verl's vLLM rollout servers; a value already in the environment wins.
# - VLLM_CPU_KVCACHE_SPACE (GiB): vLLM on CPU sizes its KV cache from this, not from
#   rollout.gpu_memory_utilization; 1 GiB holds thousands of tiny-model sequences.
# - VLLM_CPU_OMP_THREADS_BIND=nobind, VLLM_CPU_NUM_OF_RESERVED_CPU=0: the engine shares a few cores
#   with the trainer's workers; pinning its threads to them starves the workers.
VLLM_CPU_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
}


class PlatformCPU(PlatformBase):
    """verl platform for CPU-only machines (register with `register_cpu_platform`)."""

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> ModuleType:
        from recipe.atropos.cpu import device

        return device

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check: bool = False) -> bool:
        # Explicit selection only (VERL_PLATFORM=cpu), never auto-detected.
        return False

    def current_device(self) -> str:  # type: ignore[override]
        # verl passes this to `.to(...)`/`torch.device(...)`; an int would mean "cuda:<int>".
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: Any) -> None:
        return None

    def synchronize(self, device_index: Any = None) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def get_device_capability(self, device_index: int = 0) -> tuple[None, None]:
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        # What Ray sets for the logical "GPU" slots this platform requests.
        return "CUDA_VISIBLE_DEVICES"

    @contextlib.contextmanager
    def nvtx_range(self, msg: str) -> Iterator[None]:
        yield

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    def ray_resource_name(self) -> str:
        return "GPU"

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def rollout_env_vars(self) -> dict[str, str]:
        return {name: os.environ.get(name, default) for name, default in VLLM_CPU_ENV.items()}

    def cudart(self) -> None:
        return None


def register_cpu_platform() -> type[PlatformCPU]:
    """Add the "cpu" platform to verl's registry (idempotent)."""
    from verl.plugin.platform.platform_manager import PlatformRegistry

    if PlatformRegistry.get(PLATFORM_NAME) is not PlatformCPU:
        PlatformRegistry.register(platform=PLATFORM_NAME)(PlatformCPU)
    return PlatformCPU
