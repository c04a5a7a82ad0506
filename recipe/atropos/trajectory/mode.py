"""Trajectory mode's part in the trainer's hooks: Atropos environments generate through the policy's
inference endpoints and push scored groups to atroposlib's run-api.

The trainer (grpo_atropos_trainer.py) calls the same methods on either mode's object; this one
- ``before_workers``: verl's weight-sync manager becomes ``GatedCheckpointEngineManager`` (through
  ``rollout.checkpoint_manager_class``), and a busy gateway port stops the run before the slow workers;
- ``after_workers``: the policy gateway starts in front of verl's rollout servers (closed while they
  sleep and take new weights), and verl's rollout manager is replaced by one that registers with
  run-api at the first step and pulls each step's batch (validation keeps verl's own);
- ``before_old_log_prob``: the groups' uids become verl's ``uid`` (GRPO groups);
- ``after_old_log_prob``: samples the gateway never generated (kept, ``unmatched_samples: keep``)
  get their recomputed log-probs as ``rollout_log_probs``, so verl's rollout correction weighs
  them 1 (trajectory/staleness.py);
- ``before_update``: the environments' token-level advantages, where sent, override GRPO; the
  step's metrics per environment (``atropos/env/<name>/...``, names from run-api's ``/envs``);
- ``rollout_dump``: the dataloader row's ground truth, which is not the environments' sample's, is
  left out of verl's rollout dump.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import requests
from omegaconf import open_dict

from verl import DataProto

from recipe.atropos.config import AtroposTrainerConfig
from recipe.atropos.grpo_computer import AdvantageOverrides, AtroposGRPOComputer
from recipe.atropos.trajectory.behavior_journal import BehaviorJournal
from recipe.atropos.trajectory.gateway import PolicyGateway, check_port_free
from recipe.atropos.trajectory.metrics import env_label, environment_metrics, episode_metrics
from recipe.atropos.trajectory import weight_sync
from recipe.atropos.placement.weight_sync import CLASS_PATH as SEPARATED_CLASS_PATH
from recipe.atropos.trajectory.rollout import GENERATED_AT, OVERRIDE_MASK, OVERRIDES, TrajectoryRolloutManager, group_uids
from recipe.atropos.trajectory.runapi_client import AtroposRunAPIClient
from recipe.atropos.trajectory.scored_data import TrajectoryLimits
from recipe.atropos.trajectory.staleness import BEHAVIOR_MATCHED, check_rollout_correction, fill_unmatched

logger = logging.getLogger(__name__)
# The rows' run-api env_id (trajectory/scored_data.py's non-tensor).
ENV_ID_KEY = "atropos_env_id"
# An episode runner's statistics on each of its groups' first row (JSON; "" elsewhere).
EPISODE_STATS_KEY = "atropos_episode_stats"


class TrajectoryMode:
    def __init__(self, atropos_config: AtroposTrainerConfig, grpo_computer: AtroposGRPOComputer):
        self.config = atropos_config
        self.grpo_computer = grpo_computer
        self.gateway: PolicyGateway | None = None
        self.rollout: TrajectoryRolloutManager | None = None
        self.env_names = RegisteredEnvNames(atropos_config.trajectory_api_url)

    def before_workers(self, trainer: Any) -> None:
        # Separate placement: the servers keep serving while the actor trains (placement/weight_sync.py).
        separate = self.config.rollout_placement == "separate"
        use_gated_weight_sync(trainer.config.actor_rollout_ref.rollout, SEPARATED_CLASS_PATH if separate else None)
        check_rollout_correction(trainer.config.algorithm.get("rollout_correction"), self.config.unmatched_samples)
        # Before the (slow) workers: a busy port is a clear stop now, not after the model loads.
        check_port_free(self.config.policy_gateway_host, self.config.policy_gateway_port)

    def after_workers(self, trainer: Any) -> None:
        self.gateway = self._start_gateway(trainer)
        # `fit()` generates through this attribute; validation keeps verl's own manager.
        self.rollout = self._rollout_manager(trainer)
        trainer.async_rollout_manager = self.rollout

    def _start_gateway(self, trainer: Any) -> PolicyGateway:
        """Environments generate through one gateway in front of every rollout replica's server."""
        cfg = self.config
        servers = [f"http://{address}" for address in trainer.llm_server_manager.get_addresses()]
        gateway = PolicyGateway(
            servers, host=cfg.policy_gateway_host, port=cfg.policy_gateway_port,
            hold_timeout_s=cfg.policy_hold_timeout_s, drain_timeout_s=cfg.policy_drain_timeout_s,
            max_held=cfg.policy_max_held_requests, api_key=cfg.policy_api_key,
            # A group is matched when pulled, up to max_staleness versions after it was generated
            # (+1: the version being generated now; +1: the initial sync's).
            keep_versions=cfg.max_staleness + 2,
        ).start()
        trainer.checkpoint_manager.gateway = gateway
        # A trainer restarted from a checkpoint knows what the gateway generated before (behavior_journal.py).
        journal = BehaviorJournal.for_run(trainer.config.trainer, gateway.records)
        if journal is not None:
            gateway.records.use_journal(journal)
        return gateway

    def _rollout_manager(self, trainer: Any) -> TrajectoryRolloutManager:
        cfg, config = self.config, trainer.config
        client = AtroposRunAPIClient(
            cfg.trajectory_api_url, timeout=cfg.timeout, retry_attempts=cfg.retry_attempts,
            retry_delay=cfg.retry_delay, max_wait_time=cfg.max_wait_time, api_key=cfg.api_key,
        )
        limits = TrajectoryLimits(
            max_prompt_length=config.data.max_prompt_length,
            max_response_length=config.data.max_response_length,
            pad_token_id=trainer.tokenizer.pad_token_id,
            vocab_size=len(trainer.tokenizer),  # an id beyond it costs its sample, not a worker's crash
        )
        return TrajectoryRolloutManager(
            client, limits, validation_manager=trainer.async_rollout_manager, config=config,
            total_steps=trainer.total_training_steps, batch_timeout_s=cfg.batch_timeout_s,
            records=self.gateway.records if self.gateway is not None else None,
        )

    def before_old_log_prob(self, batch: DataProto, step: int) -> None:
        # GRPO groups are the environments' groups (set again before the update: verl skips this
        # hook in rollout-correction bypass mode).
        batch.non_tensor_batch["uid"] = group_uids(batch)

    def after_old_log_prob(self, batch: DataProto, old_log_prob: DataProto) -> None:
        """Before verl's rollout correction reads them: unmatched rows' rollout_log_probs = their own
        old_log_probs (importance weight 1)."""
        fill_unmatched(batch.batch, old_log_prob.batch["old_log_probs"])

    def before_update(self, batch: DataProto, step: int) -> dict[str, float]:
        """The environments' token-level advantages (where sent) override GRPO on verl's batch;
        returns the step's ``atropos/...`` metrics."""
        batch.non_tensor_batch["uid"] = group_uids(batch)
        if BEHAVIOR_MATCHED in batch.batch.keys():
            batch.pop(batch_keys=[BEHAVIOR_MATCHED])  # used by after_old_log_prob; the actor does not need it
        keys = [k for k in (OVERRIDES, OVERRIDE_MASK) if k in batch.batch.keys()]
        sent = batch.pop(batch_keys=keys).batch if keys else None
        overrides = AdvantageOverrides(sent[OVERRIDES], sent[OVERRIDE_MASK]) if sent is not None else None
        output = self.grpo_computer.compute_from_overrides(
            batch.batch["token_level_rewards"], batch.batch["response_mask"], batch.non_tensor_batch["uid"], overrides
        )
        batch.batch["advantages"] = output.advantages_BT
        batch.batch["returns"] = output.returns_BT
        metrics = {
            **output.metrics,
            **(self.rollout.last_metrics if self.rollout is not None else {}),
            **self._environment_metrics(batch),
        }
        # GRPO on environments' scores is this mode's design, not a fallback: only advantages that
        # were sent and could not be used are (dropped in the conversion, or rejected here).
        fell_back = metrics.get("atropos/trajectory/dropped/advantages", 0.0) + metrics.get("atropos/shape_mismatches", 0.0)
        metrics["atropos/fallback"] = 1.0 if fell_back else 0.0
        return metrics

    def _environment_metrics(self, batch: DataProto) -> dict[str, float]:
        """``atropos/env/<name>/...`` of the step's rows (metrics.environment_metrics)."""
        env_ids = batch.non_tensor_batch.get(ENV_ID_KEY)
        if env_ids is None:
            return {}
        mask = batch.batch["response_mask"].float()
        scores = batch.batch["token_level_rewards"].float().sum(-1)
        # A sequence's advantage: its token mean over the response (GRPO's is the same on every token).
        advantages = (batch.batch["advantages"].float() * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        metrics = environment_metrics(
            list(env_ids), scores.cpu().numpy(), advantages.cpu().numpy(), names=self.env_names.lookup(env_ids)
        )
        stats = batch.non_tensor_batch.get(EPISODE_STATS_KEY)
        return metrics if stats is None else {**metrics, **episode_metrics(list(env_ids), list(stats))}

    def rollout_dump(self, batch: DataProto) -> tuple[DataProto, dict[str, list]]:
        """The batch verl dumps (``trainer.rollout_data_dir``) and this mode's columns for it: when the
        gateway recorded each completion (``generated_at``) and the environment it came from
        (``environment``: the name it registered or its entry's, as in the per-environment metrics)."""
        # The environments' samples only joined the dataloader's rows (which drive `fit()`): that
        # row's ground truth is not theirs, so it is left out of the dump.
        non_tensors = {k: v for k, v in batch.non_tensor_batch.items() if k != "reward_model"}
        columns: dict[str, list] = {}
        if GENERATED_AT in non_tensors:
            columns["generated_at"] = [None if t != t else float(t) for t in non_tensors[GENERATED_AT]]
        if ENV_ID_KEY in non_tensors:
            env_ids = non_tensors[ENV_ID_KEY]
            names = self.env_names.lookup(env_ids)
            columns["environment"] = [env_label(e, names) for e in env_ids]
        return DataProto(batch=batch.batch, non_tensor_batch=non_tensors, meta_info=batch.meta_info), columns

    def close(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()
            if self.gateway.records.journal is not None:
                self.gateway.records.journal.close()


class RegisteredEnvNames:
    """run-api's ``env_id`` -> registered name, read from ``GET /envs`` (recipe.atropos.launcher.run_api).

    Asked again only when a batch holds an id it has not seen (an environment registered since,
    e.g. after a restart). A run-api without the route (atroposlib's own, 404) or one that does not
    answer leaves the ids unnamed (``env_<id>``); that is said once and never stops training.
    """

    def __init__(self, api_url: str | None, *, timeout_s: float = 2.0):
        self.api_url = (api_url or "").rstrip("/")
        self.timeout_s = timeout_s
        self.names: dict[int, str] = {}
        self._unsupported = not self.api_url
        self._warned = False

    def lookup(self, env_ids: Any) -> Mapping[int, str]:
        wanted = {int(e) for e in env_ids if isinstance(e, (int, np.integer)) and not isinstance(e, bool)}
        if wanted - self.names.keys() and not self._unsupported:
            self._refresh()
        return self.names

    def _refresh(self) -> None:
        try:
            answer = requests.get(f"{self.api_url}/envs", timeout=self.timeout_s)
        except requests.RequestException as exc:  # asked again at the next unseen id
            self._warn_once(f"{type(exc).__name__}: {exc}")
            return
        try:
            envs = answer.json().get("envs") if answer.status_code == 200 else None
        except (ValueError, AttributeError):
            envs = None
        if not isinstance(envs, list):  # a run-api without the route: never asked again
            self._unsupported = True
            self._warn_once(f"HTTP {answer.status_code}")
            return
        for env in envs:
            if isinstance(env, Mapping) and isinstance(env.get("env_id"), int) and env.get("name"):
                self.names[env["env_id"]] = str(env["name"])

    def _warn_once(self, reason: str) -> None:
        if not self._warned:
            self._warned = True
            logger.warning(
                "GET %s/envs gave no environment names (%s): per-environment metrics are named env_<id>; "
                "run-api started as `python -m recipe.atropos.launcher.run_api` names them", self.api_url, reason,
            )


def use_gated_weight_sync(rollout: Any, class_path: str | None = None) -> None:
    """``rollout.checkpoint_manager_class`` = the gated manager (``class_path``, default the colocated
    one); another class there is refused."""
    class_path = class_path or weight_sync.CLASS_PATH
    chosen = rollout.get("checkpoint_manager_class")
    if chosen and chosen != class_path:
        raise ValueError(
            f"trainer.atropos.mode=trajectory closes the policy gateway around weight syncs through "
            f"actor_rollout_ref.rollout.checkpoint_manager_class={class_path}; got {chosen!r}"
        )
    with open_dict(rollout):
        rollout.checkpoint_manager_class = class_path
