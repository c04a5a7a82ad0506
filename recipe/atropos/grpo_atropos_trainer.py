"""RayGRPOAtroposTrainer: verl's RayPPOTrainer with advantages from Atropos-style environments.

Only verl's own hooks are used (no copy of `fit()`). Each hook hands its part to one object, chosen
once by `trainer.atropos.mode`, with the same methods in either mode:

- evaluate (default, `evaluate/mode.py: EvaluateMode`): verl generates; the environment service
  judges (a health check before the workers, the batch sent while verl computes old log-probs, the
  answer turned into GRPO advantage overrides before the update);
- trajectory (`trajectory/mode.py: TrajectoryMode`): Atropos environments generate through the
  policy gateway in front of verl's rollout servers and push scored groups to atroposlib's run-api,
  from which verl's rollout manager's replacement pulls each step's batch.

With `trainer.atropos.rollout_placement: separate` (trajectory mode) the object built is a
`SeparateGRPOAtroposTrainer` (placement/separate_trainer.py): this class on verl's separation seam,
the rollout servers on a resource pool of their own (docs/async.md).

Hooks: `init_workers` (`before_workers`, `after_workers`), `_compute_old_log_prob`
(`before_old_log_prob`, `after_old_log_prob`), `_update_actor` (`before_update`, whose `atropos/...` metrics join the
actor's, which verl logs through its Tracking), `_log_rollout_data` (`rollout_dump`), and the end
of `fit()` (`close`). `fit()` and `_load_checkpoint` also keep verl's metrics file whole across a
resume (metrics_file.py). Run it with `trainer_cls=recipe.atropos.grpo_atropos_trainer.RayGRPOAtroposTrainer`
(set by the recipe's configs).
"""

from __future__ import annotations

from verl import DataProto
from verl.trainer.ppo.ray_trainer import RayPPOTrainer

from recipe.atropos.config import AtroposTrainerConfig
from recipe.atropos.evaluate.environments import parse_environment_specs
from recipe.atropos.evaluate.mixing import weighted_train_sampler
from recipe.atropos.evaluate.mode import EvaluateMode
from recipe.atropos.grpo_computer import AtroposGRPOComputer
from recipe.atropos.metrics_file import file_logger_keeping_history, keep_steps_up_to, metrics_path
from recipe.atropos.trajectory.mode import TrajectoryMode


class RayGRPOAtroposTrainer(RayPPOTrainer):
    def __new__(cls, *args, config, **kwargs):
        # trainer.atropos.rollout_placement=separate: the same trainer on verl's separation seam
        # (placement/separate_trainer.py), so that the configs keep one trainer_cls.
        if cls is RayGRPOAtroposTrainer and AtroposTrainerConfig.parse(config.trainer.get("atropos")).rollout_placement == "separate":
            from recipe.atropos.placement.separate_trainer import SeparateGRPOAtroposTrainer

            cls = SeparateGRPOAtroposTrainer
        return super().__new__(cls)

    def __init__(self, *args, config, **kwargs):
        self.atropos_config = AtroposTrainerConfig.from_config(config.trainer.get("atropos"))
        # `trainer.atropos.environments`, parsed once: the sampler and the evaluate mode's feedback share it.
        evaluate = self.atropos_config.mode == "evaluate"
        specs = parse_environment_specs(self.atropos_config.environments) if evaluate else None
        if specs and kwargs.get("train_dataset") is not None:
            # Weighted environments: rows are drawn by weight, through verl's own `train_sampler`.
            sampler = weighted_train_sampler(specs, kwargs["train_dataset"], config.data.get("seed"))
            if sampler is not None:
                kwargs["train_sampler"] = sampler
        super().__init__(*args, config=config, **kwargs)
        estimator = self.config.algorithm.adv_estimator
        if estimator != "grpo":
            raise ValueError(f"RayGRPOAtroposTrainer overrides GRPO advantages: set algorithm.adv_estimator=grpo (got {estimator!r})")
        self.grpo_computer = AtroposGRPOComputer(
            allow_fallback=self.atropos_config.fallback_to_grpo,
            norm_adv_by_std_in_grpo=self.config.algorithm.get("norm_adv_by_std_in_grpo", True),
        )
        if self.atropos_config.mode == "trajectory":
            self.atropos_mode = TrajectoryMode(self.atropos_config, self.grpo_computer)
        else:
            self.atropos_mode = EvaluateMode(self.atropos_config, self.tokenizer, self.grpo_computer, specs)

    def init_workers(self):
        self.atropos_mode.before_workers(self)
        super().init_workers()
        self.atropos_mode.after_workers(self)

    def fit(self):
        try:
            with file_logger_keeping_history():  # a resumed run's metrics file keeps its history
                return super().fit()
        finally:
            self.atropos_mode.close()

    def _load_checkpoint(self):
        """verl's (``trainer.resume_mode``), then the metrics file keeps the steps up to the one
        resumed from (metrics_file.py)."""
        loaded = super()._load_checkpoint()
        path = metrics_path(self.config.trainer.get("logger"))
        if path is not None:
            keep_steps_up_to(path, self.global_steps)
        return loaded

    def _compute_old_log_prob(self, batch: DataProto):
        self.atropos_mode.before_old_log_prob(batch, step=self.global_steps)
        old_log_prob, mfu = super()._compute_old_log_prob(batch)
        self.atropos_mode.after_old_log_prob(batch, old_log_prob)
        return old_log_prob, mfu

    def _update_actor(self, batch: DataProto) -> DataProto:
        atropos_metrics = self.atropos_mode.before_update(batch, step=self.global_steps)
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
        batch, columns = self.atropos_mode.rollout_dump(batch)
        trained.update(columns)
        super()._log_rollout_data(batch, {**reward_extra_infos_dict, **trained}, timing_raw, rollout_data_dir)
