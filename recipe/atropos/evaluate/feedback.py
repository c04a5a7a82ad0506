"""EnvironmentFeedback: one step's round trip to the environment service, and what to do when it fails.

The trainer calls `submit(batch)` once generation is done (the request then runs on a background
thread, concurrently with verl's old-log-prob computation) and `apply(batch)` right before the
actor update: it waits for the answer, turns it into advantages with AtroposGRPOComputer and
writes them into the batch. A service that is down, too slow or answering nonsense makes the step
fall back to the GRPO advantages verl already computed from its own reward (or stops the run, with
`fallback_to_grpo=false`).

With fallback on, no answer stops the run, whatever its shape or values; only a refused API key
does (a setting to fix). A sample whose part of the answer is unusable falls back alone
(`atropos/fallback_samples/<reason>`, see AtroposGRPOComputer); a step that falls back as a whole
says why in `atropos/fallback/<reason>`, one of STEP_FALLBACK_REASONS.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

import numpy as np
import requests
import torch

from recipe.atropos.datatypes import EvaluationResult, InvalidSample
from recipe.atropos.errors import AtroposAPIError, AtroposProtocolError, AtroposRequestError
from recipe.atropos.evaluate.client import AtroposEnvironmentClient
from recipe.atropos.config import AtroposTrainerConfig
from recipe.atropos.evaluate.request import BatchView, build_environment_request
from recipe.atropos.grpo_computer import AtroposGRPOComputer, advantage_metrics
from verl import DataProto

logger = logging.getLogger("verl.recipe.atropos")

SERVICE_HINT = (
    "Start the environment service (e.g. `python recipe/atropos/environments/gsm8k_server.py serve`) and check "
    "trainer.atropos.api_url, or set trainer.atropos.fallback_to_grpo=true to train on standard GRPO while it is down."
)


OUTAGE_PROBE_TIMEOUT_S = 5.0  # the one /health probe per step while the service is down

# Why a whole step used standard GRPO (metrics `atropos/fallback/<reason>`, 1 for the step's reason):
# unavailable: down, too slow, or kept failing (5xx); request_rejected: a 4xx other than 401/403;
# invalid_answer: an answer that cannot be pinned on samples (not an object, lists of the wrong
# length, undecodable); reordered_batch: the batch's order changed before the update;
# no_overrides: the answer arrived but no sample took it (all null, or all fell back alone).
STEP_FALLBACK_REASONS = ("unavailable", "request_rejected", "invalid_answer", "reordered_batch", "no_overrides")


class _BatchReordered(ValueError):
    """The batch's uid order changed between the request and the update."""


@dataclasses.dataclass(frozen=True)
class _PendingRequest:
    """A request in flight, and what it was made for."""

    future: Future
    uids_B: np.ndarray
    response_mask_BT: torch.Tensor
    retries_before: int


class EnvironmentServiceError(RuntimeError):
    """The service failed and `fallback_to_grpo` is false: the run stops here, before any update."""


