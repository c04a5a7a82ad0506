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

Staleness: atroposlib stamps nothing with the policy version it sampled from. The trajectory API
counts trainer steps (``GET /status`` ``current_step``: batches handed out) and each environment
mirrors it as ``BaseEnv.curr_step``. An environment can put that number in
``generation_params["policy_step"]`` (this recipe's ``atropos_gsm8k_env.py`` does);
:func:`~recipe.atropos.trajectory.metrics.trajectory_metrics` then reports ``current_step - policy_step``.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from recipe.atropos.wire import token_id_array

if TYPE_CHECKING:  # verl is imported only by TrajectoryBatch.to_data_proto
    from verl import DataProto

IGNORE_INDEX = -100
# Why a sequence, or one of its optional fields, was dropped in drop_malformed mode.
# token_id: an id >= vocab_size (negative or non-int ids are "sequence": not a token list at all);
# batch: sequences of a whole GET /batch answer of the wrong size (rollout.py).
DROP_REASONS = ("group", "sequence", "token_id", "score", "length", "no_response", "advantages", "inference_logprobs",
                "overrides", "batch")
POLICY_STEP_KEY = "policy_step"
_FLOAT32_MAX = float(np.finfo(np.float32).max)


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
    vocab_size: ids must be below it (``len(tokenizer)``); None: not checked beyond the wire's range.
    """

    max_prompt_length: int
    max_response_length: int
    pad_token_id: int
    pad_to_limits: bool = True
    vocab_size: int | None = None

    def __post_init__(self) -> None:
        if self.max_prompt_length < 1 or self.max_response_length < 1:
            raise ValueError(
                f"max_prompt_length ({self.max_prompt_length}) and max_response_length "
                f"({self.max_response_length}) must be at least 1"
            )
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError(f"vocab_size must be at least 1, got {self.vocab_size}")


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
    dropped: bool = False  # a placeholder row that trains nothing (drop_malformed)


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
        generation_params_G=tuple(rows.generation_params),
        dropped=dict(rows.dropped),
    )


@dataclass
class _Rows:
    """The parsed samples of a batch and where each row came from (one entry per row, but
    ``generation_params``: one per group)."""

    samples: list[_Sample] = field(default_factory=list)
    uids: list[str] = field(default_factory=list)
    group_indices: list[int] = field(default_factory=list)
    sample_indices: list[int] = field(default_factory=list)
    env_ids: list[Any] = field(default_factory=list)
    generation_params: list[Mapping[str, Any] | None] = field(default_factory=list)
    dropped: Counter[str] = field(default_factory=Counter)


def _parse_groups(groups: Sequence[Mapping[str, Any]], limits: TrajectoryLimits, uid_prefix: str,
                  drop_malformed: bool) -> _Rows:
    rows = _Rows()
    for g, group in enumerate(groups):
        group_samples = _parse_group(group, g, limits, rows.dropped if drop_malformed else None)
        n = len(group_samples)
        rows.samples.extend(group_samples)
        # A placeholder row gets a uid of its own, so it leaves its group's statistics.
        rows.uids.extend([f"{uid_prefix}{g}-dropped-{i}" if s.dropped else f"{uid_prefix}{g}" for i, s in enumerate(group_samples)])
        rows.group_indices.extend([g] * n)
        rows.sample_indices.extend(range(n))
        rows.env_ids.extend([group.get("env_id") if isinstance(group, Mapping) else None] * n)
        rows.generation_params.append(group.get("generation_params") if isinstance(group, Mapping) else None)
    return rows


def _padded_tensors(samples: Sequence[_Sample], limits: TrajectoryLimits) -> dict[str, torch.Tensor | None]:
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


def split_prompt_response(mask: Sequence[int]) -> int:
    """Length of the prompt: the leading stretch of ``mask`` equal to -100."""
    for position, value in enumerate(mask):
        if value != IGNORE_INDEX:
            return position
    return len(mask)


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
    try:
        with np.errstate(over="ignore"):  # beyond float32 becomes inf, rejected as non-finite
            array = np.asarray(values, dtype=np.float32)
    except (ValueError, TypeError, OverflowError):
        array = np.zeros((0, 0))
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


def _parse_group(group: Mapping[str, Any], g: int, limits: TrajectoryLimits,
                 dropped: Counter[str] | None = None) -> list[_Sample]:
    """The group's samples; raises on the first problem, or (a `dropped` counter given) isolates it."""
    if dropped is None:
        return _parse_group_strict(group, g, limits, None)
    try:
        return _parse_group_strict(group, g, limits, dropped)
    except TrajectoryFormatError:  # the group's own shape: every row it counts for trains nothing
        tokens = group.get("tokens") if isinstance(group, Mapping) else None
        rows = len(tokens) if isinstance(tokens, list) else 0
        dropped["group"] += rows
        return [_placeholder(limits)] * rows


def _placeholder(limits: TrajectoryLimits) -> _Sample:
    """A row that trains nothing: one pad token of prompt and of response, outside response_mask."""
    pad = limits.pad_token_id
    return _Sample([pad], [pad], np.zeros(1, dtype=bool), 0.0, None, np.zeros(1, dtype=np.float32), dropped=True)


def _optional(parse, dropped: Counter[str] | None, reason: str):
    """parse(), or None counted under `reason` when it fails and problems are isolated."""
    try:
        return parse()
    except TrajectoryFormatError:
        if dropped is None:
            raise
        dropped[reason] += 1
        return None


def _parse_group_strict(group: Mapping[str, Any], g: int, limits: TrajectoryLimits,
                        dropped: Counter[str] | None) -> list[_Sample]:
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
    advantages = _optional(lambda: _per_sequence(group, "advantages", g, n), dropped, "advantages")
    logprobs = _optional(lambda: _per_sequence(group, "inference_logprobs", g, n), dropped, "inference_logprobs")
    overrides = _optional(lambda: _per_sequence(group, "overrides", g, n), dropped, "overrides")
    samples = []
    for i in range(n):
        try:
            samples.append(_parse_sequence(group, g, i, limits, advantages, logprobs, overrides, dropped))
        except TrajectoryFormatError as exc:
            if dropped is None:
                raise
            dropped[_drop_reason(exc)] += 1
            samples.append(_placeholder(limits))
    return samples


def _drop_reason(exc: TrajectoryFormatError) -> str:
    if isinstance(exc, TrajectoryLengthError):
        return "length"
    if exc.field == "scores":
        return "score"
    if exc.field == "token_id":
        return "token_id"
    return "no_response" if "no response" in str(exc) else "sequence"


def _parse_sequence(group: Mapping[str, Any], g: int, i: int, limits: TrajectoryLimits, advantages, logprobs,
                    overrides, dropped: Counter[str] | None) -> _Sample:
    """Sequence i of group g; optional fields that fail are dropped (counted) when `dropped` is given."""
    seq, p = _checked_sequence(group, g, i, limits)
    t = len(seq) - p
    trained_T = np.asarray(group["masks"][i][p:]) != IGNORE_INDEX
    override = _optional(lambda: _override_of(overrides, group, g, i), dropped, "overrides")
    if override and override.get("set_advantage_to_zero"):
        advantages_T = np.zeros(t, dtype=np.float32)
    else:
        advantages_T = _optional(lambda: _advantages_of(advantages, group, g, i, p, trained_T), dropped, "advantages")
    logprobs_T = _optional(lambda: _logprobs_of(logprobs, group, g, i, p, trained_T), dropped, "inference_logprobs")
    return _Sample(list(seq[:p]), list(seq[p:]), trained_T, float(group["scores"][i]), advantages_T, logprobs_T)


def _checked_sequence(group: Mapping[str, Any], g: int, i: int, limits: TrajectoryLimits) -> tuple[list, int]:
    """Sequence i's tokens and its prompt length, once tokens, mask, score and lengths are valid."""
    seq, mask, score = group["tokens"][i], group["masks"][i], group["scores"][i]
    if not isinstance(seq, list) or not isinstance(mask, list) or len(seq) != len(mask):
        raise TrajectoryFormatError(
            f"{_where(group, g, i)}: tokens and masks must be lists of equal length "
            f"(got {len(seq) if isinstance(seq, list) else type(seq).__name__} and "
            f"{len(mask) if isinstance(mask, list) else type(mask).__name__})",
            group_index=g, sample_index=i, field="masks",
        )
    _check_token_ids(seq, group, g, i, limits)
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not abs(score) <= _FLOAT32_MAX:
        raise TrajectoryFormatError(  # rm_scores is float32: beyond it is not finite either
            f"{_where(group, g, i)}: score {score!r} is not a finite number", group_index=g, sample_index=i,
            field="scores",
        )
    try:
        mask_L = np.asarray(mask)
    except (ValueError, TypeError, OverflowError):  # ragged nesting
        mask_L = np.zeros((0, 0))
    if mask_L.ndim != 1 or (mask_L.size and mask_L.dtype.kind not in "iu"):
        raise TrajectoryFormatError(f"{_where(group, g, i)}: masks must hold ints", group_index=g, sample_index=i,
                                    field="masks")
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
    return seq, p


def _check_token_ids(seq: list, group: Mapping[str, Any], g: int, i: int, limits: TrajectoryLimits) -> None:
    try:  # an id out of range would only fail inside the model's embedding, on a worker
        ids = token_id_array(seq)
    except ValueError as exc:
        raise TrajectoryFormatError(f"{_where(group, g, i)}: tokens: {exc}", group_index=g, sample_index=i,
                                    field="tokens") from None
    if limits.vocab_size is not None and ids.size and int(ids.max()) >= limits.vocab_size:
        raise TrajectoryFormatError(
            f"{_where(group, g, i)}: token id {int(ids.max())} is not in the tokenizer's vocabulary of "
            f"{limits.vocab_size} (an environment tokenizing with another model's tokenizer?)",
            group_index=g, sample_index=i, field="token_id",
        )


def _override_of(overrides: list | None, group: Mapping[str, Any], g: int, i: int) -> Mapping[str, Any] | None:
    override = overrides[i] if overrides is not None else None
    if override is not None and not isinstance(override, Mapping):
        raise TrajectoryFormatError(
            f"{_where(group, g, i)}: overrides entries must be objects, got {type(override).__name__}",
            group_index=g, sample_index=i, field="overrides",
        )
    return override


def _advantages_of(advantages: list | None, group: Mapping[str, Any], g: int, i: int, p: int,
                   trained_T: np.ndarray) -> np.ndarray | None:
    if advantages is None:
        return None
    values_T = _response_part(advantages[i], "advantages", group, g, i, p, len(trained_T))
    if not np.isfinite(values_T[trained_T]).all():
        raise TrajectoryFormatError(
            f"{_where(group, g, i)}: advantages hold non-finite values on trained tokens",
            group_index=g, sample_index=i, field="advantages",
        )
    return np.where(trained_T, values_T, 0.0).astype(np.float32)


def _logprobs_of(logprobs: list | None, group: Mapping[str, Any], g: int, i: int, p: int,
                 trained_T: np.ndarray) -> np.ndarray | None:
    if logprobs is None:
        return None
    values_T = _response_part(logprobs[i], "inference_logprobs", group, g, i, p, len(trained_T))
    return np.where(trained_T, values_T, 0.0).astype(np.float32)
