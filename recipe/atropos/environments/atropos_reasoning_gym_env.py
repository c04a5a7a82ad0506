"""reasoning-gym as a real atroposlib environment (``BaseEnv``, atroposlib 0.4.0) for trajectory mode.

The trajectory-mode twin of the evaluate-mode service (``reasoning_gym_server.py``), built as
``atropos_gsm8k_env.py`` is: it samples a group of answers per problem through an inference server
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

import random
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file path: put the repo root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import numpy as np  # noqa: E402
from atroposlib.envs.base import APIServerConfig, BaseEnv, BaseEnvConfig, ScoredDataGroup  # noqa: E402
from pydantic import Field  # noqa: E402

from recipe.atropos.environments.advantages import compute_grpo_outcome_advantages_np  # noqa: E402
from recipe.atropos.environments.atropos_gsm8k_env import DEFAULT_ASSETS, load_rl_parquet, token_advantages  # noqa: E402
from recipe.atropos.environments.reasoning_gym_env import (  # noqa: E402
    ReasoningGymJudge,
    rl_rows,
    split_task_names,
)
from recipe.atropos.protocol import POLICY_STEP_KEY  # noqa: E402

Item = tuple[list[dict[str, str]], str]  # (chat messages, ground truth)


class AtroposReasoningGymEnvConfig(BaseEnvConfig):
    data_path: str | None = Field(None, description="training problems (parquet of prepare_reasoning_gym.py)")
    tasks: str | None = Field(
        None, description="comma-separated reasoning-gym tasks to generate problems from (instead of data_path)"
    )
    seed: int = Field(42, description="seed of each task's generated dataset (with tasks)")
    size: int = Field(1000, description="generated problems per task (with tasks)")
    system_prompt: str | None = Field("default", description="reasoning-gym system prompt of generated problems")
    eval_data_path: str | None = Field(None, description="evaluation problems (parquet); none: no eval")
    max_eval_items: int = Field(64, description="most evaluation problems per evaluation")
    max_response_tokens: int = Field(256, description="max_tokens of each answer")
    temperature: float = Field(1.0, description="sampling temperature of training answers")
    emit_advantages: bool = Field(False, description="send token-level GRPO outcome advantages with each group")
    norm_adv_by_std: bool = Field(True, description="divide advantages by the group's std (false: Dr. GRPO)")
    mask_truncated: bool = Field(False, description="set_advantage_to_zero for answers cut by max_response_tokens")
    shuffle_seed: int = Field(0, description="seed of the order problems are served in")
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


class AtroposReasoningGymEnv(BaseEnv):
    name = "reasoning_gym_verl"
    env_config_cls = AtroposReasoningGymEnvConfig

    @classmethod
    def config_init(cls) -> tuple[AtroposReasoningGymEnvConfig, list[APIServerConfig]]:
        env_config = AtroposReasoningGymEnvConfig(
            tokenizer_name=f"{DEFAULT_ASSETS}/model",
            group_size=4,
            use_wandb=False,
            rollout_server_url="http://127.0.0.1:8000",
            total_steps=1000,
            batch_size=-1,
            steps_per_eval=100,
            max_token_length=1024,
            wandb_name=cls.name,
        )
        server = APIServerConfig(
            model_name=f"{DEFAULT_ASSETS}/model",
            tokenizer_name=f"{DEFAULT_ASSETS}/model",
            base_url="http://127.0.0.1:8001/v1",
            api_key="x",
            server_type="vllm",
            num_requests_for_eval=16,
        )
        return env_config, [server]

    async def setup(self) -> None:
        self.train = load_items(self.config)
        random.Random(self.config.shuffle_seed).shuffle(self.train)
        self.test = load_rl_parquet(self.config.eval_data_path) if self.config.eval_data_path else []
        # Any task: the data decides which (a parquet's tasks are known only from its rows).
        self.judge = ReasoningGymJudge(None, self.config.max_answer_chars, self.config.score_timeout_s)
        self.iter = 0
        self.eval_metrics: list[tuple[str, float]] = []

    async def get_next_item(self) -> Item:
        item = self.train[self.iter % len(self.train)]
        self.iter += 1
        return item

    async def collect_trajectories(self, item: Item) -> tuple[ScoredDataGroup | None, list]:
        messages, ground_truth = item
        policy_step = int(self.curr_step)
        async with self.server.managed_server(tokenizer=self.tokenizer) as managed:
            completion = await managed.chat_completion(
                messages=messages,
                n=self.config.group_size,
                max_tokens=self.config.max_response_tokens,
                temperature=self.config.temperature,
            )
            nodes = managed.get_state()["nodes"]
        if len(nodes) != len(completion.choices):
            raise RuntimeError(f"{len(completion.choices)} answers but {len(nodes)} tracked sequences")
        group = ScoredDataGroup(
            tokens=[list(node.tokens) for node in nodes],
            masks=[list(node.masked_tokens) for node in nodes],
            scores=[self.judge.score(c.message.content or "", ground_truth) for c in completion.choices],
            inference_logprobs=[list(node.logprobs) for node in nodes],
            overrides=[
                {"set_advantage_to_zero": self.config.mask_truncated and c.finish_reason == "length"}
                for c in completion.choices
            ],
            generation_params={
                POLICY_STEP_KEY: policy_step,
                "temperature": self.config.temperature,
                "max_tokens": self.config.max_response_tokens,
            },
            advantages=None,
        )
        if self.config.emit_advantages:
            advantages_G = compute_grpo_outcome_advantages_np(
                group["scores"], [0] * len(nodes), norm_adv_by_std=self.config.norm_adv_by_std
            )
            group["advantages"] = token_advantages(group["masks"], advantages_G)
        return group, []

    async def evaluate(self, *args: Any, **kwargs: Any) -> None:
        """Greedy mean score on up to ``max_eval_items`` problems of ``eval_data_path`` (eval/mean_score)."""
        if not self.test:
            return
        scores = []
        for messages, ground_truth in self.test[: self.config.max_eval_items]:
            async with self.server.managed_server(tokenizer=self.tokenizer) as managed:
                completion = await managed.chat_completion(
                    messages=messages, n=1, max_tokens=self.config.max_response_tokens, temperature=0.0
                )
            scores.append(self.judge.score(completion.choices[0].message.content or "", ground_truth))
        self.eval_metrics.append(("eval/mean_score", float(np.mean(scores))))

    async def wandb_log(self, wandb_metrics: dict | None = None) -> None:
        wandb_metrics = dict(wandb_metrics or {})
        wandb_metrics.update(self.eval_metrics)
        self.eval_metrics = []
        await super().wandb_log(wandb_metrics)


if __name__ == "__main__":
    AtroposReasoningGymEnv.cli()
