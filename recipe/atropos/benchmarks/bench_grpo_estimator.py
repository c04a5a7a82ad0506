"""Benchmark: our GRPO estimator (with token-level overrides) against verl's `grpo` and `grpo_vectorized`.

    python -m recipe.atropos.benchmarks.bench_grpo_estimator [--repeats 10]

All three run in this process on the same inputs, in turn within each round (so that they share the
machine's load): groups of 8, half of the rows overridden (ours only; upstream has no overrides).
Prints the median time of each and the ratios
ours / grpo (target <= 0.2) and ours / grpo_vectorized (target <= 1.2).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from verl import _overlay
from verl.trainer.ppo import core_algos


def _load_upstream_core_algos():
    import importlib.util

    spec = importlib.util.spec_from_file_location("upstream_core_algos", _overlay.installed_source_file("verl.trainer.ppo.core_algos"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_batch(batch_size: int, response_length: int, group_size: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    lengths_B = torch.randint(response_length // 4, response_length + 1, (batch_size,), generator=gen)
    response_mask_BT = (torch.arange(response_length)[None, :] < lengths_B[:, None]).float()
    rewards_BT = torch.zeros(batch_size, response_length)
    rewards_BT[torch.arange(batch_size), lengths_B - 1] = torch.randint(0, 2, (batch_size,), generator=gen).float()
    index_B = np.array([f"uid-{i // group_size}" for i in range(batch_size)], dtype=object)
    overrides_BT = torch.randn(batch_size, response_length, generator=gen)
    override_mask_B = torch.arange(batch_size) % 2 == 0
    return rewards_BT, response_mask_BT, index_B, overrides_BT, override_mask_B


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of `fn` over `repeats` runs, after one warm-up run."""
    return interleaved_medians({"fn": fn}, repeats)["fn"]


def interleaved_medians(fns: dict, repeats: int) -> dict[str, float]:
    """Median wall time of each function, run in turn within every round (after a warm-up round), so
    that all of them see the same machine load and allocator state."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(samples) for name, samples in times.items()}


def run(batch_size: int, response_length: int, repeats: int) -> dict[str, float]:
    upstream = _load_upstream_core_algos()
    rewards_BT, mask_BT, index_B, overrides_BT, override_B = make_batch(batch_size, response_length)
    medians = interleaved_medians(
        {
            "ours_s": lambda: core_algos.compute_grpo_outcome_advantage(
                rewards_BT, mask_BT, index_B, token_level_advantages=overrides_BT, advantage_override_mask=override_B
            ),
            "grpo_s": lambda: upstream.compute_grpo_outcome_advantage(rewards_BT, mask_BT, index_B),
            "grpo_vectorized_s": lambda: upstream.compute_grpo_vectorized_outcome_advantage(rewards_BT, mask_BT, index_B),
        },
        repeats,
    )
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per estimator (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats} runs")
    print(f"{'batch':>12} | {'ours':>9} | {'grpo':>9} | {'grpo_vec':>9} | {'ours/grpo':>9} | {'ours/vec':>8}")
    for batch_size, response_length in [(4096, 1024), (1024, 4096)]:
        r = run(batch_size, response_length, args.repeats)
        print(
            f"{batch_size:>5} x {response_length:<4} | {r['ours_s'] * 1e3:7.2f}ms | {r['grpo_s'] * 1e3:7.2f}ms | "
            f"{r['grpo_vectorized_s'] * 1e3:7.2f}ms | {r['ours_s'] / r['grpo_s']:9.3f} | "
            f"{r['ours_s'] / r['grpo_vectorized_s']:8.3f}"
        )
    print("targets: ours/grpo <= 0.2, ours/grpo_vectorized <= 1.2")


if __name__ == "__main__":
    main()
