"""MultiEnvironmentFeedback: each sample judged by the environment owning its data_source.

`trainer.atropos.environments` (evaluate/environments.py) maps names to services and verl data
sources. Each step, `submit` splits the batch by `data_source` (verl's dataset column) and sends
every environment its share at once, each on its own thread, while verl computes old log-probs;
`apply` gathers the answers into one list of per-sample advantages and runs the GRPO estimator once
over the whole batch. A GRPO group (verl's `uid`) shares one prompt, so one data source: the split
keeps groups whole, and this is checked.

Each environment is one EnvironmentFeedback (its client, its outage state, its warnings): when one
is down, too slow or refuses a request, its samples fall back to standard GRPO (the estimator's
own, on verl's reward) and the other environments' samples keep their advantages. A refused key
or `fallback_to_grpo=false` stops the run as with one service. Metrics per environment:
`atropos/env/<name>/{mean_score,accuracy,advantage_mean,advantage_std,fallback,latency_s,batch_share}`,
plus the service's own metrics under `atropos/env/<name>/`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping
from concurrent.futures import Future
from typing import Any, Optional

import numpy as np
import requests
import torch

from recipe.atropos.config import AtroposTrainerConfig
from recipe.atropos.datatypes import EvaluationResult
from recipe.atropos.errors import AtroposAPIError
from recipe.atropos.evaluate.environments import (
    EnvironmentSpec,
    UnknownDataSourceError,
    resolve_api_keys,
    route_data_sources,
)
from recipe.atropos.evaluate.feedback import STEP_FALLBACK_REASONS, EnvironmentFeedback, _BatchReordered
from recipe.atropos.evaluate.request import BatchView
from recipe.atropos.grpo_computer import AtroposGRPOComputer, advantage_metrics
from verl import DataProto

__all__ = ["ENV_METRICS", "MultiEnvironmentFeedback", "split_by_environment"]

logger = logging.getLogger("verl.recipe.atropos")

DATA_SOURCE = "data_source"
# The per-environment metrics, `atropos/env/<name>/<metric>`, every step the environment has samples.
ENV_METRICS = ("mean_score", "accuracy", "advantage_mean", "advantage_std", "fallback", "latency_s", "batch_share")


def split_by_environment(
    specs: Mapping[str, EnvironmentSpec], data_sources_B: np.ndarray, uids_B: np.ndarray
) -> dict[str, np.ndarray]:
    """Environment name -> the batch rows it judges (ascending), for the environments with rows.

    Raises UnknownDataSourceError for a data_source no environment owns, and ValueError for a GRPO
    group (uid) whose rows span two environments (its advantages would mix two judges).
    """
    sources_B = np.array([str(s) for s in data_sources_B], dtype=object)
    owner = route_data_sources(specs, sources_B)
    names_B = np.array([owner[s] for s in sources_B], dtype=object)
    group_owner: dict[Any, str] = {}
    for uid, name, source in zip(uids_B.tolist(), names_B.tolist(), sources_B.tolist()):
        if group_owner.setdefault(uid, name) != name:
            raise ValueError(
                f"GRPO group uid={uid!r} has rows of environment {group_owner[uid]!r} and {name!r} (data_source "
                f"{source!r}): verl gives one uid to the responses of one prompt, which have one data_source; "
                "check that the dataset's rows do not share uids"
            )
    return {name: np.flatnonzero(names_B == name) for name in specs if (names_B == name).any()}


@dataclasses.dataclass(frozen=True)
class _PendingStep:
    futures: dict[str, Future]
    rows: dict[str, np.ndarray]
    uids_B: np.ndarray
    response_mask_BT: torch.Tensor
    retries_before: dict[str, int]


class MultiEnvironmentFeedback:
    """EnvironmentFeedback's methods (check_health, submit, apply, close) over several environments."""

    def __init__(
        self,
        config: AtroposTrainerConfig,
        tokenizer,
        computer: AtroposGRPOComputer,
        specs: Mapping[str, EnvironmentSpec],
        environ: Optional[Mapping[str, str]] = None,
    ):
        """``specs``: ``config.environments`` as parsed (evaluate/environments.py), once, by the trainer."""
        if not specs:
            raise ValueError("MultiEnvironmentFeedback needs trainer.atropos.environments; got none")
        self.config = config
        self.computer = computer
        self.specs = resolve_api_keys(specs, config.api_key, os.environ if environ is None else environ)
        # One lane per environment: its own client, background thread, outage state and warnings.
        self.lanes = {
            name: EnvironmentFeedback(
                dataclasses.replace(config, api_url=spec.api_url, api_key=spec.api_key, environments=None),
                tokenizer, computer, key_hint=spec.key_hint, name=name,
            )
            for name, spec in self.specs.items()
        }
        self._pending: Optional[_PendingStep] = None
        self.fallback_steps_total = 0

    def close(self) -> None:
        for lane in self.lanes.values():
            lane.close()

    def check_health(self) -> dict[str, bool]:
        """Each environment's health check (see EnvironmentFeedback.check_health); stops the run
        when one is down and fallback is off."""
        return {name: lane.check_health() for name, lane in self.lanes.items()}

    def check_data_sources(self, data_sources) -> None:
        """Every data_source value has an environment (UnknownDataSourceError naming the others)."""
        route_data_sources(self.specs, data_sources)

    def submit(self, batch: DataProto, step: int) -> None:
        """Send each environment its rows, all at once, each on its own background thread."""
        if DATA_SOURCE not in batch.non_tensor_batch:
            raise UnknownDataSourceError(
                f"the batch has no {DATA_SOURCE!r} (verl's dataset column), which trainer.atropos.environments routes "
                "by: give every row of data.train_files a data_source, or use the single service at api_url"
            )
        view = BatchView.of(batch)
        view = dataclasses.replace(view, response_mask_BT=view.response_mask_BT.clone())
        rows = split_by_environment(self.specs, batch.non_tensor_batch[DATA_SOURCE], view.uids_B)
        futures = {}
        for name, rows_N in rows.items():
            lane = self.lanes[name]
            futures[name] = lane._executor.submit(lane._request, view.select(rows_N), step)
        self._pending = _PendingStep(
            futures=futures, rows=rows, uids_B=view.uids_B, response_mask_BT=view.response_mask_BT,
            retries_before={name: lane.client.stats.retries for name, lane in self.lanes.items()},
        )

    def apply(self, batch: DataProto, step: int) -> dict[str, float]:
        """Wait for every environment, write the advantages into `batch`, return the metrics."""
        if self._pending is None:  # e.g. verl skipped old-log-prob (rollout-correction bypass mode)
            self.submit(batch, step)
        pending, self._pending = self._pending, None
        wait_start = time.perf_counter()
        uids_B = batch.non_tensor_batch["uid"]
        advantages, results, reasons = self._collect(pending, uids_B, step)
        metrics: dict[str, float] = {"atropos/wait_s": time.perf_counter() - wait_start}
        take_B = torch.zeros(len(pending.uids_B), dtype=torch.bool)
        if results:
            try:
                take_B, override_metrics = self._override(batch, pending, advantages, uids_B)
                metrics.update(override_metrics)
            except (AtroposAPIError, ValueError) as exc:
                if not self.config.fallback_to_grpo:
                    raise
                logger.warning("step %d: the answers could not be used (%s); standard GRPO this step.", step, exc)
                reasons.update({name: "invalid_answer" for name in results})
                results = {}
        if not results:  # nothing usable: verl's own GRPO stays, as with one service
            metrics.update(advantage_metrics(batch.batch["advantages"], batch.batch["response_mask"], None))
        metrics.update(self._env_metrics(batch, pending, results, take_B))
        metrics.update(self._step_metrics(metrics["atropos/fallback"], pending, results, reasons))
        return metrics

    def _collect(self, pending: _PendingStep, uids_B: np.ndarray, step: int):
        """Each environment's answer: (advantages per row, None where none), the usable results by
        environment with their latency, and why each other environment's samples fell back."""
        reordered = not np.array_equal(pending.uids_B, uids_B)
        advantages: list = [None] * len(pending.uids_B)
        results: dict[str, tuple[EvaluationResult, float]] = {}
        reasons: dict[str, str] = {}  # environment -> why all its samples fell back
        for name, future in pending.futures.items():
            lane = self.lanes[name]
            try:
                result, latency_s = future.result()
                if reordered:
                    raise _BatchReordered("the batch was reordered between the request and the update")
            except (AtroposAPIError, requests.RequestException, ConnectionError, ValueError) as exc:
                reasons[name] = lane._on_failure(exc, step)  # raises for a refused key or fallback off
                continue
            lane._answered()
            lane._check_scores(result)
            rows_N = pending.rows[name]
            for row, value in zip(rows_N.tolist(), lane._env_advantages(result, uids_B[rows_N])):
                advantages[row] = value
            results[name] = (result, latency_s)
        return advantages, results, reasons

    def _override(self, batch: DataProto, pending: _PendingStep, advantages: list, uids_B: np.ndarray):
        """The environments' advantages over GRPO's, written into `batch`; (rows overridden, metrics)."""
        overrides = self.computer.build_overrides(advantages, pending.response_mask_BT)
        overrides = self.computer.within_dtype(overrides, batch.batch["response_mask"], batch.batch["token_level_rewards"].dtype)
        output = self.computer.compute_from_overrides(
            batch.batch["token_level_rewards"], batch.batch["response_mask"], uids_B, overrides
        )
        batch.batch["advantages"] = output.advantages_BT
        batch.batch["returns"] = output.returns_BT
        return overrides.override_mask_B.cpu(), output.metrics

    def _step_metrics(self, fallback: float, pending: _PendingStep, results: Mapping, reasons: Mapping) -> dict[str, float]:
        """The step's fallback, latency and retry metrics over all environments."""
        scores = [r.scores[np.isfinite(r.scores)] for r, _ in results.values()]
        scores = np.concatenate(scores) if scores else np.zeros(0)
        step_reason = next(iter(reasons.values()), "no_overrides") if fallback else None
        self.fallback_steps_total += int(fallback)
        latencies = [latency for _, latency in results.values()]
        return {
            "atropos/env/mean_score": float(scores.mean()) if len(scores) else 0.0,
            **{f"atropos/fallback/{r}": float(r == step_reason) for r in STEP_FALLBACK_REASONS},
            "atropos/fallback_steps_total": float(self.fallback_steps_total),
            "atropos/fallback_environments": float(len(reasons)),
            "atropos/api_latency_s": max(latencies) if latencies else float("nan"),
            "atropos/retries": float(
                sum(lane.client.stats.retries - pending.retries_before[name] for name, lane in self.lanes.items())
            ),
        }

    def _env_metrics(
        self, batch: DataProto, pending: _PendingStep, results: Mapping[str, tuple[EvaluationResult, float]],
        take_B: torch.Tensor,
    ) -> dict[str, float]:
        """`atropos/env/<name>/...` for every environment (batch_share only, when it had no rows)."""
        metrics: dict[str, float] = {}
        batch_size = len(pending.uids_B)
        advantages_BT = batch.batch["advantages"]
        mask_BT = batch.batch["response_mask"].bool()
        for name in self.specs:
            prefix = f"atropos/env/{name}/"
            rows_N = pending.rows.get(name)
            if rows_N is None:
                metrics[prefix + "batch_share"] = 0.0
                continue
            rows_t = torch.as_tensor(rows_N, dtype=torch.long)
            on_response = advantages_BT[rows_t][mask_BT[rows_t]].float()
            env = {
                "batch_share": len(rows_N) / max(batch_size, 1),
                "fallback": 1.0 - take_B[rows_t].float().mean().item(),
                "advantage_mean": on_response.mean().item() if on_response.numel() else 0.0,
                "advantage_std": on_response.std().item() if on_response.numel() > 1 else 0.0,
                "latency_s": float("nan"),
            }
            if name in results:
                result, latency_s = results[name]
                finite = result.scores[np.isfinite(result.scores)]
                # The service's own metrics first (GSM8K and reasoning-gym report accuracy); else
                # the share of samples that scored above 0.
                env.update({metric: value for metric, value in result.metrics.items() if metric not in env})
                env["latency_s"] = latency_s
                env["mean_score"] = float(finite.mean()) if len(finite) else 0.0
                env.setdefault("accuracy", float((finite > 0).mean()) if len(finite) else 0.0)
            metrics.update({prefix + metric: float(value) for metric, value in env.items()})
        return metrics
