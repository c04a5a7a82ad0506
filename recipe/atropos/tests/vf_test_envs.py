"""The verifiers environments the tests train on (verifiers 0.4.0, `verifiers.v1`), each a factory the
runner loads as `recipe.atropos.tests.vf_test_envs:<name>`:

- `single_turn`: a `SingleAgentEnv` over a small taskset whose task scores with `@vf.reward`: the share
  of digits in the answer (an untrained tiny model earns some, so groups differ); `single_turn_in`, the
  same with its agent's config fields given.
- `multi_turn`: three policy turns, the environment's text between them (`FEEDBACK`, a user turn).
- `own_credit`: single-turn, and the environment assigns its own per-token advantages in `finalize`
  (`ramp`): the trainer must use exactly these.
- `single_turn` and `own_credit` take `record_to`: a JSON-lines file each finished episode is appended to;
  `own_credit(even_tasks_only=True)` credits only the even tasks itself, GRPO the others.
- `faulty`: some episodes raise in the environment, some hang, the others play normally.
"""

from __future__ import annotations

import asyncio
import json

import verifiers.v1 as vf

from recipe.atropos.verifiers.plugins import register

__all__ = ["FEEDBACK", "ramp", "single_turn", "single_turn_in", "multi_turn", "own_credit", "faulty", "digit_share"]

FEEDBACK = "Now write more digits."


def digit_share(text: str) -> float:
    characters = [c for c in text if not c.isspace()]
    return sum(c.isdigit() for c in characters) / len(characters) if characters else 0.0


def ramp(num_sampled: int) -> list[float]:
    """The advantages `own_credit` gives the sampled tokens of an episode, in order."""
    return [0.25 - 0.01 * j for j in range(num_sampled)]


class DigitsTask(vf.Task[vf.TaskData, vf.State, vf.TaskConfig]):
    @vf.reward
    async def digits(self, trace) -> float:
        replies = [m.content or "" for m in trace.assistant_messages]
        return digit_share(" ".join(replies))


class DigitsTaskset(vf.Taskset[DigitsTask, vf.TasksetConfig]):
    def load(self):
        for i in range(8):
            yield DigitsTask(vf.TaskData(id=f"count-{i}", prompt=f"Count from {i}:"), self.config.task)


class MultiTurnConfig(vf.EnvConfig):
    player: vf.AgentConfig = vf.AgentConfig()


class MultiTurnEnv(vf.Env[MultiTurnConfig]):
    """The policy answers, the environment answers back (FEEDBACK), three policy turns in all."""

    async def run(self, task, agents):
        async with agents.player.interaction(task) as interaction:
            segment = await interaction.turn()
            for _ in range(2):
                if segment.terminated:
                    break
                segment = await interaction.turn(FEEDBACK)


class RecordingEnv(vf.SingleAgentEnv):
    """A single-turn environment that appends each finished episode to `record_to` (JSON lines: the
    sampled token ids, the reward, the advantages of the sampled tokens or null), for the end-to-end
    test to compare with what the trainer trained on."""

    record_to: str | None = None

    def record(self, episode) -> None:
        if self.record_to is None:
            return
        with open(self.record_to, "a") as out:
            for trace in episode.traces:
                for branch in trace.branches:
                    mask, advantages = branch.sampled_mask, branch.advantages
                    out.write(json.dumps({
                        "sampled": [t for t, m in zip(branch.token_ids, mask) if m], "reward": trace.reward,
                        "advantages": None if advantages is None else [a for a, m in zip(advantages, mask) if m],
                    }) + "\n")

    async def finalize(self, task, episode):
        self.record(episode)


class OwnCreditEnv(RecordingEnv):
    """Assigns `ramp` to the sampled tokens of every episode, or with `even_tasks_only` of the episodes of
    tasks count-0, count-2, ... (the others are credited by GRPO over their rewards)."""

    even_tasks_only = False

    async def finalize(self, task, episode):
        if not self.even_tasks_only or int(task.data.id.rsplit("-", 1)[1]) % 2 == 0:
            for trace in episode.traces:
                for node in trace.nodes:
                    sampled = sum(node.mask)
                    if sampled:
                        node.advantages = ramp(sampled)
        self.record(episode)


class FaultyEnv(vf.SingleAgentEnv):
    """Episode n (counted from 0 as they start) raises when n % 4 == 1 and hangs when n % 8 == 3: any 8
    episodes in a row hold 3 failures, so every group of 4 still fills within its 8 tries."""

    started = 0

    async def run(self, task, agents):
        n, self.started = self.started, self.started + 1
        if n % 4 == 1:
            raise RuntimeError(f"episode {n} of task {task.data.id} exploded on purpose")
        if n % 8 == 3:
            await asyncio.sleep(3600)
        await super().run(task, agents)


TASKSET_ID = register("taskset", DigitsTaskset, "verl_test_digits")


def _config(cls: type[vf.EnvConfig] = vf.SingleAgentEnvConfig) -> vf.EnvConfig:
    return cls(taskset={"id": TASKSET_ID})


def _recording(cls: type[RecordingEnv], record_to: str | None) -> vf.Env:
    env = cls(_config())
    env.record_to = record_to
    return env


def single_turn(record_to: str | None = None) -> vf.Env:
    return _recording(RecordingEnv, record_to)


def single_turn_in(**agent) -> vf.Env:
    """`single_turn` with its agent's config fields set (runtime, harness, client, ...)."""
    return vf.SingleAgentEnv(vf.SingleAgentEnvConfig(taskset={"id": TASKSET_ID}, agent=vf.AgentConfig(**agent)))


def multi_turn() -> vf.Env:
    return MultiTurnEnv(_config(MultiTurnConfig))


def own_credit(record_to: str | None = None, even_tasks_only: bool = False) -> vf.Env:
    env = _recording(OwnCreditEnv, record_to)
    env.even_tasks_only = even_tasks_only
    return env


def faulty() -> vf.Env:
    return FaultyEnv(_config())
