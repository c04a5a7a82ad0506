"""verl's RL parquet from an OpenEnv environment, for evaluate mode (service.py judges the answers).

    python -m recipe.atropos.openenv.prepare_data --url http://127.0.0.1:8010 --out data/arithmetic \
        --num-train 512 --num-test 64 --data-source openenv/arithmetic

Each row is one reset of the server: its first observation, rendered as the driver renders it (the
observation's text fields, or --prompt-template), is the prompt; its reset arguments (`{"seed": s}`)
are the ground truth, from which the service resets the same episode to score verl's answer. Train
seeds are 0..num_train-1, test seeds start at --test-seed-offset.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

from recipe.atropos.openenv.rendering import ObservationPrompt
from recipe.atropos.openenv.session import OpenEnvSession

__all__ = ["rows"]


async def rows(url: str, seeds: list[int], split: str, data_source: str, prompt: ObservationPrompt,
               system_prompt: str | None = None) -> list[dict[str, Any]]:
    """One verl RL row per seed (the columns verl's examples/data_preprocess scripts write)."""
    session = await OpenEnvSession.open(url)
    out = []
    try:
        for index, seed in enumerate(seeds):
            first = await session.reset({"seed": seed})
            messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [prompt(first.observation, 0)]
            out.append({"data_source": data_source, "prompt": messages, "ability": "openenv",
                        "reward_model": {"style": "rule", "ground_truth": json.dumps({"seed": seed})},
                        "extra_info": {"split": split, "index": index, "seed": seed}})
    finally:
        await session.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipe.atropos.openenv.prepare_data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="the OpenEnv server, http://host:port")
    parser.add_argument("--out", type=Path, required=True, help="folder for train.parquet and test.parquet")
    parser.add_argument("--num-train", type=int, default=512)
    parser.add_argument("--num-test", type=int, default=64)
    parser.add_argument("--test-seed-offset", type=int, default=1_000_000)
    parser.add_argument("--data-source", default="openenv", help="verl's data_source of every row")
    parser.add_argument("--prompt-template", default=None, help="as the driver's prompt_template")
    parser.add_argument("--system-prompt", default=None)
    args = parser.parse_args(argv)
    import pandas as pd

    prompt = ObservationPrompt(args.prompt_template)
    args.out.mkdir(parents=True, exist_ok=True)
    for split, seeds in (("train", range(args.num_train)),
                         ("test", range(args.test_seed_offset, args.test_seed_offset + args.num_test))):
        table = asyncio.run(rows(args.url, list(seeds), split, args.data_source, prompt, args.system_prompt))
        pd.DataFrame(table).to_parquet(args.out / f"{split}.parquet")
        print(f"{split}: {len(table)} rows -> {args.out / f'{split}.parquet'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
