"""Atropos trajectory-API batches (``GET /batch``) -> the tensors of a verl batch after generation.

atroposlib's ``run-api`` hands a trainer a list of ``ScoredData`` groups (atroposlib
``api/server.py``). Each group holds, per sequence, ``tokens`` (prompt and response, one list),
``masks`` (same length; -100 = not trained, anything else = trained) and ``scores``; optionally
``advantages`` and ``inference_logprobs`` (per sequence, aligned with ``tokens``; atroposlib writes
1.0 at masked positions), ``overrides`` (per sequence dicts), ``group_overrides``,
``generation_params``, ``messages``, ``env_id``, ``ref_logprobs``, ``images``, ``distill_*``.

Rules of the conversion (:func:`scored_groups_to_batch`):

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
  every sequence of the batch has them.
- **Limits.** A prompt longer than ``max_prompt_length`` or a response longer than
  ``max_response_length`` is rejected (:class:`TrajectoryLengthError`, naming the group, sequence,
  env id and both lengths); nothing is truncated. So are malformed groups
  (:class:`TrajectoryFormatError`).
- **Not converted:** ``ref_logprobs`` (verl computes its own reference), ``messages``, ``images``,
  ``distill_*``, ``group_overrides``.

Staleness: atroposlib stamps nothing with the policy version it sampled from. The trajectory API
counts trainer steps (``GET /status`` ``current_step``: batches handed out) and each environment
mirrors it as ``BaseEnv.curr_step``. An environment can put that number in
``generation_params["policy_step"]`` (this recipe's ``atropos_gsm8k_env.py`` does);
:func:`trajectory_metrics` then reports ``current_step - policy_step``.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:  # verl is imported only by TrajectoryBatch.to_data_proto
    from verl import DataProto

IGNORE_INDEX = -100
POLICY_STEP_KEY = "policy_step"


class TrajectoryFormatError(ValueError):
    """A group from the trajectory API that cannot be converted; names the group and field."""

    def __init__(self, message: str, *, group_index: int | None = None, sample_index: int | None = None,
                 field: str | None = None) -> None:
        super().__init__(message)
        self.group_index = group_index
        self.sample_index = sample_index
        self.field = field


class TrajectoryLengthError(TrajectoryFormatError):
    """A sequence over the prompt or response length limit."""


@dataclass(frozen=True)
class TrajectoryLimits:
    """Sizes of the verl batch.

    max_prompt_length / max_response_length: verl's ``data.max_prompt_length`` and
    ``data.max_response_length`` (= the rollout's prompt_length / response_length).
    pad_token_id: the tokenizer's pad id.
    pad_to_limits: pad to the limits (as verl's agent loop does); False: to the batch's longest.
    """

    max_prompt_length: int
    max_response_length: int
    pad_token_id: int
    pad_to_limits: bool = True

    def __post_init__(self) -> None:
        if self.max_prompt_length < 1 or self.max_response_length < 1:
            raise ValueError(
                f"max_prompt_length ({self.max_prompt_length}) and max_response_length "
                f"({self.max_response_length}) must be at least 1"
            )


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
    token_level_advantages_BT: torch.Tensor | None = None
    advantage_override_mask_B: torch.Tensor | None = None
    rollout_log_probs_BT: torch.Tensor | None = None
    generation_params_G: tuple[Mapping[str, Any] | None, ...] = field(default=())

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
            "multi_modal_inputs": _object_array([{} for _ in range(self.batch_size)]),
        }

    def to_data_proto(self) -> DataProto:
        """A verl ``DataProto`` with :meth:`tensors` and :meth:`non_tensors`."""
        from verl import DataProto

        return DataProto.from_dict(tensors=self.tensors(), non_tensors=self.non_tensors())


@dataclass(frozen=True)
class _Sample:
    prompt: list[int]
    response: list[int]
    trained_T: np.ndarray  # bool [len(response)]
    score: float
    advantages_T: np.ndarray | None  # float32 [len(response)], None = standard GRPO
    logprobs_T: np.ndarray | None  # float32 [len(response)], 0 where not trained


def scored_groups_to_batch(
    groups: Sequence[Mapping[str, Any]],
    limits: TrajectoryLimits,
    *,
    uid_prefix: str | None = None,
) -> TrajectoryBatch:
    """Convert the groups of one ``GET /batch`` answer into a :class:`TrajectoryBatch`.

    ``uid`` of group g is ``f"{uid_prefix}{g}"``; the default prefix is a fresh random one per call,
    so uids never repeat across batches. The rules are in this module's docstring.

    Raises:
        TrajectoryLengthError: a sequence over a length limit.
        TrajectoryFormatError: an empty batch, or a group that breaks ScoredData's shape.
    """
    if not groups:
        raise TrajectoryFormatError("the batch holds no groups", field="batch")
    uid_prefix = f"{uuid.uuid4().hex}-" if uid_prefix is None else uid_prefix
    samples: list[_Sample] = []
    uids, group_indices, sample_indices, env_ids, generation_params = [], [], [], [], []
    for g, group in enumerate(groups):
        group_samples = _parse_group(group, g, limits)
        samples.extend(group_samples)
        uids.extend([f"{uid_prefix}{g}"] * len(group_samples))
        group_indices.extend([g] * len(group_samples))
        sample_indices.extend(range(len(group_samples)))
        env_ids.extend([group.get("env_id")] * len(group_samples))
        generation_params.append(group.get("generation_params"))

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
    has_logprobs = all(s.logprobs_T is not None for s in samples)
    return TrajectoryBatch(
        prompts_BP=prompts_BP,
        responses_BT=responses_BT,
        input_ids_BL=torch.cat([prompts_BP, responses_BT], dim=1),
        attention_mask_BL=attention_mask_BL,
        position_ids_BL=position_ids_from_attention_mask(attention_mask_BL),
        response_mask_BT=response_mask_BT,
        rm_scores_BT=rm_scores_BT,
        scores_B=torch.tensor([s.score for s in samples], dtype=torch.float32),
        uid_B=_object_array(uids),
        group_index_B=np.asarray(group_indices, dtype=np.int64),
        sample_index_B=np.asarray(sample_indices, dtype=np.int64),
        env_id_B=_object_array(env_ids),
        token_level_advantages_BT=advantages_BT if has_overrides else None,
        advantage_override_mask_B=override_B if has_overrides else None,
        rollout_log_probs_BT=logprobs_BT if has_logprobs else None,
        generation_params_G=tuple(generation_params),
    )


def position_ids_from_attention_mask(attention_mask_BL: torch.Tensor) -> torch.Tensor:
    """verl's ``compute_position_id_with_mask``: clip(cumsum(mask) - 1, min=0)."""
    return torch.clip(torch.cumsum(attention_mask_BL, dim=-1) - 1, min=0)


def split_prompt_response(mask: Sequence[int]) -> int:
    """Length of the prompt: the leading stretch of ``mask`` equal to -100."""
    for position, value in enumerate(mask):
        if value != IGNORE_INDEX:
            return position
    return len(mask)


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def trajectory_metrics(groups: Sequence[Mapping[str, Any]], *, current_step: int | None = None) -> dict[str, float]:
    """Metrics of one ``GET /batch`` answer, under ``atropos/``.

    - ``batch_groups``, ``batch_samples``: groups and sequences in the batch;
    - ``mean_score``: mean of every sequence's score;
    - ``identical_score_rate``: fraction of the groups of 2 or more whose scores are all equal
      (0 when there is no such group);
    - ``advantage_groups_fraction``: fraction of groups that carried token-level advantages;
    - ``zero_advantage_fraction``: fraction of sequences with ``set_advantage_to_zero``;
    - with ``current_step`` (the trajectory API's step, ``GET /status``) and groups whose
      ``generation_params`` carry ``policy_step``: ``staleness/mean``, ``staleness/max``
      (current_step - policy_step over those groups) and ``staleness/known_fraction``.
    """
    scores = [float(s) for group in groups for s in (group.get("scores") or [])]
    multi = [group.get("scores") or [] for group in groups if len(group.get("scores") or []) >= 2]
    identical = sum(1 for s in multi if len(set(float(x) for x in s)) == 1)
    with_advantages = sum(1 for group in groups if group.get("advantages"))
    zeroed = sum(
        1 for group in groups for o in (group.get("overrides") or []) if isinstance(o, Mapping) and o.get("set_advantage_to_zero")
    )
    metrics = {
        "atropos/batch_groups": float(len(groups)),
        "atropos/batch_samples": float(len(scores)),
        "atropos/mean_score": float(np.mean(scores)) if scores else math.nan,
        "atropos/identical_score_rate": identical / len(multi) if multi else 0.0,
        "atropos/advantage_groups_fraction": with_advantages / len(groups) if groups else 0.0,
        "atropos/zero_advantage_fraction": zeroed / len(scores) if scores else 0.0,
    }
    if current_step is not None and groups:
        steps = [policy_step_of(group) for group in groups]
        known = [current_step - s for s in steps if s is not None]
        metrics["atropos/staleness/known_fraction"] = len(known) / len(groups)
        if known:
            metrics["atropos/staleness/mean"] = float(np.mean(known))
            metrics["atropos/staleness/max"] = float(max(known))
    return metrics


def policy_step_of(group: Mapping[str, Any]) -> int | None:
    """``generation_params["policy_step"]`` of a group when it is an integer, else None."""
    params = group.get("generation_params")
    step = params.get(POLICY_STEP_KEY) if isinstance(params, Mapping) else None
    return int(step) if isinstance(step, (int, float)) and not isinstance(step, bool) and math.isfinite(step) else None


# --------------------------------------------------------------------------------------------
# Parsing one group
# --------------------------------------------------------------------------------------------


def _object_array(values: Sequence[Any]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = list(values)
    return out


def _where(group: Mapping[str, Any], g: int, i: int | None = None) -> str:
    env = group.get("env_id")
    text = f"group {g}" + (f" (env_id {env})" if env is not None else "")
    return text + (f", sequence {i}" if i is not None else "")


def _per_sequence(group: Mapping[str, Any], key: str, g: int, n: int) -> list[Any] | None:
    """An optional per-sequence list: None or [] means absent; otherwise it must have n entries."""
    value = group.get(key)
    if value is None or (isinstance(value, list) and len(value) == 0):
        return None
    if not isinstance(value, list) or len(value) != n:
        size = len(value) if isinstance(value, list) else type(value).__name__
        raise TrajectoryFormatError(
            f"{_where(group, g)}: {key} has {size} entries for {n} sequences", group_index=g, field=key
        )
    return value


def _response_part(values: Any, key: str, group: Mapping[str, Any], g: int, i: int,
                   prompt_length: int, response_length: int) -> np.ndarray:
    """The response part of a per-token list aligned with the whole sequence or with the response."""
    if not isinstance(values, (list, tuple)):
        raise TrajectoryFormatError(
            f"{_where(group, g, i)}: {key} must be a list of numbers, got {type(values).__name__}",
            group_index=g, sample_index=i, field=key,
        )
    array = np.asarray(values, dtype=np.float32)
    if array.ndim != 1:
        raise TrajectoryFormatError(
            f"{_where(group, g, i)}: {key} must be a flat list of numbers", group_index=g, sample_index=i, field=key
        )
    if len(array) == prompt_length + response_length:
        return array[prompt_length:]
    if len(array) == response_length:
        return array
    raise TrajectoryFormatError(
        f"{_where(group, g, i)}: {key} has {len(array)} values; expected {prompt_length + response_length} "
        f"(the whole sequence) or {response_length} (the response)",
        group_index=g, sample_index=i, field=key,
    )


def _parse_group(group: Mapping[str, Any], g: int, limits: TrajectoryLimits) -> list[_Sample]:
    if not isinstance(group, Mapping):
        raise TrajectoryFormatError(f"group {g}: expected a ScoredData object, got {type(group).__name__}", group_index=g)
    tokens, masks, scores = group.get("tokens"), group.get("masks"), group.get("scores")
    for key, value in (("tokens", tokens), ("masks", masks), ("scores", scores)):
        if not isinstance(value, list) or not value:
            raise TrajectoryFormatError(f"{_where(group, g)}: {key} must be a non-empty list", group_index=g, field=key)
    n = len(tokens)
    if len(masks) != n or len(scores) != n:
        raise TrajectoryFormatError(
            f"{_where(group, g)}: tokens ({n}), masks ({len(masks)}) and scores ({len(scores)}) must have one entry "
            "per sequence",
            group_index=g, field="masks" if len(masks) != n else "scores",
        )
    advantages = _per_sequence(group, "advantages", g, n)
    logprobs = _per_sequence(group, "inference_logprobs", g, n)
    overrides = _per_sequence(group, "overrides", g, n)
    samples = []
    for i in range(n):
        seq, mask = tokens[i], masks[i]
        if not isinstance(seq, list) or not isinstance(mask, list) or len(seq) != len(mask):
            raise TrajectoryFormatError(
                f"{_where(group, g, i)}: tokens and masks must be lists of equal length "
                f"(got {len(seq) if isinstance(seq, list) else type(seq).__name__} and "
                f"{len(mask) if isinstance(mask, list) else type(mask).__name__})",
                group_index=g, sample_index=i, field="masks",
            )
        score = scores[i]
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise TrajectoryFormatError(
                f"{_where(group, g, i)}: score {score!r} is not a finite number", group_index=g, sample_index=i,
                field="scores",
            )
        p = split_prompt_response(mask)
        t = len(seq) - p
        if p > limits.max_prompt_length or t > limits.max_response_length:
            raise TrajectoryLengthError(
                f"{_where(group, g, i)}: prompt of {p} tokens and response of {t} tokens exceed the limits "
                f"max_prompt_length={limits.max_prompt_length}, max_response_length={limits.max_response_length}",
                group_index=g, sample_index=i, field="tokens",
            )
        if t == 0:
            raise TrajectoryFormatError(
                f"{_where(group, g, i)}: no response (every one of its {p} mask values is -100)",
                group_index=g, sample_index=i, field="masks",
            )
        trained_T = np.asarray(mask[p:]) != IGNORE_INDEX
        override = overrides[i] if overrides is not None else None
        if override is not None and not isinstance(override, Mapping):
            raise TrajectoryFormatError(
                f"{_where(group, g, i)}: overrides entries must be objects, got {type(override).__name__}",
                group_index=g, sample_index=i, field="overrides",
            )
        advantages_T = None
        if override and override.get("set_advantage_to_zero"):
            advantages_T = np.zeros(t, dtype=np.float32)
        elif advantages is not None:
            advantages_T = _response_part(advantages[i], "advantages", group, g, i, p, t)
            if not np.isfinite(advantages_T[trained_T]).all():
                raise TrajectoryFormatError(
                    f"{_where(group, g, i)}: advantages hold non-finite values on trained tokens",
                    group_index=g, sample_index=i, field="advantages",
                )
            advantages_T = np.where(trained_T, advantages_T, 0.0).astype(np.float32)
        logprobs_T = None
        if logprobs is not None:
            logprobs_T = _response_part(logprobs[i], "inference_logprobs", group, g, i, p, t)
            logprobs_T = np.where(trained_T, logprobs_T, 0.0).astype(np.float32)
        samples.append(_Sample(list(seq[:p]), list(seq[p:]), trained_T, float(score), advantages_T, logprobs_T))
    return samples
