"""Offline assets for tests and the CPU demo: a tiny tokenizer, a tiny Qwen2 model and GSM8K-style data.

Nothing is downloaded. Everything is deterministic for a given seed, so two builds give the same
files (tests rely on that to cache them).

    python -m recipe.atropos.demo.tiny_assets --out outputs/assets

writes `model/` (tokenizer + Qwen2ForCausalLM, `save_pretrained` format) and `data/{train,test}.parquet`
in verl's RL dataset format (the columns verl's `examples/data_preprocess/gsm8k.py` writes).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
from pathlib import Path

DATA_SOURCE = "openai/gsm8k"
INSTRUCTION = "Let's think step by step and output the final answer after \"####\"."
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2-style chat template, short enough for a tiny model's context.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_NAMES = ["Tom", "Ana", "Li", "Sam", "Mia", "Raj", "Eva", "Ken"]
_ITEMS = ["apples", "pens", "coins", "books", "cards", "eggs"]


@dataclasses.dataclass(frozen=True)
class ArithmeticProblem:
    """One GSM8K-format problem: `solution` ends with `#### <answer>` as GSM8K's do."""

    question: str
    solution: str
    answer: str


def make_problem(rng: random.Random, max_operand: int = 9) -> ArithmeticProblem:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randint(1, max_operand), rng.randint(1, max_operand)
    if rng.random() < 0.5:
        question = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have?"
        result, expr = a + b, f"{a}+{b}"
    else:
        a, b = max(a, b), min(a, b)
        question = f"{name} has {a} {item} and gives away {b}. How many {item} does {name} have?"
        result, expr = a - b, f"{a}-{b}"
    solution = f"{name} has {expr} = <<{expr}={result}>>{result} {item}.\n#### {result}"
    return ArithmeticProblem(question=question, solution=solution, answer=str(result))


def make_problems(num: int, seed: int) -> list[ArithmeticProblem]:
    rng = random.Random(seed)
    return [make_problem(rng) for _ in range(num)]


