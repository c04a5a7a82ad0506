"""A verifiers environment over verl-format arithmetic word problems: the CPU demo's
(`config/verifiers_trajectory_cpu.yaml`, `env: recipe.atropos.verifiers.examples.arithmetic:make_env`).

One task per parquet row (verl's RL format, as `python -m recipe.atropos.demo.tiny_assets` writes it:
the user message in `prompt`, the answer in `reward_model.ground_truth`). The task's `@vf.reward`
gives 1.0 when the number after the answer's last `####` is the ground truth, else 0.0: GSM8K's
format, which the tiny model writes about half the time before training.

    python -c "from recipe.atropos.verifiers.examples.arithmetic import make_env; print(make_env('data.parquet'))"
"""

from __future__ import annotations

import re

import verifiers.v1 as vf

from recipe.atropos.verifiers.plugins import register

__all__ = ["ArithmeticTaskset", "final_answer", "make_env"]

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def final_answer(text: str) -> str | None:
    """The first number after the last `####`, or None."""
    _, marker, after = text.rpartition("####")
    match = _NUMBER.search(after) if marker else None
    return match.group(0) if match else None


class ArithmeticData(vf.TaskData):
    answer: str


class ArithmeticTask(vf.Task[ArithmeticData, vf.State, vf.TaskConfig]):
    @vf.reward
    async def correct(self, task, trace) -> float:
        return float(final_answer(trace.last_reply or "") == task.answer)


class ArithmeticTasksetConfig(vf.TasksetConfig):
    data_path: str = ""
    """A parquet file in verl's RL format."""


class ArithmeticTaskset(vf.Taskset[ArithmeticTask, ArithmeticTasksetConfig]):
    def load(self):
        import pandas as pd

        if not self.config.data_path:
            raise ValueError("the arithmetic taskset needs data_path (a parquet file in verl's RL format)")
        for index, row in pd.read_parquet(self.config.data_path).iterrows():
            prompt = row["prompt"][0]["content"]
            answer = str(row["reward_model"]["ground_truth"])
            yield ArithmeticTask(ArithmeticData(id=f"row-{index}", prompt=prompt, answer=answer), self.config.task)


TASKSET_ID = register("taskset", ArithmeticTaskset, "verl_example_arithmetic")


def make_env(data_path: str) -> vf.Env:
    """A single-agent environment over the problems in `data_path`."""
    return vf.SingleAgentEnv(vf.SingleAgentEnvConfig(taskset={"id": TASKSET_ID, "data_path": data_path}))
