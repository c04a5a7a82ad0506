"""GSM8K as a real atroposlib environment (``BaseEnv``, atroposlib 0.4.0) for trajectory mode.

It samples a group of answers per problem through an inference server, scores them exactly as
this repo's evaluate-mode GSM8K environment does (``recipe/atropos/environments/gsm8k.py``:
the last ``\\boxed{}`` or ``####`` answer against the reference; 1.0 correct, 0.0 otherwise), and
pushes ``ScoredData`` groups to atroposlib's trajectory API (``run-api``), where a trainer pulls
them (``recipe/atropos/trajectory/scored_data.py`` converts them into a verl batch).

- **Data:** a local parquet in verl's RL format (``prompt`` = chat messages,
  ``reward_model.ground_truth``), as ``recipe/atropos/prepare_gsm8k.py`` and
  ``recipe/atropos/demo/tiny_assets.py`` write it: no hub access.
- **Inference, advantages, evaluation:** as every ``ScoredChatEnv`` (``atropos_chat_env.py``):
  ``server_type: vllm`` through atroposlib's ``ManagedServer``, so ``tokens``, ``masks`` and
  ``inference_logprobs`` come from the sampler; ``--env.emit_advantages true`` adds token-level
  GRPO outcome advantages.

Run (wandb off by default; the trajectory API and the inference server must be up)::

    python recipe/atropos/environments/atropos_gsm8k_env.py serve --slurm false \\
        --openai.base_url http://127.0.0.1:8001/v1 --openai.model_name outputs/assets/model \\
        --openai.tokenizer_name outputs/assets/model \\
        --env.tokenizer_name outputs/assets/model --env.data_path outputs/assets/data/train.parquet \\
        --env.rollout_server_url http://127.0.0.1:8000
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file path: put the repo root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from pydantic import Field  # noqa: E402

from recipe.atropos.environments.atropos_chat_env import (  # noqa: E402,F401 - load_rl_parquet, token_advantages: this module's API too
    DEFAULT_ASSETS,
    ChatEnvConfig,
    Item,
    ScoredChatEnv,
    load_rl_parquet,
    token_advantages,
)
from recipe.atropos.environments.gsm8k_answers import AnswerMatcher, extract_answer, reference_answer  # noqa: E402


class AtroposGSM8KEnvConfig(ChatEnvConfig):
    data_path: str = Field(f"{DEFAULT_ASSETS}/data/train.parquet", description="training problems (verl RL parquet)")
    math_verify_timeout_s: int = Field(2, description="seconds per math-verify parse or comparison")
    max_answer_chars: int = Field(256, description="longer answers (or references) are judged wrong")


def score_answer(matcher: AnswerMatcher, response: str, ground_truth: str) -> float:
    """1.0 when the response's final answer equals the reference, else 0.0 (gsm8k.py's outcome score)."""
    answer = extract_answer(response)
    return 1.0 if answer is not None and matcher.matches(answer, reference_answer(ground_truth)) else 0.0


class AtroposGSM8KEnv(ScoredChatEnv):
    name = "gsm8k_verl"
    env_config_cls = AtroposGSM8KEnvConfig
    eval_metric = "eval/accuracy"

    def load_train(self) -> list[Item]:
        return load_rl_parquet(self.config.data_path)

    def setup_scoring(self) -> None:
        self.matcher = AnswerMatcher(self.config.math_verify_timeout_s, self.config.max_answer_chars)

    def score(self, response: str, ground_truth: str) -> float:
        return score_answer(self.matcher, response, ground_truth)


if __name__ == "__main__":
    AtroposGSM8KEnv.cli()
