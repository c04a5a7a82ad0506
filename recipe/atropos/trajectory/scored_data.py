"""Atropos trajectory-API batches (``GET /batch``) -> the tensors of a verl batch after generation.

atroposlib's ``run-api`` hands a trainer a list of ``ScoredData`` groups (atroposlib
``api/server.py``). Each group holds, per sequence, ``tokens`` (prompt and response, one list),
``masks`` (same length; -100 = not trained, anything else = trained) and ``scores``; optionally
``advantages`` and ``inference_logprobs`` (per sequence, aligned with ``tokens``; atroposlib writes
1.0 at masked positions), ``overrides`` (per sequence dicts), ``group_overrides``,
``generation_params``, ``messages``, ``env_id``, ``ref_logprobs``, ``images``, ``distill_*``.

Rules of the conversion (:func:`scored_groups_to_batch`; each sequence is split and checked in
:mod:`~recipe.atropos.trajectory.scored_samples`, this module pads the samples into tensors):

- **Prompt / response.** The prompt is the leading stretch of a sequence whose mask is -100; the
  response is everything after it, including later -100 stretches (multi-turn environment text).
- **response_mask** is 1 on response tokens whose mask is not -100, 0 elsewhere: environment
  tokens inside the response are never trained on.
- **Padding** as verl's agent loop: ``prompts`` [B, P] left-padded, ``responses`` [B, T]
  right-padded, with the tokenizer's pad id; P and T are the limits (``pad_to_limits``, as the
  agent loop pads to ``rollout.prompt_length`` / ``response_length``) or the batch's longest.
  ``position_ids`` = clip(cumsum(attention_mask) - 1, 0), verl's ``compute_position_id_with_mask``.
- **Groups.** One GRPO group per ScoredData group: every sequence of group g gets ``uid[g]``.
- **Reward.** The sequence's score sits at its last response token in ``rm_scores`` [B, T] (as the
  agent loop puts it), 0 elsewhere; ``token_level_scores`` is the same.
- **Advantages.** A group's ``advantages`` (one list per sequence, either aligned with ``tokens``
  or with the response only) become rows of ``token_level_advantages`` [B, T] (response part, 0 on
  padding) with ``advantage_override_mask`` [B] True; absent (None or ``[]``, which atroposlib's
  default ``collect_trajectories`` sends) means standard GRPO for that group's rows.
- **set_advantage_to_zero.** ``overrides[i]["set_advantage_to_zero"]`` makes row i overridden with
  advantage 0 everywhere. Its score stays in ``rm_scores``, so it still counts in its group's
  mean and std (as Atropos' own trainers zero the advantage after normalizing).
- **Log-probs.** ``inference_logprobs`` (response part) become ``rollout_log_probs`` [B, T], with
  0.0 wherever the mask is -100 or on padding (all outside ``response_mask``). Present only when
  every sequence of the batch has them. The trainer replaces them with the policy gateway's
  records, which carry the weights version (trajectory/staleness.py).
- **Limits.** A prompt longer than ``max_prompt_length`` or a response longer than
  ``max_response_length`` is rejected (:class:`TrajectoryLengthError`, naming the group, sequence,
  env id and both lengths); nothing is truncated. So are malformed groups
  (:class:`TrajectoryFormatError`).
- **Token ids** must be ints in [0, ``vocab_size``) when the limits carry the tokenizer's size: an
  id the model has no embedding for would only fail inside a worker, and stop the run there.
- **drop_malformed** (the trainer passes ``fallback_to_grpo``): instead of raising, a sequence that
  cannot be trained (tokens and masks that disagree, bad token ids, a non-finite score, over a
  limit, no response, or its group's lists of different lengths) keeps its row as a placeholder
  that trains nothing (one pad token each side, ``response_mask`` 0, a uid of its own so it leaves
  its group's statistics), and unusable ``advantages`` / ``inference_logprobs`` / ``overrides``
  are ignored for that sequence (GRPO, no log-probs). Each is counted by reason in
  ``TrajectoryBatch.dropped`` (metrics ``atropos/trajectory/dropped/<reason>``, DROP_REASONS).
- **Not converted:** ``ref_logprobs`` (verl computes its own reference), ``messages``, ``images``,
  ``distill_*``, ``group_overrides``.

Staleness: atroposlib stamps nothing with the policy version it sampled from, and the trajectory
API's ``current_step`` counts batches handed out (several at once), not weights. The trainer matches
each sample's tokens to the policy gateway's records instead (trajectory/staleness.py).
"""

