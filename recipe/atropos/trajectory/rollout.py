"""Trajectory mode: each step's batch comes from Atropos' trajectory API instead of verl's rollout.

Atropos environments generate through the policy's inference endpoints, score, and push
`ScoredData` groups to atroposlib's `run-api`. `TrajectoryRolloutManager` takes the place of
verl's agent-loop manager in `fit()`: its `generate_sequences` pulls one full batch from `/batch`
(bounded wait, with progress), converts it (recipe/atropos/trajectory/scored_data.py) and hands verl the
tensors it expects after generation. Validation still generates with verl's own manager.

With the policy gateway's records (trajectory/behavior.py), every pulled group is matched to what
the gateway generated (trajectory/staleness.py): groups beyond ``trainer.atropos.max_staleness``
(and, with ``unmatched_samples: drop``, groups the gateway never generated) are dropped and the
batch is filled from later groups, kept across steps; the recorded log-probs become verl's
``rollout_log_probs``, which its ``algorithm.rollout_correction`` uses.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from recipe.atropos.config import AtroposTrainerConfig
from recipe.atropos.trajectory import diagnostics
from recipe.atropos.trajectory.runapi_client import AtroposRunAPIClient
from recipe.atropos.trajectory.behavior import BehaviorRecords
from recipe.atropos.trajectory.metrics import trajectory_metrics
from recipe.atropos.trajectory.scored_data import TrajectoryLimits, scored_groups_to_batch
from recipe.atropos.trajectory.staleness import BEHAVIOR_MATCHED, Selection, StalenessFilter
from verl import DataProto

logger = logging.getLogger("verl.recipe.atropos")

# Keys the trainer reads back from the batch (names verl does not use).
GROUP_UID = "atropos_uid"
OVERRIDES = "atropos_token_level_advantages"
OVERRIDE_MASK = "atropos_advantage_override_mask"
# Per row: the wall-clock time the gateway recorded the completion (NaN unknown); in the rollout dump.
GENERATED_AT = "atropos_generated_at"


class TrajectoryBatchTimeout(TimeoutError):
    """No full batch arrived from the trajectory API in time (the message says what the environments logged)."""


class TrajectoryGroupSizeError(ValueError):
    """Groups that run-api cannot pack into this trainer's batches, or a group GRPO cannot normalize."""


def check_group_size(group_size: int, batch_size: int, env_id: object = None) -> None:
    """run-api (``grab_exact_from_heterogeneous_queue``) builds a batch of exactly ``batch_size``
    sequences from whole groups; a group size that does not divide it never makes a batch.

    Any other size is trained: each group is its own GRPO group (normalized over its own samples),
    whether or not it equals ``actor_rollout_ref.rollout.n``.
    """
    if group_size >= 1 and batch_size % group_size == 0:
        return
    divisors = [d for d in range(2, batch_size + 1) if batch_size % d == 0]
    raise TrajectoryGroupSizeError(
        f"environment env_id {env_id} sends groups of {group_size} sequences, but this trainer pulls batches of "
        f"{batch_size} (data.train_batch_size x actor_rollout_ref.rollout.n) and run-api only builds a batch from "
        f"whole groups whose sizes divide it: no batch could ever form. Set the environment's --env.group_size to "
        f"one of {divisors}, or data.train_batch_size x rollout.n to a multiple of {group_size}."
    )


