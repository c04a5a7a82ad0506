"""An Atropos environment written the way Atropos' own `environments/` are: only atroposlib, no repo code.

A two-turn arithmetic chat: the policy answers a question (``server.chat_completion`` with
``n=group_size``), is asked to check it, answers again; the whole conversation goes through
atroposlib's ``tokenize_for_trainer`` (every assistant turn trained, the user's follow-up masked).
Each answer scores 1.0 when its last turn holds the right number. It sends token-level
``advantages`` no GRPO computation would give (``ramp``: trained token j gets 0.25 - 0.01 j), so a
trainer that used them has them token by token in its rollout dump.

Problems come from ``problems.jsonl`` in the working directory (``--env.problems_file``), as
Atropos environments read local data relative to where they are started.

    python chat_env_tokenize.py serve --openai.base_url http://127.0.0.1:8001/v1 --openai.model_name policy \\
        --env.tokenizer_name <model dir> --env.rollout_server_url http://127.0.0.1:8000

With `--env.fail_with "<message>"` every rollout raises that message instead (a broken environment).
"""

import json
import random
from typing import List, Optional, Tuple

from atroposlib.envs.base import APIServerConfig, BaseEnv, BaseEnvConfig, ScoredDataGroup
from atroposlib.utils.tokenize_for_trainer import tokenize_for_trainer
from pydantic import Field

SYSTEM_PROMPT = "Answer with one number."
FOLLOW_UP = "Check it. Answer again."


def ramp(num_trained_tokens: int) -> List[float]:
    return [0.25 - 0.01 * j for j in range(num_trained_tokens)]


def ramp_advantages(masks: List[List[int]]) -> List[List[float]]:
    """Aligned with the tokens: the ramp over trained positions (mask != -100), 0 elsewhere."""
    out = []
    for mask in masks:
        values = iter(ramp(sum(m != -100 for m in mask)))
        out.append([next(values) if m != -100 else 0.0 for m in mask])
    return out


class ChatArithmeticConfig(BaseEnvConfig):
    problems_file: str = Field("problems.jsonl", description="JSON lines {question, answer}, relative to the cwd")
    max_turn_tokens: int = Field(8, description="max_tokens of each assistant turn")
    fail_with: Optional[str] = Field(None, description="raise this message from every rollout (a broken env)")


class ChatArithmeticEnv(BaseEnv):
    name = "chat_arithmetic"
    env_config_cls = ChatArithmeticConfig

    @classmethod
    def config_init(cls) -> Tuple[ChatArithmeticConfig, List[APIServerConfig]]:
        env_config = ChatArithmeticConfig(
            tokenizer_name="model",
            group_size=4,
            use_wandb=False,
            rollout_server_url="http://localhost:8000",
            total_steps=1000,
            batch_size=-1,
            steps_per_eval=1000,
            max_token_length=1024,
            ensure_scores_are_not_same=False,
            wandb_name=cls.name,
        )
        server_configs = [
            APIServerConfig(
                model_name="policy",
                base_url="http://localhost:8001/v1",
                api_key="x",
                server_type="openai",
                num_requests_for_eval=4,
            )
        ]
        return env_config, server_configs

    async def setup(self):
        with open(self.config.problems_file) as f:
            self.problems = [json.loads(line) for line in f if line.strip()]
        random.Random(0).shuffle(self.problems)
        self.iter = 0

    async def get_next_item(self):
        problem = self.problems[self.iter % len(self.problems)]
        self.iter += 1
        return problem

    async def collect_trajectories(self, item) -> Tuple[Optional[ScoredDataGroup], list]:
        if self.config.fail_with:
            raise RuntimeError(self.config.fail_with)
        chat = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": item["question"]}]
        first = await self.server.chat_completion(
            messages=chat, n=self.config.group_size, max_tokens=self.config.max_turn_tokens, temperature=1.0
        )
        scores = ScoredDataGroup(tokens=[], masks=[], scores=[], advantages=[], overrides=[])
        for choice in first.choices:
            conversation = chat + [
                {"role": "assistant", "content": choice.message.content or ""},
                {"role": "user", "content": FOLLOW_UP},
            ]
            second = await self.server.chat_completion(
                messages=conversation, n=1, max_tokens=self.config.max_turn_tokens, temperature=1.0
            )
            last = second.choices[0]
            conversation.append({"role": "assistant", "content": last.message.content or ""})
            out = tokenize_for_trainer(
                self.tokenizer, conversation, train_on_all_assistant_turns=True, finish_reason=last.finish_reason
            )
            scores["tokens"].append(out["tokens"])
            scores["masks"].append(out["masks"])
            scores["scores"].append(1.0 if str(item["answer"]) in (last.message.content or "") else 0.0)
            scores["overrides"].append({})
        scores["advantages"] = ramp_advantages(scores["masks"])
        return scores, []

    async def evaluate(self, *args, **kwargs):
        return None


if __name__ == "__main__":
    ChatArithmeticEnv.cli()
