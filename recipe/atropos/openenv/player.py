"""`EpisodePlayer`: one OpenEnv episode, turn by turn, as exact tokens.

    reset(seed) -> observation
    repeat up to max_turns:
        observation -> chat message -> its tokens (mask 0) after the episode's tokens so far
        the episode's tokens -> the policy gateway's token-in endpoint -> the answer's tokens (mask 1)
        answer text -> action -> step -> reward (ends this step, for process credit), done?

What ends an episode, and how it counts (the entry's episode_stats, with the group it lands in):
- `done`, or the turn limit (`turn_limit`), or the token budget (`length_limit`): trained as played;
- an answer that cannot be played: no action parsed (`parse_failures`) or the server's
  VALIDATION_ERROR (`action_rejected`): the policy's mistake, trained with `parse_penalty` as that
  step's reward;
- the server answering an error (EXECUTION_ERROR, ...), closing the connection, or staying silent past
  `step_timeout_s`: the episode is lost (EpisodeFailed: the core's loop counts it under
  failures/server or failures/timeout, logs it with the server's message and plays another).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from recipe.atropos.episodes.policy import TokenPolicyClient
from recipe.atropos.episodes.loop import EpisodeStats
from recipe.atropos.episodes.transcript import Transcript
from recipe.atropos.episodes.types import Completion, Episode, EpisodeFailed
from recipe.atropos.openenv.actions import ActionMapper
from recipe.atropos.openenv.link import ServerLink
from recipe.atropos.openenv.rendering import ChatRenderer
from recipe.atropos.openenv.session import ActionRejected, OpenEnvError, OpenEnvSession, ServerClosed, StepResult
from recipe.atropos.openenv.spec import OpenEnvSpec

__all__ = ["EpisodePlayer", "Task"]

logger = logging.getLogger("verl.recipe.atropos.openenv")


@dataclasses.dataclass(frozen=True)
class Task:
    """One task: the seed its episodes reset with (a group plays one seed)."""

    seed: int

    @property
    def task_id(self) -> str:
        return f"seed-{self.seed}"


class EpisodePlayer:
    """Plays episodes of one entry; `play` is the core loop's `play(task, attempt)`."""

    def __init__(self, spec: OpenEnvSpec, link: ServerLink, policy: TokenPolicyClient, renderer: ChatRenderer,
                 prompt: Callable[[dict[str, Any], int], dict[str, Any]], to_action: ActionMapper, stats: EpisodeStats):
        self.spec = spec
        self.link = link
        self.policy = policy
        self.renderer = renderer
        self.prompt = prompt
        self.to_action = to_action
        self.stats = stats

    async def play(self, task: Task, attempt: int) -> Episode:
        try:
            session, first = await self.link.start_episode({**self.spec.reset_kwargs, "seed": task.seed})
        except (OSError, ServerClosed, OpenEnvError, asyncio.TimeoutError) as exc:
            raise EpisodeFailed("server", f"no session with {self.link.url} after "
                                          f"{self.spec.reconnect_max_wait_s:g} s of retries: {exc}") from exc
        ok = False
        try:
            episode = await self._turns(task, session, first)
            ok = True
            return episode
        finally:  # also on cancellation (the episode's timeout): a cut-short session is never reused
            if ok:
                self.link.release(session)
            else:
                self.link.discard(session)

    async def _turns(self, task: Task, session: OpenEnvSession, result: StepResult) -> Episode:
        spec, transcript, answered = self.spec, None, None
        if result.done:
            raise EpisodeFailed("no_trace", f"the server ended the episode at its reset (seed {task.seed})")
        for turn in range(spec.max_turns):
            message = self.prompt(result.observation, turn)
            if transcript is None:
                transcript = Transcript(self.renderer.first_turn(message))
            else:
                added = self.renderer.next_turn(message, answered)
                if len(transcript) + len(added) >= spec.max_token_length:
                    self.stats.count("length_limit")
                    break
                transcript.add_environment(added)
            budget = spec.max_token_length - len(transcript)
            if budget < 1:
                raise EpisodeFailed("error", f"the first observation takes {len(transcript)} tokens, more than "
                                             f"max_token_length={spec.max_token_length}")
            answered = await self._generate(transcript, min(spec.max_tokens, budget))
            transcript.add_completion(answered)
            result = await self._step(session, transcript, answered, result.observation, turn)
            if result is None or result.done:
                break
        else:
            self.stats.count("turn_limit")
        return transcript.episode(task.task_id)

    async def _generate(self, transcript: Transcript, max_tokens: int) -> Completion:
        spec = self.spec
        answered = await self.policy.generate(transcript.token_ids, max_tokens=max_tokens, temperature=spec.temperature,
                                              top_p=spec.top_p, top_k=spec.top_k,
                                              stop_token_ids=self.renderer.stop_token_ids)
        if not answered.token_ids:
            raise EpisodeFailed("no_trace", "the policy answered no token")
        return answered

    async def _step(self, session: OpenEnvSession, transcript: Transcript, answered: Completion,
                    observation: dict[str, Any], turn: int) -> StepResult | None:
        """Play the answer; the step's reward ends the step. None: the answer could not be played."""
        text = self.renderer.text(answered)
        try:
            action = self.to_action(text, observation)
        except Exception as exc:  # the user's parser says the text is no action: the policy's mistake
            return self._penalize("parse_failures", transcript, f"turn {turn + 1}: no action in {text[:120]!r}: {exc}")
        try:
            result = await session.step(action, timeout_s=self.spec.step_timeout_s)
        except ActionRejected as exc:
            return self._penalize("action_rejected", transcript, f"turn {turn + 1}: the server rejected {action}: "
                                                                 f"{exc.server_message[:300]}")
        except asyncio.TimeoutError:
            raise EpisodeFailed("timeout", f"{self.link.url} did not answer step {turn + 1} within "
                                           f"step_timeout_s={self.spec.step_timeout_s:g} s") from None
        except (OpenEnvError, ServerClosed, OSError) as exc:
            raise EpisodeFailed("server", f"{self.link.url} at step {turn + 1}: {exc}") from exc
        transcript.end_step(0.0 if result.reward is None else result.reward)
        return result

    def _penalize(self, counter: str, transcript: Transcript, why: str) -> None:
        self.stats.count(counter)
        logger.debug("%s: %s", counter, why)
        transcript.end_step(self.spec.parse_penalty)
        return None
