"""Every change to verl's own objects that CPU mode needs, because verl offers no seam for it.

Everything else CPU mode needs goes through verl's registries (platform, training engine, rollout)
and lives beside this module. What is here replaces a name inside a verl module with a thin wrapper
or subclass of verl's/torch's own object; no verl function body is copied. Each patch says which seam
verl lacks, so that it can go once verl grows one. They are applied once per process, by
`recipe.atropos.cpu.activate()` (imported through `VERL_USE_EXTERNAL_MODULES` while verl's
`__init__` runs, i.e. before any module that binds these names by `from ... import`).

Fragile across verl versions by nature: `test_cpu_mode.py` checks that every target still exists.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from torch.distributed.fsdp import CPUOffloadPolicy

GLOO_BACKEND = "gloo"


@dataclass(frozen=True)
class Patch:
    """One replaced name: `module.attribute` becomes `build(original)`."""

    module: str
    attribute: str
    build: Callable[[Any], Any]
    missing_seam: str
    # Also replace it in verl modules that bound it by `from module import attribute` before this ran.
    rebind_imports: bool = False


def _gloo_process_group(original: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(original)
    def initialize_global_process_group_ray(timeout_second: Any = None, backend: str | None = None) -> None:
        original(timeout_second=timeout_second, backend=backend or GLOO_BACKEND)

    return initialize_global_process_group_ray


class UnpinnedCPUOffloadPolicy(CPUOffloadPolicy):
    """torch's FSDP2 `CPUOffloadPolicy`, never pinning memory: pinning needs an accelerator."""

    def __init__(self, pin_memory: bool = True) -> None:
        super().__init__(pin_memory=False)


def _unpinned_offload_policy(original: type) -> type:
    if not issubclass(UnpinnedCPUOffloadPolicy, original):
        raise TypeError(f"verl's CPUOffloadPolicy is {original!r}, not torch's FSDP2 policy")
    return UnpinnedCPUOffloadPolicy


PATCHES: tuple[Patch, ...] = (
    Patch(
        module="verl.utils.distributed",
        attribute="initialize_global_process_group_ray",
        build=_gloo_process_group,
        missing_seam=(
            "verl builds the process-group backend itself as f'cpu:gloo,{device}:{backend}'; no platform "
            "hook gives the whole string, and for device 'cpu' torch rejects 'cpu:gloo,cpu:gloo' as a "
            "duplicate. The wrapper passes plain 'gloo' when the caller names no backend."
        ),
        rebind_imports=True,
    ),
    Patch(
        module="verl.workers.engine.fsdp.transformer_impl",
        attribute="CPUOffloadPolicy",
        build=_unpinned_offload_policy,
        missing_seam=(
            "FSDPEngine._build_fsdp_module hard-codes CPUOffloadPolicy(pin_memory=True) for the reference "
            "model (forward_only) and for fsdp_config.offload_policy; no config or platform hook sets "
            "pin_memory, and pinning fails without an accelerator."
        ),
    ),
)


def _keep_linear_weights(original: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(original)
    def dispatch_cpu_unquantized_gemm(layer: Any, remove_weight: bool) -> None:
        original(layer, remove_weight=False)

    return dispatch_cpu_unquantized_gemm


# Applied only in vLLM's worker processes (by cpu/vllm_rollout.py's worker extension), where vLLM is
# loaded anyway; nothing else in CPU mode imports vLLM.
VLLM_WORKER_PATCHES: tuple[Patch, ...] = (
    Patch(
        module="vllm.model_executor.layers.utils",
        attribute="dispatch_cpu_unquantized_gemm",
        build=_keep_linear_weights,
        missing_seam=(
            "vLLM's CPU linear layers (UnquantizedLinearMethod.process_weights_after_loading) pack each "
            "weight for oneDNN and replace layer.weight with an empty tensor, so verl's weight sync "
            "(model.load_weights) fails: 'Attempted to load weight (torch.Size([64, 64])) into parameter "
            "(torch.Size([0]))'. Neither vLLM nor verl has a switch to keep reloadable weights; kept, verl's "
            "process_weights_after_loading after every sync packs the new weights again."
        ),
    ),
)


def _verl_modules_binding(obj: Any) -> list[tuple[ModuleType, str]]:
    """Every loaded verl module attribute bound to `obj` (catches `from X import name` done earlier)."""
    bound = []
    for module_name, module in list(sys.modules.items()):
        namespace = getattr(module, "__dict__", None)
        if not namespace or not (module_name == "verl" or module_name.startswith("verl.")):
            continue
        for name, value in list(namespace.items()):
            if value is obj:
                bound.append((module, name))
    return bound


_applied: dict[tuple[str, str], Any] = {}


def apply_patches(patches: tuple[Patch, ...] = PATCHES) -> dict[tuple[str, str], Any]:
    """Apply every patch once in this process; return {(module, attribute): original} of all applied."""
    import importlib

    for patch in patches:
        key = (patch.module, patch.attribute)
        if key in _applied:
            continue
        module = importlib.import_module(patch.module)
        original = getattr(module, patch.attribute)
        replacement = patch.build(original)
        holders = _verl_modules_binding(original) if patch.rebind_imports else []
        for holder, name in [(module, patch.attribute), *holders]:
            setattr(holder, name, replacement)
        _applied[key] = original
    return dict(_applied)


def register_worker_rollout(name: str, adapter_path: str) -> None:
    """Add a worker-side rollout class (dotted path) for `rollout.name=name`, mode "async".

    Missing seam: verl's worker-side rollout registry is the private module dict
    `verl.workers.rollout.base._ROLLOUT_REGISTRY`, read by `get_rollout_class`, with no register
    function (the driver-side `RolloutReplicaRegistry` has one).
    """
    from verl.workers.rollout import base as rollout_base

    rollout_base._ROLLOUT_REGISTRY[(name, "async")] = adapter_path
