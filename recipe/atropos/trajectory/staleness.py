"""Which weights generated each pulled sample, and the staleness bound of trajectory mode.

Every token an environment trains on was generated through the policy gateway, which records each
completion with the weights version that produced it and its sampled tokens' log-probs
(trajectory/behavior.py). Here each group pulled from run-api is matched to those records, and the
groups of a step's batch are chosen:

- **Matching.** Each contiguous run of trained tokens (mask != -100) in a sample's response is one
  completion (a multi-turn sample has several); it is looked up by its exact token ids. A sample
  is *matched* when every run is found: its behaviour version is the oldest of its runs', its
  behaviour log-probs are the records' on its trained tokens (0 elsewhere). A run not found (an
  environment that re-tokenized the text it got back, a completion generated elsewhere, or one
  older than the records' window) makes the sample *unmatched*. A sequence too malformed to split
  is neither: the conversion (scored_data.py) drops or refuses it.
- **Matched when pulled.** Groups are matched as soon as run-api hands them over, while their
  versions are still recorded; a group kept for a later step carries its match with it.
- **The bound.** Staleness = the version the trainer's weights are at (the one the servers hold
  while it pulls) minus the behaviour version. A group with any sample beyond ``max_staleness`` is
  dropped (reason ``stale``); with ``unmatched="drop"`` so is a group with an unmatched sample
  (reason ``unmatched``); each is checked again at every step it waits for.
- **Filling the batch.** Run-api hands out whole batches; a step takes the first groups, in the
  order they were pulled, that make exactly its number of rows, and keeps the rest for the next
  step. When they cannot, the caller pulls another batch.

verl's rollout correction consumes the result unchanged: matched log-probs become the batch's
``rollout_log_probs``; an unmatched sample that is kept gets its own recomputed ``old_log_probs``
there (:func:`fill_unmatched`), so its importance weight is exactly 1.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from recipe.atropos.protocol import IGNORE_INDEX
from recipe.atropos.trajectory.behavior import BehaviorRecords
from recipe.atropos.trajectory.scored_samples import split_prompt_response

# Why a whole group was dropped before training (metrics atropos/dropped_groups/<reason>).
DROP_REASONS = ("stale", "unmatched")
UNMATCHED_CHOICES = ("keep", "drop")
# The batch's per-row flag: True where rollout_log_probs holds the gateway's record.
BEHAVIOR_MATCHED = "atropos_behavior_matched"


@dataclasses.dataclass(frozen=True)
class SampleBehavior:
    """What the records say about one sample.

    matched: True (every trained run found), False (one was not), None (a sequence too malformed
        to split; the conversion handles it).
    version: the oldest behaviour version over its runs (None unless matched).
    logprobs_T: float32 [len(response)], the records' log-probs on trained tokens, 0 elsewhere
        (None unless matched).
    env_logprobs_max_abs_diff: largest |recorded - environment's inference_logprobs| over its trained
        tokens, when the environment sent them (None otherwise).
    """

    matched: bool | None
    version: int | None = None
    logprobs_T: np.ndarray | None = None
    env_logprobs_max_abs_diff: float | None = None


@dataclasses.dataclass(frozen=True)
class PulledGroup:
    """One run-api group and its samples' behaviour, as matched when it was pulled."""

    group: Mapping[str, Any]
    samples: tuple[SampleBehavior, ...]

    @property
    def rows(self) -> int:
        tokens = self.group.get("tokens") if isinstance(self.group, Mapping) else None
        return len(tokens) if isinstance(tokens, list) else 0

    @property
    def oldest_version(self) -> int | None:
        versions = [s.version for s in self.samples if s.matched]
        return min(versions) if versions else None

    @property
    def has_unmatched(self) -> bool:
        return any(s.matched is False for s in self.samples)


