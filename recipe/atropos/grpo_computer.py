"""AtroposGRPOComputer: an environment's advantages -> token-level overrides for verl's GRPO.

The environment answers, per sample, a list of token advantages, one float, or null
(docs/PROTOCOL.md). Element j of a token list belongs to the j-th response token: the j-th
position, left to right, where `response_mask` is 1. A float is broadcast over the response; null
means "standard GRPO for this sample". The overrides then go through the GRPO estimator of
verl/trainer/ppo/core_algos.py, which computes standard GRPO for every row not overridden.

A sample whose answer is unusable falls back to GRPO alone (with `allow_fallback`), counted under
one of FALLBACK_SAMPLE_REASONS. Values are checked where they are used: finite in float64 as
sent, then finite once converted to float32 and to the training dtype (the rewards' dtype), so
that a finite 1e300 never reaches the estimator as inf.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import Optional, Union

import numpy as np
import torch

from recipe.atropos.datatypes import InvalidSample
from recipe.atropos.errors import AtroposProtocolError
from verl.trainer.ppo import core_algos

logger = logging.getLogger("verl.recipe.atropos")

SampleAdvantage = Union[Sequence[float], np.ndarray, float, None, InvalidSample]

# Why one sample fell back to GRPO (metrics `atropos/fallback_samples/<reason>`):
# malformed: not a number, a list of numbers or null; wrong_length: a token list whose length is
# not the response's; non_finite: NaN or inf; out_of_range: finite as sent, not in float32 or the
# training dtype; invalid_score: the service's score is unusable where advantages come from scores.
FALLBACK_SAMPLE_REASONS = ("malformed", "wrong_length", "non_finite", "out_of_range", "invalid_score")


class _Rejected(Exception):
    """One sample's answer cannot be used; internal to build_overrides."""

    def __init__(self, reason: str, message: str, expected=None, actual=None):
        super().__init__(message)
        self.reason, self.message, self.expected, self.actual = reason, message, expected, actual


@dataclasses.dataclass(frozen=True)
class AdvantageOverrides:
    """What the estimator needs to override rows, plus what was dropped on the way.

    token_level_advantages_BT: [B, T] overrides aligned with response_mask (0 outside it).
    override_mask_B: [B] bool, rows that take them.
    rejected: sample index -> the reason (one of FALLBACK_SAMPLE_REASONS) its answer was unusable
        and it fell back to GRPO.
    """

    token_level_advantages_BT: torch.Tensor
    override_mask_B: torch.Tensor
    rejected: dict[int, str] = dataclasses.field(default_factory=dict)

    @property
    def mismatched_samples(self) -> tuple[int, ...]:
        """The samples that fell back, in order."""
        return tuple(sorted(self.rejected))


@dataclasses.dataclass(frozen=True)
class AdvantageOutput:
    """Advantages for verl's batch and the `atropos/...` metrics of how they were made."""

    advantages_BT: torch.Tensor
    returns_BT: torch.Tensor
    metrics: dict[str, float]


