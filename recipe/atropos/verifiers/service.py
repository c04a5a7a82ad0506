"""Evaluate mode: a single-turn verifiers task judges responses verl generated, as an environment service.

In evaluate mode verl generates and a service scores (docs/environment_service.md). verifiers scores a
finished trace offline with the task's own `@vf.reward`/`@vf.metric` functions and its judges
(`Task.score(trace)` without a runtime, what `vf-replay` does), so a task whose episode is one model
answer can score an answer verl sampled: for each sample this service rebuilds the task from the
sample's ground truth (its TaskData as JSON, which `prepare_data.py` writes into verl's parquet), puts
the prompt and verl's response into a trace, scores it, and returns the trace's reward; advantages are
GRPO's over each group.

    python -m recipe.atropos.verifiers.prepare_data --env my_envs.arith:make_env --out data/arith
    python -m recipe.atropos.verifiers.service serve --slurm false --port 9001 \
        --env.env my_envs.arith:make_env --env.env_args '{"difficulty": 2}'

Refused at start (the message says why and what to use instead): environments whose `run()` is not
the single agent's one answer (multi-turn, several agents: trajectory mode plays them) or that judge in
`finalize()` (it needs the whole episode); tasks with no reward computable without a runtime (rewards
that read files the agent wrote in its sandbox); judges that call a hosted model.
"""

from __future__ import annotations

import asyncio
import inspect
import sys
from typing import Any

import numpy as np
import verifiers.v1 as vf
from pydantic import Field, Json
from verifiers.v1.graph import MessageNode

from recipe.atropos.environments.advantages import compute_grpo_outcome_advantages_np
from recipe.atropos.environments.base import (
    ContractError,
    EnvConfig,
    Environment,
    EvaluationRequest,
    SampleAdvantage,
    ScoredBatch,
    group_score_metrics,
)
from recipe.atropos.episodes.spec import EpisodeSpecError
from recipe.atropos.verifiers.loading import load_env
from recipe.atropos.verifiers.spec import VerifiersEnvSpec

__all__ = ["VerifiersScoringConfig", "VerifiersScoringEnvironment", "prompt_messages"]


class VerifiersScoringConfig(EnvConfig):
    env: str = Field(default="", description="the verifiers environment: package.module:callable or an installed id")
    env_args: Json[dict[str, Any]] = Field(default_factory=dict, description="its arguments, as a JSON object")
    concurrency: int = Field(default=32, ge=1, description="samples scored at once per request")


def prompt_messages(data: vf.TaskData) -> list[vf.Message]:
    """The conversation a single agent is given for `data`: its system prompt, then its prompt."""
    messages: list[vf.Message] = [vf.SystemMessage(content=data.system_prompt)] if data.system_prompt else []
    if isinstance(data.prompt, str):
        messages.append(vf.UserMessage(content=data.prompt))
    elif data.prompt:
        messages.extend(data.prompt)
    return messages


def _runtime_free(fn) -> bool:
    parameter = inspect.signature(fn).parameters.get("runtime")
    return parameter is None or parameter.default is not inspect.Parameter.empty


def _scoring_trace(task: vf.Task, response: str) -> vf.Trace:
    """A finished one-turn trace: the task's prompt, then `response` as the policy's sampled answer."""
    trace = vf.Trace(task=vf.TraceTask(type=type(task).__name__, data=task.data, key=task.key, hash=task.hash),
                     agent=vf.AgentInfo(config=vf.AgentConfig()))
    messages = [*prompt_messages(task.data), vf.AssistantMessage(content=response)]
    trace.nodes = [MessageNode(parent=i - 1 if i else None, message=m, sampled=i == len(messages) - 1)
                   for i, m in enumerate(messages)]
    trace.is_completed = trace.ok = True
    return trace


