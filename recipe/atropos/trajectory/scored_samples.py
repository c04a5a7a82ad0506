"""One ``GET /batch`` group -> its checked samples: the per-sequence half of the conversion, no torch.

For each sequence of a ScoredData group: the prompt/response split, the checks (tokens and masks
agree, token ids in range, a finite score, within the length limits, a response at all) and the
optional per-sequence fields (``advantages``, ``inference_logprobs``, ``overrides``) read into
arrays over the response. With a ``dropped`` counter (drop_malformed), a sequence or field that
fails is counted by reason and replaced (a placeholder :class:`Sample`, or None) instead of raised.
The rules are in :mod:`recipe.atropos.trajectory.scored_data`, which pads the samples into a batch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from recipe.atropos.protocol import IGNORE_INDEX
from recipe.atropos.wire import token_id_array

# Why a sequence, or one of its optional fields, was dropped in drop_malformed mode.
# token_id: an id >= vocab_size (negative or non-int ids are "sequence": not a token list at all);
# batch: sequences of a whole GET /batch answer of the wrong size (rollout.py).
DROP_REASONS = ("group", "sequence", "token_id", "score", "length", "no_response", "advantages", "inference_logprobs",
                "overrides", "batch")
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
class Sample:
    """One sequence, checked and split: what one row of the batch is made from."""

    prompt: list[int]
    response: list[int]
    trained_T: np.ndarray  # bool [len(response)]
    score: float
    advantages_T: np.ndarray | None  # float32 [len(response)], None = standard GRPO
    logprobs_T: np.ndarray | None  # float32 [len(response)], 0 where not trained
    dropped: bool = False  # a placeholder row that trains nothing (drop_malformed)


def split_prompt_response(mask: Sequence[int]) -> int:
    """Length of the prompt: the leading stretch of ``mask`` equal to -100."""
    for position, value in enumerate(mask):
        if value != IGNORE_INDEX:
            return position
    return len(mask)


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


def parse_group(group: Mapping[str, Any], g: int, limits: TrajectoryLimits,
                 dropped: Counter[str] | None = None) -> list[Sample]:
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


def _placeholder(limits: TrajectoryLimits) -> Sample:
    """A row that trains nothing: one pad token of prompt and of response, outside response_mask."""
    pad = limits.pad_token_id
    return Sample([pad], [pad], np.zeros(1, dtype=bool), 0.0, None, np.zeros(1, dtype=np.float32), dropped=True)


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
                        dropped: Counter[str] | None) -> list[Sample]:
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
                    overrides, dropped: Counter[str] | None) -> Sample:
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
    return Sample(list(seq[:p]), list(seq[p:]), trained_T, float(group["scores"][i]), advantages_T, logprobs_T)


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