def trained_runs(trained_T: np.ndarray) -> list[slice]:
    """The maximal stretches of True in a bool array, in order."""
    padded = np.concatenate([[False], np.asarray(trained_T, dtype=bool), [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    return [slice(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


def match_sample(records: BehaviorRecords, tokens: Any, mask: Any, env_logprobs: Any = None) -> SampleBehavior:
    """One sequence (``tokens`` and ``masks`` as ScoredData has them) against the records."""
    if not isinstance(tokens, list) or not isinstance(mask, list) or len(tokens) != len(mask):
        return SampleBehavior(None)
    try:
        tokens_L = np.asarray(tokens, dtype=np.int64)
        trained_L = np.asarray(mask) != IGNORE_INDEX
    except (ValueError, TypeError, OverflowError):
        return SampleBehavior(None)
    if tokens_L.ndim != 1 or trained_L.ndim != 1:
        return SampleBehavior(None)
    p = split_prompt_response(mask)
    response_T, trained_T = tokens_L[p:], trained_L[p:]
    runs = trained_runs(trained_T)
    if not runs:
        return SampleBehavior(None)
    logprobs_T = np.zeros(len(response_T), dtype=np.float32)
    versions = []
    for run in runs:
        record = records.lookup(response_T[run])
        # A record without a version (weights of unknown step) cannot be bounded: as unmatched.
        if record is None or record.version is None or len(record.logprobs_T) != run.stop - run.start:
            return SampleBehavior(False)
        logprobs_T[run] = record.logprobs_T
        versions.append(record.version)
    return SampleBehavior(True, min(versions), logprobs_T, _env_diff(env_logprobs, p, logprobs_T, trained_T))


def _env_diff(env_logprobs: Any, p: int, logprobs_T: np.ndarray, trained_T: np.ndarray) -> float | None:
    """How far the environment's own inference_logprobs are from the records (a check, not used)."""
    if not isinstance(env_logprobs, list) or not trained_T.any():
        return None
    try:
        values = np.asarray(env_logprobs, dtype=np.float64)
    except (ValueError, TypeError, OverflowError):
        return None
    if values.ndim != 1 or len(values) not in (p + len(trained_T), len(trained_T)):
        return None
    values_T = values[len(values) - len(trained_T):]
    return float(np.max(np.abs(values_T[trained_T] - logprobs_T[trained_T])))


def match_group(records: BehaviorRecords, group: Mapping[str, Any]) -> PulledGroup:
    """Every sample of one run-api group against the records."""
    if not isinstance(group, Mapping) or not isinstance(group.get("tokens"), list):
        return PulledGroup(group, ())
    tokens, masks = group["tokens"], group.get("masks")
    masks = masks if isinstance(masks, list) and len(masks) == len(tokens) else [None] * len(tokens)
    env_logprobs = group.get("inference_logprobs")
    env_logprobs = env_logprobs if isinstance(env_logprobs, list) and len(env_logprobs) == len(tokens) else None
    return PulledGroup(group, tuple(
        match_sample(records, t, m, env_logprobs[i] if env_logprobs else None)
        for i, (t, m) in enumerate(zip(tokens, masks))
    ))


@dataclasses.dataclass(frozen=True)
class Selection:
    """The groups of one step's batch, their behaviour, and what was dropped on the way."""

    pulled: tuple[PulledGroup, ...]
    current_version: int
    dropped_groups: Mapping[str, int]

    @property
    def groups(self) -> list[Mapping[str, Any]]:
        return [p.group for p in self.pulled]

    def metrics(self) -> dict[str, float]:
        """``atropos/staleness/{mean,max}`` (weights versions, over matched samples),
        ``atropos/behavior_matched_fraction`` (of the samples that can be trained),
        ``atropos/dropped_groups/<reason>`` and ``atropos/behavior_logprob_env_max_abs_diff``
        (records vs the environments' own inference_logprobs, where sent)."""
        samples = [s for p in self.pulled for s in p.samples if s.matched is not None]
        staleness = [self.current_version - s.version for s in samples if s.matched]
        diffs = [s.env_logprobs_max_abs_diff for s in samples if s.env_logprobs_max_abs_diff is not None]
        out = {f"atropos/dropped_groups/{reason}": float(self.dropped_groups.get(reason, 0)) for reason in DROP_REASONS}
        out["atropos/behavior_matched_fraction"] = len(staleness) / len(samples) if samples else 0.0
        if staleness:
            out["atropos/staleness/mean"] = float(np.mean(staleness))
            out["atropos/staleness/max"] = float(max(staleness))
        if diffs:
            out["atropos/behavior_logprob_env_max_abs_diff"] = float(max(diffs))
        return out

    def behavior_tensors(self, group_index_B: np.ndarray, sample_index_B: np.ndarray, response_mask_BT: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """``rollout_log_probs`` [B, T] (the records' log-probs on matched rows, 0 elsewhere) and the
        matched flag [B], for the converted rows (``group_index_B`` / ``sample_index_B`` say which
        group and sample each row is; a placeholder row that trains nothing is left unmatched)."""
        B, T = response_mask_BT.shape
        logprobs_BT = torch.zeros((B, T), dtype=torch.float32)
        matched_B = torch.zeros(B, dtype=torch.bool)
        trains_B = response_mask_BT.bool().any(dim=-1)
        for b in range(B):
            sample = self.pulled[int(group_index_B[b])].samples[int(sample_index_B[b])]
            if sample.matched and bool(trains_B[b]) and len(sample.logprobs_T) <= T:
                logprobs_BT[b, : len(sample.logprobs_T)] = torch.from_numpy(sample.logprobs_T)
                matched_B[b] = True
        return logprobs_BT, matched_B


class StalenessFilter:
    """Groups pulled from run-api, matched to the gateway's records, kept until a step takes them.

    ``add`` matches groups as they arrive; ``take`` drops what is beyond the bound and returns the
    first groups (in arrival order) that make exactly a step's rows, or None when they cannot.
    """

    def __init__(self, records: BehaviorRecords, max_staleness: int, unmatched: str = "keep"):
        if max_staleness < 0:
            raise ValueError(f"trainer.atropos.max_staleness must be >= 0, got {max_staleness}")
        if unmatched not in UNMATCHED_CHOICES:
            raise ValueError(f"trainer.atropos.unmatched_samples must be one of {UNMATCHED_CHOICES}, got {unmatched!r}")
        self.records = records
        self.max_staleness = max_staleness
        self.unmatched = unmatched
        self.waiting: list[PulledGroup] = []
        self.dropped: Counter[str] = Counter()  # since the last take that returned a batch
        self.dropped_total: Counter[str] = Counter()

    @property
    def waiting_rows(self) -> int:
        return sum(p.rows for p in self.waiting)

    def add(self, groups: Sequence[Mapping[str, Any]]) -> None:
        self.waiting.extend(match_group(self.records, g) for g in groups)

    def drop_reason(self, pulled: PulledGroup, current_version: int) -> str | None:
        oldest = pulled.oldest_version
        if oldest is not None and current_version - oldest > self.max_staleness:
            return "stale"
        if self.unmatched == "drop" and pulled.has_unmatched:
            return "unmatched"
        return None

    def take(self, num_rows: int, current_version: int) -> Selection | None:
        """The step's groups, or None (the caller pulls more and calls again)."""
        kept = []
        for pulled in self.waiting:
            reason = self.drop_reason(pulled, current_version)
            if reason is None:
                kept.append(pulled)
            else:
                self.dropped[reason] += 1
                self.dropped_total[reason] += 1
        self.waiting = kept
        chosen = _first_exact_subset([p.rows for p in kept], num_rows)
        if chosen is None:
            return None
        chosen_set = set(chosen)
        selection = Selection(tuple(kept[i] for i in chosen), current_version, dict(self.dropped))
        self.waiting = [p for i, p in enumerate(kept) if i not in chosen_set]
        self.dropped = Counter()
        return selection


def _first_exact_subset(sizes: Sequence[int], target: int) -> list[int] | None:
    """Indices of the lexicographically first subset of ``sizes`` summing to ``target`` (earliest
    groups first: they are the oldest), or None. Sizes and target are small (rows of a batch)."""
    if target <= 0:
        return None
    # reachable[i]: sums the groups i.. can make (bit s set = sum s), up to target.
    limit = (1 << (target + 1)) - 1
    reachable = [0] * (len(sizes) + 1)
    reachable[len(sizes)] = 1
    for i in range(len(sizes) - 1, -1, -1):
        size = sizes[i]
        reachable[i] = reachable[i + 1] | ((reachable[i + 1] << size) & limit if size > 0 else 0)
    if not (reachable[0] >> target) & 1:
        return None
    chosen, need = [], target
    for i, size in enumerate(sizes):
        if need == 0:
            break
        if size == 0:  # a malformed group that counts for no row: the conversion drops it, counted
            chosen.append(i)
        elif size <= need and (reachable[i + 1] >> (need - size)) & 1:
            chosen.append(i)
            need -= size
    return chosen


def fill_unmatched(tensors: Any, old_log_probs_BT: torch.Tensor) -> int:
    """Give the rows without a record (kept unmatched samples) their own recomputed log-probs as
    ``rollout_log_probs``: verl's importance weight exp(old - rollout) is then exactly 1 for them.
    ``tensors`` is the batch's TensorDict; returns the rows filled."""
    if BEHAVIOR_MATCHED not in tensors.keys() or "rollout_log_probs" not in tensors.keys():
        return 0
    unmatched_B = ~tensors[BEHAVIOR_MATCHED].bool()
    if not bool(unmatched_B.any()):
        return 0
    rollout_BT = tensors["rollout_log_probs"]
    rollout_BT[unmatched_B] = old_log_probs_BT[unmatched_B].to(rollout_BT.dtype)
    return int(unmatched_B.sum())


def check_rollout_correction(rollout_correction: Any, unmatched_samples: str) -> None:
    """verl's bypass mode trains against ``rollout_log_probs`` as the old policy and computes no
    old_log_probs, so a kept unmatched sample would have none: refuse that pairing at start."""
    bypass = bool(rollout_correction.get("bypass_mode", False)) if rollout_correction is not None else False
    if bypass and unmatched_samples == "keep":
        raise ValueError(
            "algorithm.rollout_correction.bypass_mode=true uses the policy gateway's recorded log-probs as the old "
            "policy, and a sample the gateway never generated has none: set trainer.atropos.unmatched_samples=drop "
            "(its groups are dropped and counted), or bypass_mode=false (unmatched samples then train with "
            "importance weight 1)"
        )
