"""torch's intra-op thread count for CPU-mode processes.

Each verl process (trainer, FSDP worker, rollout server, agent loop) would otherwise start one
intra-op thread per core, and they all share a few cores: with the tiny models CPU mode is for, two
threads per process measured 40-70x slower than one. `VERL_CPU_NUM_THREADS` overrides the default.
"""

from __future__ import annotations

import os

import torch

NUM_THREADS_ENV = "VERL_CPU_NUM_THREADS"
DEFAULT_NUM_THREADS = 1


def set_torch_threads() -> int:
    """Apply `VERL_CPU_NUM_THREADS` (default 1) to this process; returns the count set."""
    threads = int(os.environ.get(NUM_THREADS_ENV, DEFAULT_NUM_THREADS))
    if threads < 1:
        raise ValueError(f"{NUM_THREADS_ENV} must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    return threads
