"""Evaluate mode's part in the trainer's hooks: verl generates, the environment service judges.

The trainer (grpo_atropos_trainer.py) calls the same methods on either mode's object; this one
- ``before_workers``: a health check, which says whether the service's advantages or standard GRPO
  will be used (or stops the run when the service is down and fallback is off); with
  ``environments``, also a check that every data_source of the training data has an environment,
  and the weighted sampler when the environments set weights (evaluate/mixing.py);
- ``before_old_log_prob``: sends the batch to the service on a background thread, concurrently
  with verl's old-log-prob computation;
- ``before_update``: turns the answer into token-level overrides of the GRPO estimator, written into
  the batch before the update.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from verl import DataProto

from recipe.atropos.config import AtroposTrainerConfig
from recipe.atropos.evaluate.environments import EnvironmentSpec
from recipe.atropos.evaluate.feedback import EnvironmentFeedback
from recipe.atropos.evaluate.mixing import dataset_data_sources
from recipe.atropos.evaluate.multi import MultiEnvironmentFeedback
from recipe.atropos.grpo_computer import AtroposGRPOComputer


class EvaluateMode:
    def __init__(
        self, atropos_config: AtroposTrainerConfig, tokenizer: Any, grpo_computer: AtroposGRPOComputer,
        specs: Mapping[str, EnvironmentSpec] | None,
    ):
        """``specs``: ``trainer.atropos.environments`` as the trainer parsed it (None: the single service
        at ``api_url``)."""
        if specs:
            self.feedback = MultiEnvironmentFeedback(atropos_config, tokenizer, grpo_computer, specs)
        else:
            self.feedback = EnvironmentFeedback(atropos_config, tokenizer, grpo_computer)
        self._submit_s = 0.0  # this step's before_old_log_prob (0 when verl skipped old log-probs)

    def before_workers(self, trainer: Any) -> None:
        # Before the (slow) workers: a clear stop comes first.
        if isinstance(self.feedback, MultiEnvironmentFeedback):
            sources = dataset_data_sources(getattr(trainer, "train_dataset", None))
            if sources is not None:  # else the first batch is checked (submit)
                self.feedback.check_data_sources(sources)
        self.feedback.check_health()

    def after_workers(self, trainer: Any) -> None:
        pass

    def before_old_log_prob(self, batch: DataProto, step: int) -> None:
        start = time.perf_counter()
        self.feedback.submit(batch, step=step)
        self._submit_s = time.perf_counter() - start

    def after_old_log_prob(self, batch: DataProto, old_log_prob: DataProto) -> None:
        pass

    def before_update(self, batch: DataProto, step: int) -> dict[str, float]:
        """Advantages into `batch`; returns the step's ``atropos/...`` metrics, with the time the two
        hooks took on the trainer's thread (what the recipe adds to verl's old-log-prob and update)."""
        start = time.perf_counter()
        metrics = self.feedback.apply(batch, step=step)
        metrics["atropos/timing_s/apply"] = time.perf_counter() - start
        metrics["atropos/timing_s/submit"], self._submit_s = self._submit_s, 0.0
        return metrics

    def rollout_dump(self, batch: DataProto) -> tuple[DataProto, dict[str, list]]:
        """The batch verl dumps (``trainer.rollout_data_dir``) and this mode's columns for it: none."""
        return batch, {}

    def close(self) -> None:
        self.feedback.close()  # no request outlives the run
