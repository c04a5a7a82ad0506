"""GSM8K -> verl's RL parquet (the format verl's RLHFDataset reads), with the answer asked in \\boxed{}.

    python recipe/atropos/prepare_gsm8k.py --out ~/data/gsm8k                      # from the HF hub
    python recipe/atropos/prepare_gsm8k.py --out ~/data/gsm8k --train-file train.jsonl --test-file test.jsonl

Local files (parquet, JSON lines or JSON) need GSM8K's columns: `question` and `answer` (the
solution ending in `#### N`). Writes `train.parquet` and `test.parquet` under --out.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

DATA_SOURCE = "openai/gsm8k"
INSTRUCTION = "Let's think step by step and put the final answer in \\boxed{}."
_FINAL_ANSWER = re.compile(r"####\s*(-?[\d,\.\$]+)")


def extract_final_answer(solution: str) -> str:
    """The number after GSM8K's `####`, without thousands separators or a currency sign."""
    match = _FINAL_ANSWER.search(solution)
    if match is None:
        raise ValueError(f"no '#### <answer>' in GSM8K solution: {solution[-80:]!r}")
    return match.group(1).replace(",", "").replace("$", "").rstrip(".")


def to_rl_row(question: str, solution: str, split: str, index: int) -> dict:
    return {
        "data_source": DATA_SOURCE,
        "prompt": [{"role": "user", "content": f"{question} {INSTRUCTION}"}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": extract_final_answer(solution)},
        "extra_info": {"split": split, "index": index, "answer": solution, "question": question},
    }


def load_split(split: str, local_file: str | None):
    """A `datasets.Dataset` of GSM8K's split: from the local file when given, else from the HF hub."""
    import datasets

    if local_file is None:
        return datasets.load_dataset("openai/gsm8k", "main", split=split)
    suffix = Path(local_file).suffix.lower()
    builder = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}.get(suffix)
    if builder is None:
        raise ValueError(f"{local_file}: unsupported file type {suffix!r}; use .parquet, .jsonl or .json")
    return datasets.load_dataset(builder, data_files=local_file, split="train")


def convert(dataset, split: str):
    missing = {"question", "answer"} - set(dataset.column_names)
    if missing:
        raise ValueError(f"GSM8K {split} data lacks columns {sorted(missing)} (has {dataset.column_names})")
    return dataset.map(
        lambda row, index: to_rl_row(row["question"], row["answer"], split, index),
        with_indices=True,
        remove_columns=dataset.column_names,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="~/data/gsm8k", help="output folder (default: %(default)s)")
    parser.add_argument("--train-file", help="local GSM8K train split instead of the HF hub")
    parser.add_argument("--test-file", help="local GSM8K test split instead of the HF hub")
    args = parser.parse_args(argv)
    out = Path(os.path.expanduser(args.out))
    out.mkdir(parents=True, exist_ok=True)
    for split, local_file in (("train", args.train_file), ("test", args.test_file)):
        rows = convert(load_split(split, local_file), split)
        path = out / f"{split}.parquet"
        rows.to_parquet(str(path))
        print(f"{split}: {len(rows)} rows -> {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
