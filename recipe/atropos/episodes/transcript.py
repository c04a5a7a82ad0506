"""`Transcript`: one episode's token sequence as it is played, turn by turn.

Every token is appended once, as it came: the prompt and what the environment adds (observations,
tool results, user turns) as ids rendered by the policy's tokenizer, the policy's answers as the ids
it sampled. The next turn's input is `token_ids` itself, so no earlier token is ever re-tokenized.
"""

from __future__ import annotations

from collections.abc import Sequence

from recipe.atropos.episodes.types import Completion, Episode

__all__ = ["Transcript"]


class Transcript:
    """Builder of an :class:`Episode` (not thread-safe: one per episode)."""

    def __init__(self, prompt_ids: Sequence[int]):
        if not prompt_ids:
            raise ValueError("an episode starts with a non-empty prompt")
        self._ids: list[int] = [int(t) for t in prompt_ids]
        self._sampled: list[bool] = [False] * len(self._ids)
        self._logprobs: list[float] = [0.0] * len(self._ids)
        self._step_rewards: list[float] = []
        self._step_ends: list[int] = []
        self.num_turns = 0

    @property
    def token_ids(self) -> list[int]:
        """The exact tokens so far (a copy): the next token-in request's prompt."""
        return list(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def add_environment(self, token_ids: Sequence[int]) -> None:
        """Tokens the environment added (mask 0)."""
        self._ids.extend(int(t) for t in token_ids)
        self._sampled.extend([False] * len(token_ids))
        self._logprobs.extend([0.0] * len(token_ids))

    def add_completion(self, completion: Completion) -> None:
        """The policy's answer (mask 1), with its behaviour log-probs."""
        self._ids.extend(completion.token_ids)
        self._sampled.extend([True] * len(completion.token_ids))
        self._logprobs.extend(float(lp) for lp in completion.logprobs)
        self.num_turns += 1

    def end_step(self, reward: float) -> None:
        """The step that ends with the last sampled token so far earned `reward` (process credit)."""
        if True not in self._sampled:
            raise ValueError("a step ends at a sampled token; the policy has not answered yet")
        last = len(self._sampled) - 1 - self._sampled[::-1].index(True)
        self._step_rewards.append(float(reward))
        self._step_ends.append(last)

    def episode(self, task_id: str, reward: float | None = None,
                advantages: Sequence[float] | None = None) -> Episode:
        """The finished episode; `reward` defaults to the sum of the step rewards."""
        total = sum(self._step_rewards) if reward is None else float(reward)
        return Episode(
            task_id=str(task_id),
            token_ids=tuple(self._ids),
            sampled_mask=tuple(self._sampled),
            logprobs=tuple(self._logprobs),
            reward=total,
            step_rewards=tuple(self._step_rewards),
            step_ends=tuple(self._step_ends),
            advantages=None if advantages is None else tuple(float(a) for a in advantages),
            num_turns=self.num_turns,
        )
