"""CPU mode for verl: train with verl's real trainer on a machine with no accelerator.

Selected by `VERL_PLATFORM=cpu`, with this package loaded in every verl process through
`VERL_USE_EXTERNAL_MODULES=recipe.atropos.cpu` (verl's `__init__` imports it, in Ray workers too).
Importing it then, once per process:

- registers the "cpu" platform in verl's `PlatformRegistry` (`platform.py`): device "cpu", gloo,
  zeroed memory statistics, logical Ray "GPU" slots;
- sets torch to one intra-op thread (`threads.py`, `VERL_CPU_NUM_THREADS`);
- registers verl's FSDP2 engines for device "cpu" (`engine.py`);
- registers the "hf" rollout backend, Hugging Face `generate()` plus an OpenAI endpoint
  (`rollout.py`, `hf_server.py`), and points verl's "vllm" backend at its CPU variant
  (`vllm_rollout.py`: verl's own vLLM replica and server, for vLLM's CPU build);
- registers the "gloo" checkpoint engine (`gloo_checkpoint_engine.py`): weight sync to rollout
  servers on a resource pool of their own (`trainer.atropos.rollout_placement: separate`);
- applies the patches verl has no seam for (`patches.py`).

Without `VERL_PLATFORM=cpu` it only registers the platform and changes nothing else. The settings a
run needs (fsdp2, sdpa, rollout.name=hf, Ray resources, small batches) are in
`recipe/atropos/config/cpu_grpo.yaml`.
"""

from __future__ import annotations

import os

from recipe.atropos.cpu.platform import PLATFORM_NAME, register_cpu_platform

PLATFORM_ENV = "VERL_PLATFORM"


def cpu_mode_selected() -> bool:
    return os.environ.get(PLATFORM_ENV, "").strip().lower() == PLATFORM_NAME


def activate() -> bool:
    """Set this process up for CPU mode if it is selected; returns whether it is."""
    register_cpu_platform()
    if not cpu_mode_selected():
        return False
    import recipe.atropos.cpu.gloo_checkpoint_engine  # noqa: F401 - registers checkpoint_engine.backend=gloo
    from recipe.atropos.cpu.engine import register_cpu_engines
    from recipe.atropos.cpu.patches import apply_patches
    from recipe.atropos.cpu.rollout import register_cpu_vllm_rollout, register_hf_rollout
    from recipe.atropos.cpu.threads import set_torch_threads

    set_torch_threads()
    register_cpu_engines()
    register_hf_rollout()
    register_cpu_vllm_rollout()
    apply_patches()
    return True


activate()
