"""AtroposGRPOComputer: an environment's advantages -> token-level overrides for verl's GRPO.

The environment answers, per sample, a list of token advantages, one float, or null
(../shared/PROTOCOL.md). Element j of a token list belongs to the j-th response token: the j-th
position, left to right, where `response_mask` is 1. A float is broadcast over the response; null
means "standard GRPO for this sample". The overrides then go through the GRPO estimator of
verl/trainer/ppo/core_algos.py, which computes standard GRPO for every row not overridden.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Optional, Union

import numpy as np
import torch

from recipe.atropos.client import AtroposProtocolError
from verl.trainer.ppo import core_algos

logger = logging.getLogger("verl.recipe.atropos")

SampleAdvantage = Union[Sequence[float], np.ndarray, float, None]


@dataclasses.dataclass(frozen=True)
class AdvantageOverrides:
    """What the estimator needs to override rows, plus what was dropped on the way.

    token_level_advantages_BT: [B, T] overrides aligned with response_mask (0 outside it).
    override_mask_B: [B] bool, rows that take them.
    mismatched_samples: samples whose token list had the wrong length (or non-finite values) and
        fell back to GRPO.
    """

    token_level_advantages_BT: torch.Tensor
    override_mask_B: torch.Tensor
    mismatched_samples: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class AdvantageOutput:
    """Advantages for verl's batch and the `atropos/...` metrics of how they were made."""

    advantages_BT: torch.Tensor
    returns_BT: torch.Tensor
    metrics: dict[str, float]


class AtroposGRPOComputer:
    """Builds token-level overrides from an environment's answer and runs the GRPO estimator.

    Args:
        allow_fallback: a token list of the wrong length (or with non-finite values) makes that
            sample fall back to standard GRPO and is counted; when false it raises
            AtroposProtocolError naming the sample and both lengths.
        epsilon, norm_adv_by_std_in_grpo: as verl's GRPO (`algorithm.norm_adv_by_std_in_grpo`).
    """

    def __init__(self, allow_fallback: bool = True, epsilon: float = 1e-6, norm_adv_by_std_in_grpo: bool = True):
        self.allow_fallback = allow_fallback
        self.epsilon = epsilon
        self.norm_adv_by_std_in_grpo = norm_adv_by_std_in_grpo

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
        token_lists, mismatched = [], []
        for i, sample in enumerate(advantages):
            if sample is None:
                continue
            if isinstance(sample, (int, float, np.floating, np.integer)):
                if np.isfinite(sample):
                    scalar_B[i], is_scalar_B[i] = sample, True
                else:
                    self._reject(i, f"advantage {sample} is not finite", mismatched)
                continue
            values_T = np.asarray(sample, dtype=np.float32)
            if values_T.ndim != 1 or values_T.shape[0] != response_len_B[i]:
                self._reject(
                    i, f"{values_T.size} token advantages for a response of {response_len_B[i]} tokens", mismatched,
                    expected=response_len_B[i], actual=values_T.size,
                )
            elif not np.isfinite(values_T).all():
                self._reject(i, "token advantages are not all finite", mismatched)
            else:
                token_lists.append(values_T)
                is_list_B[i] = True

        device = response_mask_BT.device
        is_list_t = torch.from_numpy(is_list_B).to(device)
        is_scalar_t = torch.from_numpy(is_scalar_B).to(device)
        overrides_BT = torch.from_numpy(scalar_B).to(device).unsqueeze(-1) * mask_BT
        if token_lists:
            # Boolean-mask assignment fills positions in row-major order: exactly "the j-th response
            # token of each row" for the concatenated lists.
            overrides_BT[mask_BT & is_list_t.unsqueeze(-1)] = torch.from_numpy(np.concatenate(token_lists)).to(device)
        return AdvantageOverrides(overrides_BT, is_list_t | is_scalar_t, tuple(mismatched))

    def _reject(self, index: int, reason: str, mismatched: list[int], expected=None, actual=None) -> None:
        if not self.allow_fallback:
            raise AtroposProtocolError(
                f"advantages[{index}]: {reason}", field="advantages", sample_index=index, expected=expected, actual=actual
            )
        mismatched.append(index)

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
        advantages_BT, returns_BT = core_algos.compute_grpo_outcome_advantage(
            token_level_rewards=token_level_rewards_BT,
            response_mask=response_mask_BT,
            index=index_B,
            epsilon=self.epsilon,
            norm_adv_by_std_in_grpo=self.norm_adv_by_std_in_grpo,
            token_level_advantages=None if overrides is None else overrides.token_level_advantages_BT,
            advantage_override_mask=None if overrides is None else overrides.override_mask_B,
        )
        if overrides is not None and overrides.mismatched_samples:
            logger.warning(
                "%d samples fell back to GRPO (token advantages of the wrong length or not finite): %s",
                len(overrides.mismatched_samples), list(overrides.mismatched_samples[:10]),
            )
        return AdvantageOutput(advantages_BT, returns_BT, advantage_metrics(advantages_BT, response_mask_BT, overrides))


def advantage_metrics(
    advantages_BT: torch.Tensor, response_mask_BT: torch.Tensor, overrides: Optional[AdvantageOverrides]
) -> dict[str, float]:
    """Flat `atropos/...` metrics: how much was overridden, and the advantages over response tokens."""
    batch_size = advantages_BT.shape[0]
    on_response = advantages_BT[response_mask_BT.bool()].float()
    overridden = 0 if overrides is None else int(overrides.override_mask_B.sum())
    metrics = {
        "atropos/override_fraction": overridden / max(batch_size, 1),
        # No sample took the environment's advantages: the step is standard GRPO.
        "atropos/fallback": 1.0 if overridden == 0 else 0.0,
        "atropos/shape_mismatches": 0.0 if overrides is None else float(len(overrides.mismatched_samples)),
    }
    if on_response.numel():
        metrics.update({
            "atropos/advantages/mean": on_response.mean().item(),
            "atropos/advantages/std": on_response.std().item() if on_response.numel() > 1 else 0.0,
            "atropos/advantages/min": on_response.min().item(),
            "atropos/advantages/max": on_response.max().item(),
        })
    return metrics
