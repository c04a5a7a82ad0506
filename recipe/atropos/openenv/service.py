"""A single-step OpenEnv environment as an evaluate-mode environment service.

In evaluate mode verl generates and a service judges (docs/environment_service.md). An OpenEnv
environment whose episodes are one step (reset poses the question, one step scores the answer) can
be that judge: for each sample this adapter resets the OpenEnv server with the sample's ground truth
(its reset arguments), steps it with verl's response text as the action, and returns the step's
reward as the sample's score; advantages are GRPO's outcome advantages within each group.

    .venv-openenv/bin/python -m uvicorn recipe.atropos.openenv.examples.arithmetic_env:app --port 8010 &
    python -m recipe.atropos.openenv.service serve --slurm false --port 9001 --env.url http://127.0.0.1:8010

- Ground truth (`reward_model.ground_truth` in verl's parquet): a JSON object of reset arguments
  (`{"seed": 12}`) or a bare integer (the seed). `python -m recipe.atropos.openenv.prepare_data`
  writes such rows, with the first observation as the prompt.
- Action: as the driver maps it (actions.py): `--env.action_field` / `--env.action_function`, or the
  action schema's one required string field.
- An answer that cannot be played (no action parsed, VALIDATION_ERROR) scores `--env.parse_penalty`
  (counted: `unparseable_rate`, `rejected_rate`); an episode the server leaves running after the step
  is scored by that step's reward (`not_done_rate`). A server that errors, closes or stalls fails
  the request (HTTP 500): the trainer retries it, then falls back to GRPO on its own reward.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import numpy as np
from pydantic import Field

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
from recipe.atropos.openenv.actions import ActionMapper, action_mapper
from recipe.atropos.openenv.session import ActionRejected, OpenEnvSession, fetch_json, wait_until_healthy

__all__ = ["OpenEnvServiceConfig", "OpenEnvServiceEnvironment", "reset_arguments"]


class OpenEnvServiceConfig(EnvConfig):
    url: str = Field(default="http://127.0.0.1:8010", description="the OpenEnv server, http://host:port")
    action_field: str | None = Field(default=None, description="the action field that gets the response text")
    action_function: str | None = Field(default=None,
                                        description="module:callable(text, observation) -> action dict")
    parse_penalty: float = Field(default=0.0, description="score of a response that cannot be played")
    concurrency: int = Field(default=16, ge=1, description="episodes (WebSocket sessions) at once per request")
    step_timeout_s: float = Field(default=60.0, gt=0, description="a reset or step unanswered this long fails the request")
    startup_timeout_s: float = Field(default=120.0, gt=0, description="how long the server may take to answer /health")


def reset_arguments(ground_truth: str | None, index: int) -> dict[str, Any]:
    """A sample's reset arguments from its ground truth; ContractError (HTTP 422) naming the sample."""
    text = (ground_truth or "").strip()
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if isinstance(value, int) and not isinstance(value, bool):
        return {"seed": value}
    if isinstance(value, dict):
        return value
    raise ContractError(f"ground_truths[{index}] = {ground_truth!r:.80} is not the sample's reset arguments: give a "
                        "JSON object ({\"seed\": 12}) or an integer seed (python -m recipe.atropos.openenv.prepare_data "
                        "writes them)", field="ground_truths")


class OpenEnvServiceEnvironment(Environment):
    """Judges verl's responses by one OpenEnv step each."""

    name = "openenv"
    Config = OpenEnvServiceConfig

    def setup(self) -> None:
        self.to_action: ActionMapper = asyncio.run(self._action_mapper())

    async def _action_mapper(self) -> ActionMapper:
        config = self.config
        await wait_until_healthy(config.url, config.startup_timeout_s)
        schema = await fetch_json(config.url, "/schema")
        return action_mapper(schema.get("action", {}), field=config.action_field, function=config.action_function,
                             key="--env", url=config.url)

    def required_request_fields(self) -> frozenset[str]:
        return frozenset({"ground_truths"})

    def check_request(self, request: EvaluationRequest) -> None:
        for index, truth in enumerate(request.ground_truths):
            reset_arguments(truth, index)

    def score(self, request: EvaluationRequest) -> ScoredBatch:
        resets = [reset_arguments(t, i) for i, t in enumerate(request.ground_truths)]
        infos = asyncio.run(self._play_all(resets, request.responses))
        return ScoredBatch(scores_B=np.array([i["score"] for i in infos], dtype=np.float64), infos=infos)

    async def _play_all(self, resets: list[dict[str, Any]], responses: list[str]) -> list[dict[str, Any]]:
        """Each sample on a session of its own kind: `concurrency` sessions, each playing samples in turn."""
        pending = list(enumerate(zip(resets, responses)))[::-1]
        infos: list[dict[str, Any]] = [{}] * len(responses)

        async def worker() -> None:
            session = await OpenEnvSession.open(self.config.url, open_timeout_s=self.config.step_timeout_s)
            try:
                while pending:
                    index, (reset, response) = pending.pop()
                    infos[index] = await self._play(session, reset, response)
            finally:
                await session.close()

        await asyncio.gather(*(worker() for _ in range(min(self.config.concurrency, len(responses)))))
        return infos

    async def _play(self, session: OpenEnvSession, reset: dict[str, Any], response: str) -> dict[str, Any]:
        timeout = self.config.step_timeout_s
        first = await session.reset(reset, timeout_s=timeout)
        try:
            action = self.to_action(response, first.observation)
        except Exception:  # the parser says the text is no action: the policy's mistake
            return {"score": self.config.parse_penalty, "outcome": "unparseable", "done": True}
        try:
            result = await session.step(action, timeout_s=timeout)
        except ActionRejected:
            return {"score": self.config.parse_penalty, "outcome": "rejected", "done": True}
        return {"score": float(result.reward or 0.0), "outcome": "scored", "done": result.done}

    def compute_advantages(self, request: EvaluationRequest, scored: ScoredBatch) -> list[SampleAdvantage]:
        advantages_B = compute_grpo_outcome_advantages_np(scored.scores_B, request.group_index_B())
        return [float(a) for a in advantages_B]

    def metrics(self, request: EvaluationRequest, scored: ScoredBatch) -> dict[str, float]:
        metrics = group_score_metrics(scored.scores_B, request.group_index_B())
        n = max(len(scored.infos), 1)
        metrics.update(
            unparseable_rate=sum(i["outcome"] == "unparseable" for i in scored.infos) / n,
            rejected_rate=sum(i["outcome"] == "rejected" for i in scored.infos) / n,
            not_done_rate=sum(not i["done"] for i in scored.infos) / n,
        )
        return metrics


if __name__ == "__main__":
    from recipe.atropos.environments.service import main

    sys.exit(main(OpenEnvServiceEnvironment, prog="python -m recipe.atropos.openenv.service"))
