"""RayGRPOAtroposTrainer: verl's RayPPOTrainer with advantages from Atropos-style environments.

Only verl's own hooks are used (no copy of `fit()`). Two modes (`trainer.atropos.mode`):

evaluate (default): verl generates; the environment service judges.
- `init_workers`: a health check first, which says whether the service's advantages or standard
  GRPO will be used (or stops the run when the service is down and fallback is off);
- `_compute_old_log_prob`: the batch goes to the service on a background thread, concurrently
  with the old-log-prob computation;
- `_update_actor`: the answer becomes token-level overrides of the GRPO estimator
  (AtroposGRPOComputer), written into the batch before the update.

trajectory: Atropos environments generate through the policy's inference endpoints and push
scored groups to atroposlib's run-api.
- `init_workers`: verl's weight-sync manager becomes `GatedCheckpointEngineManager` (through
  `rollout.checkpoint_manager_class`); after verl's workers and rollout servers are up, the policy
  gateway starts in front of those servers (closed while they sleep and take new weights), and
  verl's rollout manager is replaced by one that registers with run-api at the first step and
  pulls each step's batch;
- `_compute_old_log_prob`: the groups' uids become verl's `uid` (GRPO groups);
- `_update_actor`: the environments' token-level advantages, where sent, override GRPO.

Either way the `atropos/...` metrics join the actor's, which verl logs through its Tracking.
Run it with `trainer_cls=recipe.atropos.grpo_atropos_trainer.RayGRPOAtroposTrainer` (set by the
recipe's configs).
"""

from __future__ import annotations

from omegaconf import open_dict

from verl import DataProto
from verl.trainer.ppo.ray_trainer import RayPPOTrainer

from recipe.atropos.config import AtroposTrainerConfig
from recipe.atropos.evaluate.feedback import EnvironmentFeedback
from recipe.atropos.grpo_computer import AdvantageOverrides, AtroposGRPOComputer
from recipe.atropos.policy_gateway import PolicyGateway, check_port_free
from recipe.atropos.trajectory import rollout as trajectory_rollout
from recipe.atropos.trajectory import weight_sync as gated_checkpoint_manager
from recipe.atropos.trajectory.runapi_client import AtroposRunAPIClient
from recipe.atropos.trajectory.scored_data import TrajectoryLimits