class VerifiersScoringEnvironment(Environment):
    """Scores verl's responses with a verifiers task's own rewards (see the module's docstring)."""

    name = "verifiers"
    Config = VerifiersScoringConfig
    max_concurrent_evaluations = 4  # each evaluation has its own event loop and tasks

    def setup(self) -> None:
        where = "--env"
        if not self.config.env:
            raise EpisodeSpecError(f"{where}.env is required: package.module:callable or an installed environment id")
        env = load_env("service", VerifiersEnvSpec(env=self.config.env, env_args=self.config.env_args))
        kind = type(env)
        if kind.run is not vf.SingleAgentEnv.run or kind.finalize is not vf.Env.finalize:
            raise EpisodeSpecError(
                f"{where}.env {self.config.env}: {kind.__name__} overrides run() or finalize() (several turns or agents, "
                "or judgement over the whole episode), which a response verl generated alone cannot replay; train it "
                "in trajectory mode (docs/verifiers.md)")
        self.task_cls = type(env.taskset).task_type()
        self.data_cls = self.task_cls.data_type()
        self.task_config = env.config.taskset.task
        sample = self.task_cls(self.data_cls.model_construct(), self.task_config)
        offline = [fn for fn in sample.hooks("reward") if _runtime_free(fn)] + list(self.task_config.judges)
        if not offline:
            raise EpisodeSpecError(
                f"{where}.env {self.config.env}: every reward of {self.task_cls.__name__} needs the agent's runtime "
                "(files or processes it left), which verl's response does not have; train it in trajectory mode")

    def required_request_fields(self) -> frozenset[str]:
        return frozenset({"ground_truths"})

    def _task(self, ground_truth: str | None, index: int) -> vf.Task:
        try:
            data = self.data_cls.model_validate_json(ground_truth or "")
        except ValueError as exc:
            raise ContractError(
                f"ground_truths[{index}] = {ground_truth!r:.80} is not this taskset's {self.data_cls.__name__} as JSON "
                "(python -m recipe.atropos.verifiers.prepare_data writes it)", field="ground_truths") from exc
        return self.task_cls(data, self.task_config)

    def check_request(self, request: EvaluationRequest) -> None:
        for index, truth in enumerate(request.ground_truths):
            self._task(truth, index)

    def score(self, request: EvaluationRequest) -> ScoredBatch:
        tasks = [self._task(t, i) for i, t in enumerate(request.ground_truths)]
        traces = asyncio.run(self._score_all(tasks, request.responses))
        infos = [{"rewards": {k: r.value for k, r in t.rewards.items() if r is not None}} for t in traces]
        return ScoredBatch(scores_B=np.array([t.reward for t in traces], dtype=np.float64), infos=infos)

    async def _score_all(self, tasks: list[vf.Task], responses: list[str]) -> list[vf.Trace]:
        semaphore = asyncio.Semaphore(self.config.concurrency)

        async def one(task: vf.Task, response: str) -> vf.Trace:
            trace = _scoring_trace(task, response)
            async with semaphore:
                await task.score(trace)  # no runtime: the runtime-free rewards, metrics and judges
            return trace

        return await asyncio.gather(*(one(t, r) for t, r in zip(tasks, responses)))

    def compute_advantages(self, request: EvaluationRequest, scored: ScoredBatch) -> list[SampleAdvantage]:
        return [float(a) for a in compute_grpo_outcome_advantages_np(scored.scores_B, request.group_index_B())]

    def metrics(self, request: EvaluationRequest, scored: ScoredBatch) -> dict[str, float]:
        metrics = group_score_metrics(scored.scores_B, request.group_index_B())
        names = sorted({name for info in scored.infos for name in info["rewards"]})
        for name in names:
            metrics[f"reward/{name}"] = float(np.mean([info["rewards"].get(name, 0.0) for info in scored.infos]))
        return metrics


if __name__ == "__main__":
    from recipe.atropos.environments.service import main

    sys.exit(main(VerifiersScoringEnvironment, prog="python -m recipe.atropos.verifiers.service"))
