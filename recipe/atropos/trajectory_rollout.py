"""Trajectory mode: each step's batch comes from Atropos' trajectory API instead of verl's rollout.

Atropos environments generate through the policy's inference endpoints, score, and push
`ScoredData` groups to atroposlib's `run-api`. `TrajectoryRolloutManager` takes the place of
verl's agent-loop manager in `fit()`: its `generate_sequences` pulls one full batch from `/batch`
(bounded wait, with progress), converts it (recipe/atropos/trajectory.py) and hands verl the
tensors it expects after generation. Validation still generates with verl's own manager.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from recipe.atropos.client import AtroposAPIError, AtroposEnvironmentClient
from recipe.atropos.trajectory import TrajectoryLimits, scored_groups_to_batch, trajectory_metrics
from verl import DataProto

logger = logging.getLogger("verl.recipe.atropos")

# Keys the trainer reads back from the batch (names verl does not use).
GROUP_UID = "atropos_uid"
OVERRIDES = "atropos_token_level_advantages"
OVERRIDE_MASK = "atropos_advantage_override_mask"


class TrajectoryBatchTimeout(TimeoutError):
    """No full batch arrived from the trajectory API in time."""


class TrajectoryRolloutManager:
    """Pulls each step's batch from run-api; delegates validation to verl's own manager."""

    def __init__(
        self,
        client: AtroposEnvironmentClient,
        limits: TrajectoryLimits,
        validation_manager: Any,
        config: Any,
        total_steps: int,
        batch_timeout_s: float,
        poll_interval_s: float = 0.5,
        progress_interval_s: float = 30.0,
    ):
        self.client = client
        self.config = config
        self.total_steps = total_steps
        self.limits = limits
        self.validation_manager = validation_manager
        self.batch_timeout_s = batch_timeout_s
        self.poll_interval_s = poll_interval_s
        self.progress_interval_s = progress_interval_s
        self.last_metrics: dict[str, float] = {}
        self._pending_groups: list[dict] | None = None
        self._registered = False

    def register(self, starting_step: int) -> int:
        """`POST /register` with what this run pulls, then the first `GET /batch`, which environments
        wait for before they start (an answer, if one came, is kept for the first step)."""
        config = self.config
        batch_size = config.data.train_batch_size * config.actor_rollout_ref.rollout.n
        uuid = self.client.register_trainer(
            batch_size=batch_size,
            # environments drop sequences of max_token_len tokens or more
            max_token_len=config.data.max_prompt_length + config.data.max_response_length + 1,
            num_steps=int(self.total_steps),
            checkpoint_dir=str(config.trainer.default_local_dir),
            save_checkpoint_interval=int(config.trainer.save_freq),
            starting_step=int(starting_step),
        )
        self._pending_groups = self.client.get_batch()
        self._registered = True
        logger.warning("registered with the trajectory API at %s: %d sequences per step", self.client.api_url, batch_size)
        return uuid

    def generate_sequences(self, gen_batch: DataProto) -> DataProto:
        if gen_batch.meta_info.get("validate"):
            return self.validation_manager.generate_sequences(gen_batch)
        if not self._registered:  # at the first step, once fit() knows the step it resumes from
            self.register(starting_step=int(gen_batch.meta_info.get("global_steps", 1)) - 1)
        start = time.perf_counter()
        groups = self._pull_batch(len(gen_batch))
        wait_s = time.perf_counter() - start
        converted = scored_groups_to_batch(groups, self.limits)
        tensors = {k: v for k, v in converted.tensors().items() if k not in ("token_level_scores", "token_level_advantages", "advantage_override_mask")}
        if converted.token_level_advantages_BT is not None:
            tensors[OVERRIDES] = converted.token_level_advantages_BT
            tensors[OVERRIDE_MASK] = converted.advantage_override_mask_B
        non_tensors = converted.non_tensors()
        # verl's dataloader batch already holds a `uid` per row; the groups' uids travel under
        # another key and replace it before advantages are computed (see the trainer).
        non_tensors[GROUP_UID] = non_tensors.pop("uid")
        output = DataProto.from_dict(tensors=tensors, non_tensors=non_tensors)
        output.meta_info["timing"] = {"atropos_batch_wait": wait_s}
        try:
            step = self.client.status().current_step
        except AtroposAPIError as exc:  # staleness is a metric: the batch is already pulled, keep it
            logger.warning("GET %s/status failed, staleness unknown this step: %s", self.client.api_url, exc)
            step = None
        self.last_metrics = {**trajectory_metrics(groups, current_step=step), "atropos/wait_s": wait_s}
        return output

    def _pull_batch(self, num_rows: int) -> list[dict]:
        """One `/batch` answer of exactly `num_rows` sequences, waiting up to `batch_timeout_s`."""
        deadline = time.monotonic() + self.batch_timeout_s
        next_progress = time.monotonic() + self.progress_interval_s
        while True:
            groups, self._pending_groups = self._pending_groups or self.client.get_batch(), None
            if groups:
                rows = sum(len(group["tokens"]) for group in groups)
                if rows != num_rows:
                    raise ValueError(
                        f"the trajectory API sent a batch of {rows} sequences in {len(groups)} groups; this step needs "
                        f"{num_rows} (data.train_batch_size x actor_rollout_ref.rollout.n, as registered)"
                    )
                return groups
            now = time.monotonic()
            if now >= deadline:
                status = self.client.status()
                raise TrajectoryBatchTimeout(
                    f"no batch of {num_rows} sequences from {self.client.api_url} within {self.batch_timeout_s:.0f} s "
                    f"({status.queue_size} groups queued). Are the environments running and able to reach the "
                    "policy's inference endpoint? Raise trainer.atropos.batch_timeout_s for slow environments."
                )
            if now >= next_progress:
                logger.warning("waiting for a batch of %d sequences from %s ...", num_rows, self.client.api_url)
                next_progress = now + self.progress_interval_s
            time.sleep(self.poll_interval_s)


def group_uids(batch: DataProto) -> np.ndarray:
    return batch.non_tensor_batch[GROUP_UID]
