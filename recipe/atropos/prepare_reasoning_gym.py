"""reasoning-gym tasks -> verl's RL parquet (the format verl's RLHFDataset reads), generated locally.

    python recipe/atropos/prepare_reasoning_gym.py --tasks basic_arithmetic,leg_counting --out ~/data/reasoning_gym
    python recipe/atropos/prepare_reasoning_gym.py --tasks chain_sum --train-size 5000 --test-size 200 --seed 7

For each task, one dataset ``reasoning_gym.create_dataset(task, seed=SEED, size=TRAIN+TEST)`` is
generated (no download): its first TRAIN entries go to ``train.parquet``, the next TEST to
``test.parquet``, so the splits never share an entry. Rows: ``data_source`` ``reasoning_gym/<task>``,
``prompt`` (reasoning-gym's system prompt asking for ``<answer>...</answer>``, then the question),
``ability`` (the task's category), ``reward_model`` ``{"style": "rule", "ground_truth": <JSON naming
the entry>}`` and ``extra_info`` (question, answer, metadata as JSON text, version). The ground
truth is what the reasoning-gym environments judge with: serve them with the same reasoning-gym
version (``reasoning_gym_server.py``, ``atropos_reasoning_gym_env.py``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file path: put the repo root (two levels up) on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from recipe.atropos.environments.reasoning_gym_env import (  # noqa: E402
    SYSTEM_PROMPTS,
    check_task_names,
    reasoning_gym_version,
    rl_rows,
    split_task_names,
)


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def build_splits(
    tasks: list[str], train_size: int, test_size: int, seed: int, system_prompt: str | None
) -> dict[str, list[dict]]:
    """{"train": rows, "test": rows}, task after task."""
    check_task_names(tasks)
    size = train_size + test_size
    if size == 0:
        raise ValueError("--train-size and --test-size are both 0: nothing to write")
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    for task in tasks:
        splits["train"] += rl_rows(task, seed, size, range(train_size), "train", system_prompt)
        splits["test"] += rl_rows(task, seed, size, range(train_size, size), "test", system_prompt)
    return splits


def write_parquet(rows: list[dict], path: Path) -> None:
    import pandas as pd

    pd.DataFrame(rows, columns=["data_source", "prompt", "ability", "reward_model", "extra_info"]).to_parquet(
        path, index=False
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--tasks", required=True, help="reasoning-gym task names, comma-separated (e.g. basic_arithmetic,leg_counting)"
    )
    parser.add_argument("--out", default="~/data/reasoning_gym", help="output folder (default: %(default)s)")
    parser.add_argument("--train-size", type=_non_negative, default=1000, help="train rows per task (default: %(default)s)")
    parser.add_argument("--test-size", type=_non_negative, default=100, help="test rows per task (default: %(default)s)")
    parser.add_argument("--seed", type=_non_negative, default=42, help="seed of every task's dataset (default: %(default)s)")
    parser.add_argument(
        "--system-prompt",
        default="default",
        choices=[*sorted(SYSTEM_PROMPTS), "none"],
        help="reasoning-gym system prompt put before each question; none: the question alone (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    tasks = list(split_task_names(args.tasks))
    try:
        splits = build_splits(
            tasks, args.train_size, args.test_size, args.seed, None if args.system_prompt == "none" else args.system_prompt
        )
    except ValueError as exc:
        parser.error(str(exc))
    out = Path(os.path.expanduser(args.out))
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        path = out / f"{split}.parquet"
        write_parquet(rows, path)
        source = f"{', '.join(tasks)}; reasoning-gym {reasoning_gym_version()}"
        print(f"{split}: {len(rows)} rows ({source}) -> {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