from __future__ import annotations

import json

import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

# Each sequence is checked in scored_samples (no torch); the limits and errors callers need are re-exported here.
from recipe.atropos.trajectory.scored_samples import (
    DROP_REASONS,
    Sample,
    TrajectoryFormatError,
    TrajectoryLengthError,
    TrajectoryLimits,
    parse_group,
)

if TYPE_CHECKING:  # verl is imported only by TrajectoryBatch.to_data_proto
    from verl import DataProto

__all__ = [
    "DROP_REASONS",
    "TrajectoryBatch",
    "TrajectoryFormatError",
    "TrajectoryLengthError",
    "TrajectoryLimits",
    "position_ids_from_attention_mask",
    "scored_groups_to_batch",
]


@dataclass(frozen=True)
class TrajectoryBatch:
    """A converted batch of B sequences: prompt length P, response length T, L = P + T.

    Tensors follow verl's names (see :meth:`to_data_proto`). ``group_index_B`` / ``sample_index_B``
    say where each row came from in the ``GET /batch`` answer; ``env_id_B`` is the group's env id
    (None when absent). ``token_level_advantages_BT`` and ``advantage_override_mask_B`` are None
    when no row is overridden; ``rollout_log_probs_BT`` is None unless every sequence carried
    ``inference_logprobs``.
    """

    prompts_BP: torch.Tensor
    responses_BT: torch.Tensor
    input_ids_BL: torch.Tensor
    attention_mask_BL: torch.Tensor
    position_ids_BL: torch.Tensor
    response_mask_BT: torch.Tensor
    rm_scores_BT: torch.Tensor
    scores_B: torch.Tensor
    uid_B: np.ndarray
    group_index_B: np.ndarray
    sample_index_B: np.ndarray
    env_id_B: np.ndarray
    episode_stats_B: np.ndarray | None = None
    token_level_advantages_BT: torch.Tensor | None = None
    advantage_override_mask_B: torch.Tensor | None = None
    rollout_log_probs_BT: torch.Tensor | None = None
    generation_params_G: tuple[Mapping[str, Any] | None, ...] = field(default=())
    dropped: Mapping[str, int] = field(default_factory=dict)

    def dropped_metrics(self) -> dict[str, float]:
        """``atropos/trajectory/dropped/<reason>``: sequences (or their fields) dropped, per DROP_REASONS."""
        return {f"atropos/trajectory/dropped/{reason}": float(self.dropped.get(reason, 0)) for reason in DROP_REASONS}

    @property
    def batch_size(self) -> int:
        return int(self.prompts_BP.shape[0])

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensor keys of verl's batch after generation (plus the override keys when present)."""
        out = {
            "prompts": self.prompts_BP,
            "responses": self.responses_BT,
            "input_ids": self.input_ids_BL,
            "attention_mask": self.attention_mask_BL,
            "position_ids": self.position_ids_BL,
            "response_mask": self.response_mask_BT,
            "rm_scores": self.rm_scores_BT,
            "token_level_scores": self.rm_scores_BT.clone(),
        }
        if self.rollout_log_probs_BT is not None:
            out["rollout_log_probs"] = self.rollout_log_probs_BT
        if self.token_level_advantages_BT is not None:
            out["token_level_advantages"] = self.token_level_advantages_BT
            out["advantage_override_mask"] = self.advantage_override_mask_B
        return out

    def non_tensors(self) -> dict[str, np.ndarray]:
        """``uid`` (one per group), the row origins, and the empty ``multi_modal_inputs`` fit() reads."""
        return {
            "uid": self.uid_B,
            "atropos_group_index": self.group_index_B,
            "atropos_sample_index": self.sample_index_B,
            "atropos_env_id": self.env_id_B,
            "atropos_episode_stats": (self.episode_stats_B if self.episode_stats_B is not None
                                      else _object_array([""] * self.batch_size)),
            "multi_modal_inputs": _object_array([{} for _ in range(self.batch_size)]),
        }

    def to_data_proto(self) -> DataProto:
        """A verl ``DataProto`` with :meth:`tensors` and :meth:`non_tensors`."""
        from verl import DataProto

        return DataProto.from_dict(tensors=self.tensors(), non_tensors=self.non_tensors())


