"""reasoning-gym as a real atroposlib environment (``BaseEnv``, atroposlib 0.4.0) for trajectory mode.

The trajectory-mode twin of the evaluate-mode service (``reasoning_gym_server.py``), a
``ScoredChatEnv`` (``atropos_chat_env.py``) as ``atropos_gsm8k_env.py`` is: it samples a group of answers per problem through an inference server
(``server_type: vllm``, prompts through atroposlib's ``ManagedServer``, so ``tokens``, ``masks`` and
``inference_logprobs`` come from the sampler), scores each with the task's own verifier exactly as
the service does (:class:`recipe.atropos.environments.reasoning_gym_env.ReasoningGymJudge`: the last
``<answer>...</answer>``, ``dataset.score_answer``; partial credit where the task gives it), and
pushes ``ScoredData`` groups to atroposlib's trajectory API. Advantages, truncation masking and
``policy_step`` as in the GSM8K environment.

- **Data:** either ``--env.data_path`` (a parquet from ``recipe/atropos/prepare_reasoning_gym.py``)
  or ``--env.tasks`` (comma-separated task names): then problems are generated here, ``--env.size``
  per task from ``--env.seed``, with the same prompts and ground truths the script writes.
  Generated locally either way: no hub access.

Run (wandb off by default; the trajectory API and the inference server must be up)::

    python recipe/atropos/environments/atropos_reasoning_gym_env.py serve --slurm false \\
        --openai.base_url http://127.0.0.1:8001/v1 --openai.model_name outputs/assets/model \\
        --openai.tokenizer_name outputs/assets/model --env.tokenizer_name outputs/assets/model \\
        --env.tasks basic_arithmetic,leg_counting --env.rollout_server_url http://127.0.0.1:8000
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file path: put the repo root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from pydantic import Field  # noqa: E402

from recipe.atropos.environments.atropos_chat_env import ChatEnvConfig, Item, ScoredChatEnv, load_rl_parquet  # noqa: E402
from recipe.atropos.environments.reasoning_gym_env import (  # noqa: E402
    ReasoningGymJudge,
    rl_rows,
    split_task_names,
)


class AtroposReasoningGymEnvConfig(ChatEnvConfig):
    data_path: str | None = Field(None, description="training problems (parquet of prepare_reasoning_gym.py)")
    tasks: str | None = Field(
        None, description="comma-separated reasoning-gym tasks to generate problems from (instead of data_path)"
    )
    seed: int = Field(42, description="seed of each task's generated dataset (with tasks)")
    size: int = Field(1000, description="generated problems per task (with tasks)")
    system_prompt: str | None = Field("default", description="reasoning-gym system prompt of generated problems")
    max_answer_chars: int = Field(4096, description="longer <answer> contents score 0 without the verifier")
    score_timeout_s: float = Field(10.0, description="seconds a verifier may spend on one answer; 0: no limit")


def load_items(config: AtroposReasoningGymEnvConfig) -> list[Item]:
    """Training items from ``data_path`` or generated from ``tasks`` (exactly one of them)."""
    if (config.data_path is None) == (not config.tasks):
        raise ValueError(
            f"set exactly one of --env.data_path (got {config.data_path!r}) and --env.tasks (got {config.tasks!r})"
        )
    if config.data_path is not None:
        return load_rl_parquet(config.data_path)
    items = []
    for task in split_task_names(config.tasks or ""):
        for row in rl_rows(task, config.seed, config.size, range(config.size), "train", config.system_prompt):
            items.append((row["prompt"], row["reward_model"]["ground_truth"]))
    return items


class AtroposReasoningGymEnv(ScoredChatEnv):
    name = "reasoning_gym_verl"
    env_config_cls = AtroposReasoningGymEnvConfig
    eval_metric = "eval/mean_score"

    def load_train(self) -> list[Item]:
        return load_items(self.config)

    def setup_scoring(self) -> None:
        # Any task: the data decides which (a parquet's tasks are known only from its rows).
        self.judge = ReasoningGymJudge(None, self.config.max_answer_chars, self.config.score_timeout_s)

    def score(self, response: str, ground_truth: str) -> float:
        return self.judge.score(response, ground_truth)


if __name__ == "__main__":
    AtroposReasoningGymEnv.cli()
