"""`torch.cpu`, plus the accelerator calls verl makes on its device module, answered for a machine without one.

verl reaches its device through `get_torch_device()` (the platform's `device_module`) and calls the
CUDA allocator API on it: `memory_reserved()`, `mem_get_info()`, `empty_cache()`, `ipc_collect()`...
`torch.cpu` has none of them. This module is what the CPU platform hands verl instead: every memory
statistic is 0 (there is no device memory to account for), cache and allocator calls do nothing, and
every other name is `torch.cpu`'s own (`is_available`, `current_device`, `synchronize`, `Stream`...).
"""

from __future__ import annotations

from typing import Any

import torch


def memory_allocated(device: Any = None) -> int:
    return 0


def memory_reserved(device: Any = None) -> int:
    return 0


def max_memory_allocated(device: Any = None) -> int:
    return 0


def max_memory_reserved(device: Any = None) -> int:
    return 0


def mem_get_info(device: Any = None) -> tuple[int, int]:
    """(free, total) device memory: none on CPU."""
    return 0, 0


def reset_peak_memory_stats(device: Any = None) -> None:
    return None


def reset_accumulated_memory_stats(device: Any = None) -> None:
    return None


def empty_cache() -> None:
    return None


def ipc_collect() -> None:
    return None


def set_per_process_memory_fraction(fraction: float, device: Any = None) -> None:
    return None


def manual_seed(seed: int) -> None:
    torch.manual_seed(seed)


def manual_seed_all(seed: int) -> None:
    torch.manual_seed(seed)


def get_rng_state(device: Any = None) -> torch.Tensor:
    return torch.get_rng_state()


def set_rng_state(new_state: torch.Tensor, device: Any = None) -> None:
    torch.set_rng_state(new_state)


def get_device_name(device: Any = None) -> str:
    return "cpu"


def __getattr__(name: str) -> Any:
    # Everything else is torch.cpu's (PEP 562 module fallback).
    return getattr(torch.cpu, name)