class EnvironmentFeedback:
    """Requests advantages for each step's batch and applies them (see the module docstring)."""

    def __init__(
        self,
        config: AtroposTrainerConfig,
        tokenizer,
        computer: AtroposGRPOComputer,
        client: Optional[AtroposEnvironmentClient] = None,
        key_hint: str = "trainer.atropos.api_key (or ATROPOS_API_KEY)",
        name: Optional[str] = None,
    ):
        self.config = config
        self.key_hint = key_hint  # where the key is set, for a refused key's error
        # What messages call the service: with several environments, its name too.
        self.label = f"environment service at {config.api_url}" if name is None else (
            f"environment service {name!r} at {config.api_url}")
        self.service_hint = SERVICE_HINT if name is None else SERVICE_HINT.replace(
            "trainer.atropos.api_url", f"trainer.atropos.environments.{name}.api_url")
        self.tokenizer = tokenizer
        self.computer = computer
        self.client = client or AtroposEnvironmentClient(
            config.api_url,
            timeout=config.timeout,
            retry_attempts=config.retry_attempts,
            retry_delay=config.retry_delay,
            max_wait_time=config.max_wait_time,
            api_key=config.api_key,
            encoding=config.encoding,
        )
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="atropos-request")
        self._pending: Optional[_PendingRequest] = None
        self._outage_steps = 0  # consecutive steps without a usable answer
        self.fallback_steps_total = 0

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.client.close()

    def check_health(self) -> bool:
        """Say at start what will happen: overrides from the service, GRPO until it answers, or stop."""
        healthy = self.client.health_check()
        where = self.label
        if healthy:
            source = "its advantages" if self.config.use_advantages else "GRPO on its scores"
            logger.warning("%s is healthy: training uses %s.", where, source)
        elif self.config.fallback_to_grpo:
            logger.warning(
                "%s does not answer /health: training starts on standard GRPO (verl's reward) and switches to the "
                "service as soon as it answers (trainer.atropos.fallback_to_grpo=true).", where,
            )
            self._outage_steps = 1
        else:
            raise EnvironmentServiceError(f"{where} does not answer /health. {self.service_hint}")
        return healthy

    def submit(self, batch: DataProto, step: int) -> None:
        """Start this step's request on the background thread."""
        # The request and the alignment of its answer use this mask, as it is now: verl may change
        # the batch's own before the update (rollout correction drops tokens).
        view = BatchView.of(batch)
        view = dataclasses.replace(view, response_mask_BT=view.response_mask_BT.clone())
        self._pending = _PendingRequest(
            future=self._executor.submit(self._request, view, step),
            uids_B=view.uids_B,
            response_mask_BT=view.response_mask_BT,
            retries_before=self.client.stats.retries,
        )

    def _request(self, view: BatchView, step: int) -> tuple[EvaluationResult, float]:
        if self._outage_steps and not self.client.health_check(timeout_s=min(OUTAGE_PROBE_TIMEOUT_S, self.config.timeout)):
            # Still down: one quick probe instead of a full retry budget every step of an outage.
            raise ConnectionError(f"{self.config.api_url}/health does not answer")
        request = build_environment_request(view, self.tokenizer, send_token_ids=self.config.send_token_ids, step=step)
        start = time.perf_counter()
        result = self.client.evaluate(request)
        return result, time.perf_counter() - start

    def apply(self, batch: DataProto, step: int) -> dict[str, float]:
        """Wait for the answer, write the advantages into `batch`, return the `atropos/...` metrics."""
        if self._pending is None:  # e.g. verl skipped old-log-prob (rollout-correction bypass mode)
            self.submit(batch, step)
        pending, self._pending = self._pending, None
        wait_start = time.perf_counter()
        metrics: dict[str, float] = {}
        reason = None
        try:
            result, latency_s = pending.future.result()
            if not np.array_equal(pending.uids_B, batch.non_tensor_batch["uid"]):
                raise _BatchReordered("the batch was reordered between the request and the update")
        except (AtroposAPIError, requests.RequestException, ConnectionError, ValueError) as exc:
            reason = self._on_failure(exc, step)
            result, latency_s = None, float("nan")
        metrics["atropos/wait_s"] = time.perf_counter() - wait_start

        output = None
        if result is not None:
            self._answered()
            output, reason = self._compute(result, batch, pending, step)
        if output is None:
            # verl's compute_advantage already gave this batch standard GRPO on its own reward.
            metrics.update(advantage_metrics(batch.batch["advantages"], batch.batch["response_mask"], None))
        else:
            batch.batch["advantages"] = output.advantages_BT
            batch.batch["returns"] = output.returns_BT
            metrics.update(output.metrics)
            metrics.update({f"atropos/env/{name}": value for name, value in result.metrics.items()})
            scores = result.scores[np.isfinite(result.scores)]
            metrics["atropos/env/mean_score"] = float(np.mean(scores)) if len(scores) else 0.0
            metrics["atropos/env_metrics_ignored"] = float(len(result.ignored_metrics))
            if metrics["atropos/fallback"]:
                reason = "no_overrides"
        metrics.update({f"atropos/fallback/{name}": float(name == reason) for name in STEP_FALLBACK_REASONS})
        self.fallback_steps_total += int(metrics["atropos/fallback"])
        metrics["atropos/fallback_steps_total"] = float(self.fallback_steps_total)
        metrics["atropos/api_latency_s"] = latency_s
        metrics["atropos/retries"] = float(self.client.stats.retries - pending.retries_before)
        return metrics

    def _answered(self) -> None:
        """The service answered: end an outage, saying so once."""
        if self._outage_steps:
            logger.warning("%s answers again after %d step(s): overrides resume.", self.label, self._outage_steps)
            self._outage_steps = 0

    def _check_scores(self, result: EvaluationResult) -> None:
        """With fallback off, a bad score stops the run (AtroposProtocolError), as before any update."""
        if result.invalid_scores and not self.config.fallback_to_grpo:
            index, invalid = next(iter(result.invalid_scores.items()))
            raise AtroposProtocolError(invalid.message, field="scores", sample_index=index)

    def _compute(self, result: EvaluationResult, batch: DataProto, pending: _PendingRequest, step: int):
        """(the computer's output, None), or (None, reason) when the answer is unusable as a whole.

        With fallback off a bad sample raises AtroposProtocolError (from the computer, or here for
        a bad score), as before any update.
        """
        self._check_scores(result)
        try:
            output = self.computer.compute(
                batch.batch["token_level_rewards"], batch.batch["response_mask"], batch.non_tensor_batch["uid"],
                self._env_advantages(result, batch.non_tensor_batch["uid"]), alignment_mask_BT=pending.response_mask_BT,
            )
        except (AtroposAPIError, ValueError) as exc:
            # Not expected with fallback on (samples fall back one by one); kept so that no answer
            # can stop the run.
            if not self.config.fallback_to_grpo:
                raise
            logger.warning("step %d: the service's answer could not be used (%s); standard GRPO this step.", step, exc)
            return None, "invalid_answer"
        return output, None

    def _env_advantages(self, result: EvaluationResult, uids_B: np.ndarray) -> list:
        if self.config.use_advantages:
            return result.advantages
        # The service as a reward model: GRPO on its scores, one float per sample; a sample whose
        # score is unusable falls back alone and leaves its group's statistics.
        valid_B = np.isfinite(result.scores)
        advantages: list = [None] * len(valid_B)
        for i in np.flatnonzero(~valid_B).tolist():
            invalid = result.invalid_scores.get(i)
            advantages[i] = InvalidSample("invalid_score", invalid.message if invalid else f"scores[{i}] is not finite")
        if valid_B.any():
            values = self.computer.outcome_advantages(result.scores[valid_B], uids_B[valid_B])
            for i, value in zip(np.flatnonzero(valid_B).tolist(), values.tolist()):
                advantages[i] = value
        return advantages

    def _on_failure(self, exc: Exception, step: int) -> str:
        """Stop the run (a refused key, or fallback off), or return the step's fallback reason."""
        if isinstance(exc, AtroposRequestError) and exc.status in (401, 403):
            # A refused key is a setting to fix, not an outage: falling back would train a whole run
            # on plain GRPO.
            raise EnvironmentServiceError(
                f"step {step}: the {self.label} refused the API key "
                f"(HTTP {exc.status}): set {self.key_hint} to the service's key"
            ) from exc
        if not self.config.fallback_to_grpo:
            raise EnvironmentServiceError(
                f"step {step}: the {self.label} failed: {exc}. {self.service_hint}"
            ) from exc
        if self._outage_steps == 0:
            logger.warning(
                "step %d: %s failed (%s); using standard GRPO until it answers again.", step, self.label, exc,
            )
        self._outage_steps += 1
        if isinstance(exc, _BatchReordered):
            return "reordered_batch"
        if isinstance(exc, AtroposRequestError):
            return "request_rejected"
        if isinstance(exc, AtroposProtocolError):
            return "invalid_answer"
        return "unavailable"
