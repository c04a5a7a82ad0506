"""The types that cross the episode core's borders (frozen, documented fields)."""

from __future__ import annotations

import dataclasses
import math

__all__ = ["FAILURE_KINDS", "Completion", "Episode", "EpisodeFailed"]

# Why an episode was lost: the environment raised (error), ran past its time budget (timeout), gave no
# trace to train on (no_trace), or its server failed (server: down, closed, errored). The policy's own
# mistakes (an unparseable action) are not failures: they end the episode with a penalty reward.
FAILURE_KINDS = ("error", "timeout", "no_trace", "server")


@dataclasses.dataclass(frozen=True)
class Completion:
    """One answer of the policy to a token-in request.

    token_ids: the sampled tokens, exactly as the policy sampled them (a stop token included).
    logprobs: the behaviour log-prob of each sampled token (same length).
    finish_reason: "stop" or "length".
    """

    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    finish_reason: str = "stop"

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(f"a completion has {len(self.token_ids)} tokens but {len(self.logprobs)} log-probs")


@dataclasses.dataclass(frozen=True)
class Episode:
    """One finished episode, as trained.

    task_id: the task it played (a group is episodes of one task).
    token_ids: the whole sequence: prompt, then every turn (sampled and environment tokens), in order.
    sampled_mask: True on the tokens the policy sampled (trained, mask 1); False on the prompt and the
        tokens the environment added (tool results, observations, user turns: mask 0).
    logprobs: the behaviour log-prob of each sampled token; 0.0 on the others.
    reward: the episode's outcome reward (GRPO outcome credit normalizes it over the group).
    step_rewards / step_ends: the reward of each step and the index in `token_ids` of that step's last
        sampled token (non-decreasing), for GRPO process supervision; empty when the episode has none.
    advantages: per token of `token_ids`, the credit the environment assigned itself (trained
        unchanged); None when it assigned none.
    num_turns: policy turns played.
    """

    task_id: str
    token_ids: tuple[int, ...]
    sampled_mask: tuple[bool, ...]
    logprobs: tuple[float, ...]
    reward: float
    step_rewards: tuple[float, ...] = ()
    step_ends: tuple[int, ...] = ()
    advantages: tuple[float, ...] | None = None
    num_turns: int = 1

    def __post_init__(self) -> None:
        n = len(self.token_ids)
        if len(self.sampled_mask) != n or len(self.logprobs) != n:
            raise ValueError(f"episode {self.task_id!r}: token_ids ({n}), sampled_mask ({len(self.sampled_mask)}) "
                             f"and logprobs ({len(self.logprobs)}) must have one entry per token")
        if self.advantages is not None and len(self.advantages) != n:
            raise ValueError(f"episode {self.task_id!r}: {len(self.advantages)} advantages for {n} tokens")
        if not any(self.sampled_mask):
            raise ValueError(f"episode {self.task_id!r}: no token sampled by the policy, nothing to train")
        if self.sampled_mask[0]:
            raise ValueError(f"episode {self.task_id!r}: starts with a sampled token; the prompt comes first")
        if not math.isfinite(self.reward):
            raise ValueError(f"episode {self.task_id!r}: reward {self.reward!r} is not finite")
        if len(self.step_rewards) != len(self.step_ends):
            raise ValueError(f"episode {self.task_id!r}: {len(self.step_rewards)} step rewards, {len(self.step_ends)} step ends")
        if any(not self.sampled_mask[e] for e in self.step_ends if 0 <= e < n) or any(e < 0 or e >= n for e in self.step_ends):
            raise ValueError(f"episode {self.task_id!r}: step ends {list(self.step_ends)} must index sampled tokens")

    @property
    def prompt_length(self) -> int:
        """Tokens before the first sampled one."""
        return self.sampled_mask.index(True)

    @property
    def num_sampled(self) -> int:
        return sum(self.sampled_mask)


class EpisodeFailed(Exception):
    """An episode that produced nothing to train: `kind` is one of FAILURE_KINDS. Raised by a kind's
    `play`; the episode loop counts it by kind and logs it with the task id."""

    def __init__(self, kind: str, message: str) -> None:
        if kind not in FAILURE_KINDS:
            raise ValueError(f"failure kind {kind!r} is not one of {FAILURE_KINDS}")
        super().__init__(message)
        self.kind = kind