class TrajectoryRolloutManager:
    """Pulls each step's batch from run-api; delegates validation to verl's own manager."""

    def __init__(
        self,
        client: AtroposRunAPIClient,
        limits: TrajectoryLimits,
        validation_manager: Any,
        config: Any,
        total_steps: int,
        batch_timeout_s: float,
        poll_interval_s: float = 0.5,
        progress_interval_s: float = 5.0,
        records: BehaviorRecords | None = None,
    ):
        self.client = client
        self.config = config
        # The trainer's typed section; `parse` checks it as the trainer did (and reads no environment).
        self.atropos_config = AtroposTrainerConfig.parse(config.trainer.get("atropos"))
        self.total_steps = total_steps
        self.limits = limits
        self.validation_manager = validation_manager
        self.batch_timeout_s = batch_timeout_s
        self.poll_interval_s = poll_interval_s
        self.progress_interval_s = progress_interval_s
        self.last_metrics: dict[str, float] = {}
        # Wrong-size /batch answers dropped (fallback on) while pulling the current step's batch.
        self.dropped_batches = 0
        self.dropped_batch_rows = 0
        self._last_dropped_size: tuple[int, int] | None = None  # (sequences, groups)
        self._pending_groups: list[dict] | None = None
        self._registered = False
        # The gateway's records (None: no gateway, no matching): staleness bound and behaviour log-probs.
        self.staleness = None if records is None else StalenessFilter(
            records, self.atropos_config.max_staleness, self.atropos_config.unmatched_samples
        )
        self._warned_unmatched = False
        # Called on the trainer's thread between polls while a step waits for its batch (separate
        # placement: restart a rollout server that died, placement/restarts.py).
        self.idle_hook: Callable[[], None] | None = None

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
        # The servers hold the weights of the previous step's update (fit() syncs them with its
        # global_steps after each update): the version every pulled sample is measured against.
        current_version = int(gen_batch.meta_info.get("global_steps", 1)) - 1
        groups, selection = self._pull_batch(len(gen_batch), current_version)
        wait_s = time.perf_counter() - start
        # With fallback on, a sequence (or group) that cannot be trained costs its rows only; counted.
        converted = scored_groups_to_batch(groups, self.limits, drop_malformed=self.fallback)
        tensors = {k: v for k, v in converted.tensors().items() if k not in ("token_level_scores", "token_level_advantages", "advantage_override_mask")}
        if converted.token_level_advantages_BT is not None:
            tensors[OVERRIDES] = converted.token_level_advantages_BT
            tensors[OVERRIDE_MASK] = converted.advantage_override_mask_B
        if selection is not None:
            # The gateway's records replace what environments may have sent as inference_logprobs:
            # they are the behaviour policy's, with its version. Rows without one get their own
            # old_log_probs once computed (staleness.fill_unmatched): importance weight 1.
            tensors["rollout_log_probs"], tensors[BEHAVIOR_MATCHED] = selection.behavior_tensors(
                converted.group_index_B, converted.sample_index_B, converted.response_mask_BT
            )
            self._warn_unmatched(tensors[BEHAVIOR_MATCHED], converted.response_mask_BT)
        non_tensors = converted.non_tensors()
        if selection is not None:
            non_tensors[GENERATED_AT] = selection.generated_at(converted.group_index_B, converted.sample_index_B)
        # verl's dataloader batch already holds a `uid` per row; the groups' uids travel under
        # another key and replace it before advantages are computed (see the trainer).
        non_tensors[GROUP_UID] = non_tensors.pop("uid")
        output = DataProto.from_dict(tensors=tensors, non_tensors=non_tensors)
        output.meta_info["timing"] = {"atropos_batch_wait": wait_s}
        self.last_metrics = {**trajectory_metrics(groups), **converted.dropped_metrics(),
                             **(selection.metrics() if selection is not None else {}),
                             "atropos/trajectory/dropped/batch": float(self.dropped_batch_rows), "atropos/wait_s": wait_s}
        return output

    def _warn_unmatched(self, matched_B, response_mask_BT) -> None:
        unmatched = int((~matched_B & response_mask_BT.bool().any(dim=-1)).sum())
        if unmatched and not self._warned_unmatched:
            self._warned_unmatched = True
            logger.warning(
                "%d sample(s) of this batch hold tokens the policy gateway never generated (an environment that "
                "re-tokenizes text, or generates elsewhere): their staleness is unknown and they train with importance "
                "weight 1 (trainer.atropos.unmatched_samples=keep; `drop` drops their groups). Logged once; "
                "metric atropos/behavior_matched_fraction", unmatched,
            )

    @property
    def fallback(self) -> bool:
        """trainer.atropos.fallback_to_grpo: what run-api hands over that cannot be trained is dropped
        (counted), not a stop."""
        return self.atropos_config.fallback_to_grpo

    def _pull_batch(self, num_rows: int, current_version: int = 0) -> tuple[list[dict], Selection | None]:
        """Groups of exactly `num_rows` sequences, waiting up to `batch_timeout_s`.

        Without records: one `/batch` answer. With them: groups more than max_staleness versions
        behind `current_version` (the weights the servers hold) are dropped and more answers pulled until the groups kept make `num_rows`; the surplus waits
        for the next step (checked again then).

        Every `progress_interval_s` a line says what it waits for and what the environments and
        run-api report; a group size run-api can never pack into `num_rows` stops the run at once.
        An answer of another size stops it too, or, with fallback on, is dropped (its sequences
        counted in `dropped_batch_rows`) and the wait goes on.
        """
        self.dropped_batches = self.dropped_batch_rows = 0
        if self.staleness is not None:
            self.staleness.dropped.clear()  # what this step's wait drops
        start = time.monotonic()
        deadline = start + self.batch_timeout_s
        next_progress = start + self.progress_interval_s
        while True:
            if self.staleness is not None:
                selection = self.staleness.take(num_rows, current_version)
                if selection is not None:
                    return selection.groups, selection
            groups, self._pending_groups = self._pending_groups or self.client.get_batch(), None
            if groups:
                rows = sum(_rows_of(group) for group in groups)
                if rows == num_rows:
                    _check_normalizable(groups)
                    if self.staleness is None:
                        return groups, None
                    self.staleness.add(groups)
                    continue
                message = (
                    f"the trajectory API sent a batch of {rows} sequences in {len(groups)} groups; this step needs "
                    f"{num_rows} (data.train_batch_size x actor_rollout_ref.rollout.n, as registered)"
                )
                if not self.fallback:
                    raise ValueError(message)
                self.dropped_batches += 1
                self.dropped_batch_rows += rows
                self._last_dropped_size = (rows, len(groups))
                logger.warning("%s: dropped, waiting for the next (trainer.atropos.fallback_to_grpo=true)", message)
            now = time.monotonic()
            if now >= deadline:
                raise TrajectoryBatchTimeout(self._stuck_report(num_rows, now - start))
            if now >= next_progress:
                last = diagnostics.last_group_size(self.client.api_url)
                if last is not None:
                    check_group_size(last[0], num_rows, env_id=last[1])
                logger.warning(
                    "waiting for a batch of %d sequences from %s: %.0f s of %.0f s (trainer.atropos.batch_timeout_s)%s; "
                    "%s\n%s", num_rows, self.client.api_url, now - start, self.batch_timeout_s, self._dropped_note(),
                    diagnostics.run_api_report(self.client.api_url),
                    diagnostics.environment_report(diagnostics.launcher_run_dir(), errors=1)
                    or "  (environments not started by the launcher: their logs are not known here)",
                )
                next_progress = now + self.progress_interval_s
            if self.idle_hook is not None:
                self.idle_hook()
            time.sleep(self.poll_interval_s)

    def _stuck_report(self, num_rows: int, waited_s: float) -> str:
        environments = diagnostics.environment_report(diagnostics.launcher_run_dir(), errors=5)
        wrong_size = ""
        if self.dropped_batches and self._last_dropped_size is not None:
            rows, groups = self._last_dropped_size
            wrong_size = (
                f"It dropped {self.dropped_batches} answer(s) of another size (the last: {rows} sequences in {groups} "
                "groups). run-api keeps the batch size of the first trainer that registered with it: restart "
                "run-api if an earlier run (or another trainer) registered first.\n"
            )
        return (
            f"no batch of {num_rows} sequences from {self.client.api_url} within {waited_s:.0f} s "
            f"(trainer.atropos.batch_timeout_s={self.batch_timeout_s:g}){self._dropped_note()}.\n"
            + wrong_size
            + f"{diagnostics.run_api_report(self.client.api_url)}\n"
            + (f"environments:\n{environments}\n" if environments else
               "The environments were not started by the launcher: look at their own logs.\n")
            + "Raise trainer.atropos.batch_timeout_s only if the environments are healthy but slow."
        )


    def _dropped_note(self) -> str:
        """What the staleness bound dropped while this step waited, if anything."""
        dropped = dict(self.staleness.dropped) if self.staleness is not None else {}
        if not dropped:
            return ""
        return (f"; groups dropped meanwhile: {dropped} (stale: beyond trainer.atropos.max_staleness="
                f"{self.staleness.max_staleness}; unmatched: trainer.atropos.unmatched_samples=drop)")


def _rows_of(group: Any) -> int:
    """Sequences a group counts for (a malformed one: what its tokens list says, else 0; the
    conversion then drops it)."""
    tokens = group.get("tokens") if isinstance(group, dict) else None
    return len(tokens) if isinstance(tokens, list) else 0


def _check_normalizable(groups: list[dict]) -> None:
    """A group of one sequence without its own advantages is refused: GRPO normalizes a score against
    the other samples of its group, and verl's estimator would train on the raw score instead."""
    for g, group in enumerate(groups):
        if _rows_of(group) == 1 and not group.get("advantages"):
            raise TrajectoryGroupSizeError(
                f"group {g} (env_id {group.get('env_id')}) has one sequence and no advantages: GRPO needs at least 2 "
                "samples per group to normalize a score. Set the environment's --env.group_size >= 2, or send "
                "token-level advantages with single-sequence groups."
            )


def group_uids(batch: DataProto) -> np.ndarray:
    return batch.non_tensor_batch[GROUP_UID]