def scored_groups_to_batch(
    groups: Sequence[Mapping[str, Any]],
    limits: TrajectoryLimits,
    *,
    uid_prefix: str | None = None,
    drop_malformed: bool = False,
) -> TrajectoryBatch:
    """Convert the groups of one ``GET /batch`` answer into a :class:`TrajectoryBatch`.

    ``uid`` of group g is ``f"{uid_prefix}{g}"``; the default prefix is a fresh random one per call,
    so uids never repeat across batches. The rules are in this module's docstring.

    Raises:
        TrajectoryLengthError: a sequence over a length limit.
        TrajectoryFormatError: an empty batch, or a group that breaks ScoredData's shape (with
            ``drop_malformed``, only an empty batch or one where no sequence can be trained).
    """
    if not groups:
        raise TrajectoryFormatError("the batch holds no groups", field="batch")
    uid_prefix = f"{uuid.uuid4().hex}-" if uid_prefix is None else uid_prefix
    rows = _parse_groups(groups, limits, uid_prefix, drop_malformed)
    if drop_malformed and all(s.dropped for s in rows.samples):
        raise TrajectoryFormatError(f"no sequence of the batch can be trained (dropped: {dict(rows.dropped)})", field="batch")
    return TrajectoryBatch(
        **_padded_tensors(rows.samples, limits),
        scores_B=torch.tensor([s.score for s in rows.samples], dtype=torch.float32),
        uid_B=_object_array(rows.uids),
        group_index_B=np.asarray(rows.group_indices, dtype=np.int64),
        sample_index_B=np.asarray(rows.sample_indices, dtype=np.int64),
        env_id_B=_object_array(rows.env_ids),
        episode_stats_B=_object_array(rows.episode_stats),
        generation_params_G=tuple(rows.generation_params),
        dropped=dict(rows.dropped),
    )


@dataclass
class _Rows:
    """The parsed samples of a batch and where each row came from (one entry per row, but
    ``generation_params``: one per group)."""

    samples: list[Sample] = field(default_factory=list)
    uids: list[str] = field(default_factory=list)
    group_indices: list[int] = field(default_factory=list)
    sample_indices: list[int] = field(default_factory=list)
    env_ids: list[Any] = field(default_factory=list)
    episode_stats: list[str] = field(default_factory=list)  # JSON on each group's first row, else ""
    generation_params: list[Mapping[str, Any] | None] = field(default_factory=list)
    dropped: Counter[str] = field(default_factory=Counter)


def _parse_groups(groups: Sequence[Mapping[str, Any]], limits: TrajectoryLimits, uid_prefix: str,
                  drop_malformed: bool) -> _Rows:
    rows = _Rows()
    for g, group in enumerate(groups):
        group_samples = parse_group(group, g, limits, rows.dropped if drop_malformed else None)
        n = len(group_samples)
        rows.samples.extend(group_samples)
        # A placeholder row gets a uid of its own, so it leaves its group's statistics.
        rows.uids.extend([f"{uid_prefix}{g}-dropped-{i}" if s.dropped else f"{uid_prefix}{g}" for i, s in enumerate(group_samples)])
        rows.group_indices.extend([g] * n)
        rows.sample_indices.extend(range(n))
        env, stats = _episode_origin(group)
        rows.env_ids.extend([env] * n)
        rows.episode_stats.extend([stats] + [""] * (n - 1) if n else [])
        rows.generation_params.append(group.get("generation_params") if isinstance(group, Mapping) else None)
    return rows