def to_rl_row(problem: ArithmeticProblem, split: str, index: int) -> dict:
    """A row of verl's RL dataset format (what `RLHFDataset` reads)."""
    return {
        "data_source": DATA_SOURCE,
        "prompt": [{"role": "user", "content": f"{problem.question} {INSTRUCTION}"}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": problem.answer},
        "extra_info": {"split": split, "index": index, "answer": problem.solution, "question": problem.question},
    }


def write_rl_parquet(problems: list[ArithmeticProblem], split: str, path: Path) -> Path:
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([to_rl_row(p, split, i) for i, p in enumerate(problems)]).to_parquet(path)
    return path


def _tokenizer_corpus(problems: list[ArithmeticProblem]) -> list[str]:
    texts = []
    for p in problems:
        texts.append(f"<|im_start|>user\n{p.question} {INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n{p.solution}<|im_end|>\n")
    texts += [str(n) for n in range(100)] + ["\\boxed{", "}", " = ", "<<", ">>", "####", "system"]
    return texts


def build_tokenizer(problems: list[ArithmeticProblem], vocab_size: int = 400):
    """A byte-level BPE trained on the problems (Qwen2 pre-tokenization), as `PreTrainedTokenizerFast`."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    # Qwen2's own normalizer and pre-tokenizer: AutoTokenizer loads a qwen2 model's tokenizer as
    # Qwen2Tokenizer, which installs them; training with them keeps the ids identical either way.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(problems), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
    )


def build_model(vocab_size: int, seed: int, eos_token_id: int, pad_token_id: int):
    """A ~100k-parameter Qwen2 (head_dim 32: the smallest vLLM's CPU attention serves)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        bos_token_id=None,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


def prompt_text(tokenizer, problem: ArithmeticProblem) -> str:
    """The prompt as verl's RLHFDataset renders it: the chat template with a generation prompt."""
    return tokenizer.apply_chat_template(
        to_rl_row(problem, "train", 0)["prompt"], tokenize=False, add_generation_prompt=True
    )


def warmup_solution(problem: ArithmeticProblem, rng: random.Random, plain_answer_fraction: float) -> str:
    """The solution the warm-up teaches: GSM8K's `#### N` ending, or (sometimes) `The answer is N`."""
    if rng.random() < plain_answer_fraction:
        return problem.solution.rsplit("\n", 1)[0] + f"\nThe answer is {problem.answer}"
    return problem.solution


def pretrain(
    model,
    tokenizer,
    problems: list[ArithmeticProblem],
    steps: int,
    seed: int,
    batch_size: int = 32,
    lr: float = 3e-3,
    plain_answer_fraction: float = 0.5,
):
    """A short supervised warm-up on the problems' solutions (loss on the response tokens only).

    A random-init model never writes `#### N`, so every reward is 0 and GRPO has nothing to learn
    from. A few hundred steps (seconds on a CPU) give a model that mostly gets the arithmetic right
    but ends `plain_answer_fraction` of its solutions with "The answer is N", which GSM8K graders
    (verl's and the environment's) cannot read: GRPO then has something clear to learn within a
    few dozen steps, the answer format the environment rewards, as RL on real models does.
    """
    import torch

    rng = random.Random(seed)
    examples = []
    for p in problems:
        prompt_ids = tokenizer(prompt_text(tokenizer, p)).input_ids
        solution = warmup_solution(p, rng, plain_answer_fraction)
        examples.append((prompt_ids, tokenizer(solution + tokenizer.eos_token).input_ids))
    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic, and faster than two threads for a model this small
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    try:
        for _ in range(steps):
            batch = [examples[rng.randrange(len(examples))] for _ in range(batch_size)]
            length = max(len(a) + len(b) for a, b in batch)
            input_ids = torch.full((batch_size, length), tokenizer.pad_token_id)
            labels = torch.full((batch_size, length), -100)
            attention_mask = torch.zeros(batch_size, length, dtype=torch.long)
            for i, (prompt_ids, response_ids) in enumerate(batch):
                ids = prompt_ids + response_ids
                input_ids[i, : len(ids)] = torch.tensor(ids)
                attention_mask[i, : len(ids)] = 1
                labels[i, len(prompt_ids) : len(ids)] = torch.tensor(response_ids)
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return model


@dataclasses.dataclass(frozen=True)
class TinyAssets:
    model_dir: Path
    train_file: Path
    test_file: Path


def build_assets(
    out_dir: str | os.PathLike, num_train: int = 512, num_test: int = 64, seed: int = 0, pretrain_steps: int = 0
) -> TinyAssets:
    """Write the tokenizer + model folder and the two parquet files under `out_dir`.

    `pretrain_steps` > 0 warms the model up on the training problems (see `pretrain`).
    """
    out = Path(out_dir)
    train, test = make_problems(num_train, seed), make_problems(num_test, seed + 1)
    model_dir = out / "model"
    tokenizer = build_tokenizer(train)
    model = build_model(len(tokenizer), seed, tokenizer.eos_token_id, tokenizer.pad_token_id)
    if pretrain_steps:
        pretrain(model, tokenizer, train, pretrain_steps, seed)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    model.generation_config.save_pretrained(model_dir)
    return TinyAssets(
        model_dir=model_dir,
        train_file=write_rl_parquet(train, "train", out / "data" / "train.parquet"),
        test_file=write_rl_parquet(test, "test", out / "data" / "test.parquet"),
    )


def build_reasoning_gym_data(
    out_dir: str | os.PathLike, task: str = "basic_arithmetic", num_train: int = 512, num_test: int = 64, seed: int = 0
) -> tuple[Path, Path]:
    """``data/reasoning_gym_{train,test}.parquet`` under ``out_dir``: one reasoning-gym task in verl's RL
    format (data_source ``reasoning_gym/<task>``), generated locally, for the mixed CPU demo.

    Questions alone, without reasoning-gym's system prompt: the tiny model's prompts are 96 tokens.
    """
    import pandas as pd

    from recipe.atropos.environments.reasoning_gym_env import rl_rows

    data = Path(out_dir) / "data"
    data.mkdir(parents=True, exist_ok=True)
    size = num_train + num_test
    paths = []
    for split, indices in (("train", range(num_train)), ("test", range(num_train, size))):
        path = data / f"reasoning_gym_{split}.parquet"
        pd.DataFrame(rl_rows(task, seed, size, indices, split, None)).to_parquet(path, index=False)
        paths.append(path)
    return paths[0], paths[1]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m recipe.atropos.demo.tiny_assets", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/assets", help="output folder (default: %(default)s)")
    parser.add_argument("--num-train", type=int, default=512, help="training problems (default: %(default)s)")
    parser.add_argument("--num-test", type=int, default=64, help="test problems (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data and weights (default: %(default)s)")
    parser.add_argument(
        "--pretrain-steps", type=int, default=200, help="supervised warm-up steps, 0 for random weights (default: %(default)s)"
    )
    args = parser.parse_args()
    assets = build_assets(args.out, args.num_train, args.num_test, args.seed, args.pretrain_steps)
    print(f"model: {assets.model_dir}\ntrain: {assets.train_file}\ntest:  {assets.test_file}")


if __name__ == "__main__":
    main()
