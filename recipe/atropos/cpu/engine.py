"""verl's FSDP2 training engines, registered for device "cpu" in verl's `EngineRegistry`.

verl registers its FSDP engines for devices "cuda" and "npu" only, and picks an engine by the
platform's device name. The engine code itself is device-agnostic (it asks the platform for its
device), so CPU mode registers the same classes under "cpu". Only "fsdp2": FSDP1 insists on an
accelerator (`Cannot access accelerator device`), so `strategy=fsdp` fails with verl's own
"No engine registered" error instead of deep inside torch.
"""

from __future__ import annotations

CPU_DEVICE = "cpu"
CPU_STRATEGY = "fsdp2"

_registered = False


def register_cpu_engines() -> None:
    """Register verl's FSDP2 actor and critic engines for device "cpu" (once per process)."""
    global _registered
    if _registered:
        return
    from verl.workers.engine.base import EngineRegistry
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead, FSDPEngineWithValueHead

    EngineRegistry.register(model_type="language_model", backend=CPU_STRATEGY, device=CPU_DEVICE)(FSDPEngineWithLMHead)
    EngineRegistry.register(model_type="value_model", backend=CPU_STRATEGY, device=CPU_DEVICE)(FSDPEngineWithValueHead)
    _registered = True