class AtroposGRPOComputer:
    """Builds token-level overrides from an environment's answer and runs the GRPO estimator.

    Args:
        allow_fallback: an unusable answer for a sample (see FALLBACK_SAMPLE_REASONS) makes that
            sample fall back to standard GRPO and is counted by reason; when false it raises
            AtroposProtocolError naming the sample (and both lengths for a wrong length).
        epsilon, norm_adv_by_std_in_grpo: as verl's GRPO (`algorithm.norm_adv_by_std_in_grpo`).
    """

    def __init__(self, allow_fallback: bool = True, epsilon: float = 1e-6, norm_adv_by_std_in_grpo: bool = True):
        self.allow_fallback = allow_fallback
        self.epsilon = epsilon
        self.norm_adv_by_std_in_grpo = norm_adv_by_std_in_grpo

    def outcome_advantages(self, scores_B: np.ndarray, index_B: np.ndarray) -> np.ndarray:
        """GRPO outcome advantage of each score, float64 [B], by the same estimator as every step
        (each score is a one-token reward)."""
        scores_B1 = torch.from_numpy(np.asarray(scores_B, dtype=np.float64).reshape(-1, 1))
        advantages_B1, _ = core_algos.compute_grpo_outcome_advantage(
            token_level_rewards=scores_B1,
            response_mask=torch.ones_like(scores_B1),
            index=index_B,
            epsilon=self.epsilon,
            norm_adv_by_std_in_grpo=self.norm_adv_by_std_in_grpo,
        )
        return advantages_B1.squeeze(-1).numpy()

    def build_overrides(self, advantages: Sequence[SampleAdvantage], response_mask_BT: torch.Tensor) -> AdvantageOverrides:
        """Align the environment's per-sample advantages with `response_mask_BT` [B, T]."""
        batch_size, _ = response_mask_BT.shape
        if len(advantages) != batch_size:
            raise AtroposProtocolError(
                f"advantages has {len(advantages)} entries for a batch of {batch_size}",
                field="advantages", expected=batch_size, actual=len(advantages),
            )
        mask_BT = response_mask_BT.bool()
        response_len_B = mask_BT.sum(dim=-1).tolist()
        scalar_B = np.zeros(batch_size, dtype=np.float32)
        is_scalar_B = np.zeros(batch_size, dtype=bool)
        is_list_B = np.zeros(batch_size, dtype=bool)
        token_lists, rejected = [], {}
        for i, sample in enumerate(advantages):
            if sample is None:
                continue
            try:
                values = _sample_values(sample, response_len_B[i])
            except _Rejected as why:
                self._reject(i, why.reason, why.message, rejected, expected=why.expected, actual=why.actual)
                continue
            if values.ndim == 0:
                scalar_B[i], is_scalar_B[i] = values, True
            else:
                token_lists.append(values)
                is_list_B[i] = True

        device = response_mask_BT.device
        is_list_t = torch.from_numpy(is_list_B).to(device)
        is_scalar_t = torch.from_numpy(is_scalar_B).to(device)
        overrides_BT = torch.from_numpy(scalar_B).to(device).unsqueeze(-1) * mask_BT
        if token_lists:
            # Boolean-mask assignment fills positions in row-major order: exactly "the j-th response
            # token of each row" for the concatenated lists.
            overrides_BT[mask_BT & is_list_t.unsqueeze(-1)] = torch.from_numpy(np.concatenate(token_lists)).to(device)
        return AdvantageOverrides(overrides_BT, is_list_t | is_scalar_t, rejected)

    def _reject(self, index: int, reason: str, message: str, rejected: dict, expected=None, actual=None) -> None:
        if not self.allow_fallback:
            raise AtroposProtocolError(
                f"advantages[{index}]: {message}", field="advantages", sample_index=index, expected=expected, actual=actual
            )
        rejected[index] = reason if reason in FALLBACK_SAMPLE_REASONS else "malformed"

    def within_dtype(self, overrides: AdvantageOverrides, response_mask_BT: torch.Tensor, dtype: torch.dtype) -> AdvantageOverrides:
        """Rows whose overrides are not finite in `dtype` on their response tokens fall back (or raise)."""
        values_BT = overrides.token_level_advantages_BT
        converted_BT = values_BT.to(dtype)
        if torch.isfinite(converted_BT.sum()):  # one reduction on the common path
            return overrides
        mask_BT = response_mask_BT.to(device=values_BT.device).bool()
        take_B = overrides.override_mask_B.to(device=values_BT.device, dtype=torch.bool)
        bad_B = (~torch.isfinite(converted_BT) & mask_BT).any(dim=-1) & take_B
        if not bad_B.any():
            return overrides
        rejected = dict(overrides.rejected)
        non_finite_B = (~torch.isfinite(values_BT) & mask_BT).any(dim=-1)
        for i in bad_B.nonzero().flatten().tolist():
            reason = "non_finite" if non_finite_B[i] else "out_of_range"
            self._reject(i, reason, f"token advantages are not finite in the training dtype {dtype}", rejected)
        return dataclasses.replace(overrides, override_mask_B=take_B & ~bad_B, rejected=rejected)

    def compute(
        self,
        token_level_rewards_BT: torch.Tensor,
        response_mask_BT: torch.Tensor,
        index_B: np.ndarray,
        env_advantages: Optional[Sequence[SampleAdvantage]],
        alignment_mask_BT: Optional[torch.Tensor] = None,
    ) -> AdvantageOutput:
        """GRPO advantages with the environment's overrides, or plain GRPO when it gave none.

        `env_advantages` None means the service gave nothing usable this step (down, or fallback).
        `alignment_mask_BT` is the response mask the environment's token lists were made for, when
        verl has changed `response_mask_BT` since (rollout correction drops tokens): lists are
        aligned with it, then everything outside the current mask is zeroed by the estimator.
        """
        overrides = None
        if env_advantages is not None:
            alignment = response_mask_BT if alignment_mask_BT is None else alignment_mask_BT
            overrides = self.build_overrides(env_advantages, alignment)
        return self.compute_from_overrides(token_level_rewards_BT, response_mask_BT, index_B, overrides)

    def compute_from_overrides(
        self,
        token_level_rewards_BT: torch.Tensor,
        response_mask_BT: torch.Tensor,
        index_B: np.ndarray,
        overrides: Optional[AdvantageOverrides],
    ) -> AdvantageOutput:
        """The estimator with overrides already aligned as [B, T] (None: plain GRPO), and the metrics."""
        if overrides is not None:
            overrides = self.within_dtype(overrides, response_mask_BT, token_level_rewards_BT.dtype)
        advantages_BT, returns_BT = core_algos.compute_grpo_outcome_advantage(
            token_level_rewards=token_level_rewards_BT,
            response_mask=response_mask_BT,
            index=index_B,
            epsilon=self.epsilon,
            norm_adv_by_std_in_grpo=self.norm_adv_by_std_in_grpo,
            token_level_advantages=None if overrides is None else overrides.token_level_advantages_BT,
            advantage_override_mask=None if overrides is None else overrides.override_mask_B,
        )
        if overrides is not None and overrides.rejected:
            logger.warning(
                "%d samples fell back to GRPO (their advantages were unusable), sample: reason %s",
                len(overrides.rejected), dict(list(sorted(overrides.rejected.items()))[:10]),
            )
        return AdvantageOutput(advantages_BT, returns_BT, advantage_metrics(advantages_BT, response_mask_BT, overrides))


