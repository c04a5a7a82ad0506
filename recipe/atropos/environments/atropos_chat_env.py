"""What the repo's atroposlib environments share: chat problems answered in groups and scored one
answer at a time (``atropos_gsm8k_env.py``, ``atropos_reasoning_gym_env.py``).

``ScoredChatEnv`` (an atroposlib 0.4.0 ``BaseEnv``) samples a group of answers per problem through
``server_type: vllm`` (atroposlib's ``VLLMServer``, the only server type of 0.4.0 that returns token
ids and log-probs from a self-hosted server: it posts vLLM's native ``/generate``). The prompts go
through atroposlib's ``ManagedServer``, which applies the chat template with the env's tokenizer, so
``tokens``, ``masks`` (-100 on the prompt) and ``inference_logprobs`` come straight from the
sampler. A subclass says where its problems come from (``load_train``) and how an answer scores
(``score``); the rest is here:

- **Advantages:** ``--env.emit_advantages true`` adds token-level ``advantages``: verl's GRPO
  outcome advantage of each answer within its group
  (:func:`recipe.atropos.environments.advantages.compute_grpo_outcome_advantages_np`), on every
  trained token, 0 on the prompt; ``--env.mask_truncated`` asks the trainer to zero answers cut by
  ``max_response_tokens``.
- **Staleness:** ``generation_params["policy_step"]`` is the trajectory API's step when the group
  was sampled (``BaseEnv.curr_step``); the trainer measures staleness from the policy gateway's
  records instead.
- **Evaluation:** greedy answers to up to ``max_eval_items`` problems of ``eval_data_path``, their
  mean score logged as ``eval_metric``.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from atroposlib.envs.base import APIServerConfig, BaseEnv, BaseEnvConfig, ScoredDataGroup
from pydantic import Field

from recipe.atropos.environments.advantages import compute_grpo_outcome_advantages_np
from recipe.atropos.protocol import IGNORE_INDEX, POLICY_STEP_KEY

DEFAULT_ASSETS = "outputs/assets"  # what `python -m recipe.atropos.demo.tiny_assets --out outputs/assets` writes
Item = tuple[list[dict[str, str]], str]  # (chat messages, ground truth)


class ChatEnvConfig(BaseEnvConfig):
    eval_data_path: str | None = Field(None, description="evaluation problems (verl RL parquet); none: no eval")
    max_eval_items: int = Field(64, description="most evaluation problems per evaluation")
    max_response_tokens: int = Field(256, description="max_tokens of each answer")
    temperature: float = Field(1.0, description="sampling temperature of training answers")
    emit_advantages: bool = Field(False, description="send token-level GRPO outcome advantages with each group")
    norm_adv_by_std: bool = Field(True, description="divide advantages by the group's std (false: Dr. GRPO)")
    mask_truncated: bool = Field(False, description="set_advantage_to_zero for answers cut by max_response_tokens")
    shuffle_seed: int = Field(0, description="seed of the order problems are served in")


def load_rl_parquet(path: str | Path) -> list[Item]:
    """(chat messages, ground truth) of each row of a verl RL parquet."""
    frame = pd.read_parquet(path)
    for column in ("prompt", "reward_model"):
        if column not in frame.columns:
            raise ValueError(f"{path}: no {column!r} column (columns: {list(frame.columns)}); expected verl's RL format")
    rows = []
    for messages, reward_model in zip(frame["prompt"], frame["reward_model"]):
        chat = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
        rows.append((chat, str(reward_model["ground_truth"])))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def token_advantages(masks: list[list[int]], advantages_G: np.ndarray) -> list[list[float]]:
    """Each sequence's advantage on its trained tokens (mask != -100), 0 elsewhere; aligned with tokens."""
    return [[float(a) if m != IGNORE_INDEX else 0.0 for m in mask] for mask, a in zip(masks, advantages_G)]


class ScoredChatEnv(BaseEnv):
    """A group of chat answers per problem, each scored by ``score`` (see the module docstring)."""

    eval_metric = "eval/mean_score"

    def load_train(self) -> list[Item]:
        """The training problems (called once, in ``setup``)."""
        raise NotImplementedError

    def setup_scoring(self) -> None:
        """Build what ``score`` needs (called once, in ``setup``)."""

    def score(self, response: str, ground_truth: str) -> float:
        raise NotImplementedError

    @classmethod
    def config_init(cls) -> tuple[ChatEnvConfig, list[APIServerConfig]]:
        env_config = cls.env_config_cls(
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
        self.train = self.load_train()
        random.Random(self.config.shuffle_seed).shuffle(self.train)
        self.test = load_rl_parquet(self.config.eval_data_path) if self.config.eval_data_path else []
        self.setup_scoring()
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
            scores=[self.score(c.message.content or "", ground_truth) for c in completion.choices],
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
        """Greedy mean score on up to ``max_eval_items`` problems of ``eval_data_path`` (``eval_metric``)."""
        if not self.test:
            return
        scores = []
        for messages, ground_truth in self.test[: self.config.max_eval_items]:
            async with self.server.managed_server(tokenizer=self.tokenizer) as managed:
                completion = await managed.chat_completion(
                    messages=messages, n=1, max_tokens=self.config.max_response_tokens, temperature=0.0
                )
            scores.append(self.score(completion.choices[0].message.content or "", ground_truth))
        self.eval_metrics.append((self.eval_metric, float(np.mean(scores))))

    async def wandb_log(self, wandb_metrics: dict | None = None) -> None:
        wandb_metrics = dict(wandb_metrics or {})
        wandb_metrics.update(self.eval_metrics)
        self.eval_metrics = []
        await super().wandb_log(wandb_metrics)
