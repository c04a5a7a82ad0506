"""RayGRPOAtroposTrainer: verl's RayPPOTrainer with advantages from an Atropos-style environment service.

Only verl's own hooks are used (no copy of `fit()`):
- `init_workers`: a health check first, which says whether the service's advantages or standard
  GRPO will be used (or stops the run when the service is down and fallback is off);
- `_compute_old_log_prob`: the batch goes to the service on a background thread, concurrently
  with the old-log-prob computation;
- `_update_actor`: the answer becomes token-level overrides of the GRPO estimator
  (AtroposGRPOComputer), written into the batch before the update; the `atropos/...` metrics join
  the actor's, which verl logs through its Tracking.

Run it with `trainer_cls=recipe.atropos.grpo_atropos_trainer.RayGRPOAtroposTrainer` (set by
config/gsm8k_grpo_example.yaml).
"""

from __future__ import annotations

from verl import DataProto
from verl.trainer.ppo.ray_trainer import RayPPOTrainer

from recipe.atropos.config import AtroposTrainerConfig
from recipe.atropos.feedback import EnvironmentFeedback
from recipe.atropos.grpo_computer import AtroposGRPOComputer


class RayGRPOAtroposTrainer(RayPPOTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        estimator = self.config.algorithm.adv_estimator
        if estimator != "grpo":
            raise ValueError(f"RayGRPOAtroposTrainer overrides GRPO advantages: set algorithm.adv_estimator=grpo (got {estimator!r})")
        self.atropos_config = AtroposTrainerConfig.from_config(self.config.trainer.get("atropos"))
        computer = AtroposGRPOComputer(
            allow_fallback=self.atropos_config.fallback_to_grpo,
            norm_adv_by_std_in_grpo=self.config.algorithm.get("norm_adv_by_std_in_grpo", True),
        )
        self.environment_feedback = EnvironmentFeedback(self.atropos_config, self.tokenizer, computer)

    def init_workers(self):
        self.environment_feedback.check_health()  # before the (slow) workers: a clear stop comes first
        super().init_workers()

    def _compute_old_log_prob(self, batch: DataProto):
        self.environment_feedback.submit(batch, step=self.global_steps)
        return super()._compute_old_log_prob(batch)

    def _update_actor(self, batch: DataProto) -> DataProto:
        atropos_metrics = self.environment_feedback.apply(batch, step=self.global_steps)
        actor_output = super()._update_actor(batch)
        actor_output.meta_info["metrics"].update(atropos_metrics)
        return actor_output