def _episode_origin(group: Any) -> tuple[Any, str]:
    """The group's origin for metrics: the entry name an episode runner put in ``group_overrides``
    (recipe/atropos/episodes/scored_group.py) or else run-api's ``env_id``; and the runner's
    statistics as JSON ("" when none)."""
    if not isinstance(group, Mapping):
        return None, ""
    overrides = group.get("group_overrides")
    if isinstance(overrides, Mapping) and isinstance(overrides.get("env_name"), str) and overrides["env_name"]:
        stats = overrides.get("episode_stats")
        return overrides["env_name"], json.dumps(stats) if isinstance(stats, Mapping) else ""
    return group.get("env_id"), ""


def _padded_tensors(samples: Sequence[Sample], limits: TrajectoryLimits) -> dict[str, torch.Tensor | None]:
    """The padded token, mask, score, advantage and log-prob tensors of :class:`TrajectoryBatch`."""
    P = limits.max_prompt_length if limits.pad_to_limits else max(len(s.prompt) for s in samples)
    T = limits.max_response_length if limits.pad_to_limits else max(len(s.response) for s in samples)
    B = len(samples)
    prompts_BP = torch.full((B, P), limits.pad_token_id, dtype=torch.long)
    responses_BT = torch.full((B, T), limits.pad_token_id, dtype=torch.long)
    prompt_attention_BP = torch.zeros((B, P), dtype=torch.long)
    response_attention_BT = torch.zeros((B, T), dtype=torch.long)
    response_mask_BT = torch.zeros((B, T), dtype=torch.long)
    rm_scores_BT = torch.zeros((B, T), dtype=torch.float32)
    advantages_BT = torch.zeros((B, T), dtype=torch.float32)
    override_B = torch.zeros(B, dtype=torch.bool)
    logprobs_BT = torch.zeros((B, T), dtype=torch.float32)
    for b, sample in enumerate(samples):
        p, t = len(sample.prompt), len(sample.response)
        if p:
            prompts_BP[b, P - p :] = torch.tensor(sample.prompt, dtype=torch.long)
            prompt_attention_BP[b, P - p :] = 1
        responses_BT[b, :t] = torch.tensor(sample.response, dtype=torch.long)
        response_attention_BT[b, :t] = 1
        response_mask_BT[b, :t] = torch.from_numpy(sample.trained_T.astype(np.int64))
        rm_scores_BT[b, t - 1] = sample.score
        if sample.advantages_T is not None:
            advantages_BT[b, :t] = torch.from_numpy(sample.advantages_T)
            override_B[b] = True
        if sample.logprobs_T is not None:
            logprobs_BT[b, :t] = torch.from_numpy(sample.logprobs_T)
    attention_mask_BL = torch.cat([prompt_attention_BP, response_attention_BT], dim=1)
    has_overrides = bool(override_B.any())
    return {
        "prompts_BP": prompts_BP,
        "responses_BT": responses_BT,
        "input_ids_BL": torch.cat([prompts_BP, responses_BT], dim=1),
        "attention_mask_BL": attention_mask_BL,
        "position_ids_BL": position_ids_from_attention_mask(attention_mask_BL),
        "response_mask_BT": response_mask_BT,
        "rm_scores_BT": rm_scores_BT,
        "token_level_advantages_BT": advantages_BT if has_overrides else None,
        "advantage_override_mask_B": override_B if has_overrides else None,
        "rollout_log_probs_BT": logprobs_BT if all(s.logprobs_T is not None for s in samples) else None,
    }


def position_ids_from_attention_mask(attention_mask_BL: torch.Tensor) -> torch.Tensor:
    """verl's ``compute_position_id_with_mask``: clip(cumsum(mask) - 1, min=0)."""
    return torch.clip(torch.cumsum(attention_mask_BL, dim=-1) - 1, min=0)


def _object_array(values: Sequence[Any]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = list(values)
    return out