class RayGRPOAtroposTrainer(RayPPOTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        estimator = self.config.algorithm.adv_estimator
        if estimator != "grpo":
            raise ValueError(f"RayGRPOAtroposTrainer overrides GRPO advantages: set algorithm.adv_estimator=grpo (got {estimator!r})")
        self.atropos_config = AtroposTrainerConfig.from_config(self.config.trainer.get("atropos"))
        self.grpo_computer = AtroposGRPOComputer(
            allow_fallback=self.atropos_config.fallback_to_grpo,
            norm_adv_by_std_in_grpo=self.config.algorithm.get("norm_adv_by_std_in_grpo", True),
        )
        self.trajectory_mode = self.atropos_config.mode == "trajectory"
        if not self.trajectory_mode:
            self.environment_feedback = EnvironmentFeedback(self.atropos_config, self.tokenizer, self.grpo_computer)

    def init_workers(self):
        if self.trajectory_mode:
            self._use_gated_weight_sync()
            # Before the (slow) workers: a busy port is a clear stop now, not after the model loads.
            check_port_free(self.atropos_config.policy_gateway_host, self.atropos_config.policy_gateway_port)
            super().init_workers()
            self._start_policy_gateway()
            self._start_pulling_trajectories()
        else:
            self.environment_feedback.check_health()  # before the (slow) workers: a clear stop comes first
            super().init_workers()

    def _use_gated_weight_sync(self) -> None:
        rollout = self.config.actor_rollout_ref.rollout
        chosen = rollout.get("checkpoint_manager_class")
        if chosen and chosen != gated_checkpoint_manager.CLASS_PATH:
            raise ValueError(
                f"trainer.atropos.mode=trajectory closes the policy gateway around weight syncs through "
                f"actor_rollout_ref.rollout.checkpoint_manager_class={gated_checkpoint_manager.CLASS_PATH}; got {chosen!r}"
            )
        with open_dict(rollout):
            rollout.checkpoint_manager_class = gated_checkpoint_manager.CLASS_PATH

    def _start_policy_gateway(self) -> None:
        """Environments generate through one gateway in front of every rollout replica's server."""
        cfg = self.atropos_config
        servers = [f"http://{address}" for address in self.llm_server_manager.get_addresses()]
        self.policy_gateway = PolicyGateway(
            servers, host=cfg.policy_gateway_host, port=cfg.policy_gateway_port,
            hold_timeout_s=cfg.policy_hold_timeout_s, drain_timeout_s=cfg.policy_drain_timeout_s,
            max_held=cfg.policy_max_held_requests, api_key=cfg.policy_api_key,
        ).start()
        self.checkpoint_manager.gateway = self.policy_gateway

    def _start_pulling_trajectories(self) -> None:
        cfg = self.atropos_config
        client = AtroposRunAPIClient(
            cfg.trajectory_api_url, timeout=cfg.timeout, retry_attempts=cfg.retry_attempts,
            retry_delay=cfg.retry_delay, max_wait_time=cfg.max_wait_time, api_key=cfg.api_key,
        )
        limits = TrajectoryLimits(
            max_prompt_length=self.config.data.max_prompt_length,
            max_response_length=self.config.data.max_response_length,
            pad_token_id=self.tokenizer.pad_token_id,
            vocab_size=len(self.tokenizer),  # an id beyond it costs its sample, not a worker's crash
        )
        # `fit()` generates through this attribute; validation keeps verl's own manager.
        self.async_rollout_manager = trajectory_rollout.TrajectoryRolloutManager(
            client, limits, validation_manager=self.async_rollout_manager, config=self.config,
            total_steps=self.total_training_steps, batch_timeout_s=cfg.batch_timeout_s,
        )

    def fit(self):
        try:
            return super().fit()
        finally:
            if self.trajectory_mode:
                if getattr(self, "policy_gateway", None) is not None:
                    self.policy_gateway.stop()
            else:
                self.environment_feedback.close()  # no request outlives the run

    def _compute_old_log_prob(self, batch: DataProto):
        if self.trajectory_mode:
            # GRPO groups are the environments' groups (set again before the update: verl skips
            # this hook in rollout-correction bypass mode).
            batch.non_tensor_batch["uid"] = trajectory_rollout.group_uids(batch)
        else:
            self.environment_feedback.submit(batch, step=self.global_steps)
        return super()._compute_old_log_prob(batch)

    def _update_actor(self, batch: DataProto) -> DataProto:
        if self.trajectory_mode:
            atropos_metrics = self._apply_trajectory_advantages(batch)
        else:
            atropos_metrics = self.environment_feedback.apply(batch, step=self.global_steps)
        actor_output = super()._update_actor(batch)
        actor_output.meta_info["metrics"].update(atropos_metrics)
        return actor_output

    def _log_rollout_data(self, batch: DataProto, reward_extra_infos_dict: dict, timing_raw: dict, rollout_data_dir: str):
        """verl's rollout dump (`trainer.rollout_data_dir`), plus what each sample was trained on: its
        GRPO group, its trained response tokens and their advantages (response_mask positions)."""
        mask_BT = batch.batch["response_mask"].bool()
        trained = {
            "uid": batch.non_tensor_batch["uid"].tolist(),
            "trained_token_ids": [ids[m].tolist() for ids, m in zip(batch.batch["responses"], mask_BT)],
            "advantages": [adv[m].tolist() for adv, m in zip(batch.batch["advantages"], mask_BT)],
        }
        if self.trajectory_mode:
            # The environments' samples only joined the dataloader's rows (which drive `fit()`): that
            # row's ground truth is not theirs, so it is left out of the dump.
            non_tensors = {k: v for k, v in batch.non_tensor_batch.items() if k != "reward_model"}
            batch = DataProto(batch=batch.batch, non_tensor_batch=non_tensors, meta_info=batch.meta_info)
        super()._log_rollout_data(batch, {**reward_extra_infos_dict, **trained}, timing_raw, rollout_data_dir)

    def _apply_trajectory_advantages(self, batch: DataProto) -> dict[str, float]:
        """The environments' token-level advantages (where sent) override GRPO on verl's batch."""
        batch.non_tensor_batch["uid"] = trajectory_rollout.group_uids(batch)
        keys = [k for k in (trajectory_rollout.OVERRIDES, trajectory_rollout.OVERRIDE_MASK) if k in batch.batch.keys()]
        sent = batch.pop(batch_keys=keys).batch if keys else None
        overrides = None
        if sent is not None:
            overrides = AdvantageOverrides(sent[trajectory_rollout.OVERRIDES], sent[trajectory_rollout.OVERRIDE_MASK])
        output = self.grpo_computer.compute_from_overrides(
            batch.batch["token_level_rewards"], batch.batch["response_mask"], batch.non_tensor_batch["uid"], overrides
        )
        batch.batch["advantages"] = output.advantages_BT
        batch.batch["returns"] = output.returns_BT
        return {**output.metrics, **self.async_rollout_manager.last_metrics}
