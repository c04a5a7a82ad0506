"""verl's RL parquet from a verifiers taskset, for evaluate mode (service.py scores verl's answers).

    python -m recipe.atropos.verifiers.prepare_data --env my_envs.arith:make_env --env-args '{"n": 3}' \
        --out data/arith --num-test 64 --data-source verifiers/arith

One row per task, in the taskset's order: the first `--num-test` go to test.parquet, the rest (up to
`--num-train`) to train.parquet. The prompt is what the single agent is given (the task's system
prompt, then its prompt); the ground truth is the task's TaskData as JSON, from which the service
rebuilds the task to score the answer.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Any

from verifiers.v1.dialects.chat import message_to_wire

from recipe.atropos.verifiers.loading import load_env
from recipe.atropos.verifiers.service import prompt_messages
from recipe.atropos.verifiers.spec import VerifiersEnvSpec

__all__ = ["rows"]


def rows(tasks, split: str, data_source: str) -> list[dict[str, Any]]:
    """One verl RL row per task (the columns verl's examples/data_preprocess scripts write)."""
    return [{"data_source": data_source, "prompt": [message_to_wire(m) for m in prompt_messages(task.data)],
             "ability": "verifiers",
             "reward_model": {"style": "rule", "ground_truth": task.data.model_dump_json(exclude_none=True)},
             "extra_info": {"split": split, "index": index, "task_id": task.data.id or task.data.name or ""}}
            for index, task in enumerate(tasks)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipe.atropos.verifiers.prepare_data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", required=True, help="package.module:callable or an installed environment id")
    parser.add_argument("--env-args", default="{}", help="its arguments, as a JSON object")
    parser.add_argument("--out", type=Path, required=True, help="folder for train.parquet and test.parquet")
    parser.add_argument("--num-train", type=int, default=512)
    parser.add_argument("--num-test", type=int, default=64)
    parser.add_argument("--data-source", default="verifiers", help="verl's data_source of every row")
    args = parser.parse_args(argv)
    import pandas as pd

    env = load_env("prepare_data", VerifiersEnvSpec(env=args.env, env_args=json.loads(args.env_args)))
    tasks = iter(env.taskset)
    args.out.mkdir(parents=True, exist_ok=True)
    for split, count in (("test", args.num_test), ("train", args.num_train)):
        path = args.out / f"{split}.parquet"
        pd.DataFrame(rows(itertools.islice(tasks, count), split, args.data_source)).to_parquet(path)
        print(f"{path}: {pd.read_parquet(path).shape[0]} rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