def advantage_metrics(
    advantages_BT: torch.Tensor, response_mask_BT: torch.Tensor, overrides: Optional[AdvantageOverrides]
) -> dict[str, float]:
    """Flat `atropos/...` metrics: how much was overridden, why samples fell back (one
    `atropos/fallback_samples/<reason>` count per FALLBACK_SAMPLE_REASONS, every step), and the
    advantages over response tokens."""
    batch_size = advantages_BT.shape[0]
    on_response = advantages_BT[response_mask_BT.bool()].float()
    overridden = 0 if overrides is None else int(overrides.override_mask_B.sum())
    metrics = {
        "atropos/override_fraction": overridden / max(batch_size, 1),
        # No sample took the environment's advantages: the step is standard GRPO.
        "atropos/fallback": 1.0 if overridden == 0 else 0.0,
        "atropos/shape_mismatches": 0.0 if overrides is None else float(len(overrides.rejected)),
    }
    reasons = [] if overrides is None else list(overrides.rejected.values())
    metrics.update({f"atropos/fallback_samples/{reason}": float(reasons.count(reason)) for reason in FALLBACK_SAMPLE_REASONS})
    if on_response.numel():
        metrics.update({
            "atropos/advantages/mean": on_response.mean().item(),
            "atropos/advantages/std": on_response.std().item() if on_response.numel() > 1 else 0.0,
            "atropos/advantages/min": on_response.min().item(),
            "atropos/advantages/max": on_response.max().item(),
        })
    return metrics


def _sample_values(sample: SampleAdvantage, length: int) -> np.ndarray:
    """One sample's answer as a float32 scalar (0-d) or [length] array; raises _Rejected saying why not."""
    if isinstance(sample, InvalidSample):  # the client already found it unusable
        raise _Rejected(sample.reason, sample.message)
    if isinstance(sample, (bool, np.bool_)):
        raise _Rejected("malformed", f"{sample!r} is not a number")
    if isinstance(sample, (int, float, np.floating, np.integer)):
        try:
            wide = float(sample)
        except OverflowError:
            raise _Rejected("out_of_range", "an integer beyond float64") from None
        if not math.isfinite(wide):
            raise _Rejected("non_finite", f"advantage {wide} is not finite")
        with np.errstate(over="ignore"):
            value = np.float32(wide)
        if not np.isfinite(value):
            raise _Rejected("out_of_range", f"advantage {wide:.3g} is beyond float32")
        return np.asarray(value)
    try:
        values_T = np.asarray(sample)
    except (ValueError, TypeError, OverflowError) as exc:  # ragged nesting
        raise _Rejected("malformed", f"expected a list of numbers ({exc})") from None
    if values_T.ndim != 1 or (values_T.size and values_T.dtype.kind not in "iuf"):
        raise _Rejected("malformed", f"expected a flat list of numbers, got {values_T.ndim}-d values of type {values_T.dtype}")
    if values_T.shape[0] != length:
        raise _Rejected(
            "wrong_length", f"{values_T.size} token advantages for a response of {length} tokens",
            expected=length, actual=values_T.size,
        )
    if values_T.dtype != np.float32:
        wide_T = values_T.astype(np.float64)
        if not np.isfinite(wide_T).all():
            raise _Rejected("non_finite", "token advantages are not all finite")
        with np.errstate(over="ignore"):
            values_T = wide_T.astype(np.float32)
        if not np.isfinite(values_T).all():
            raise _Rejected("out_of_range", "token advantages are beyond float32")
    elif not np.isfinite(values_T).all():
        raise _Rejected("non_finite", "token advantages are not all finite")
    return values_T
