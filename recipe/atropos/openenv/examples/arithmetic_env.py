"""A single-step OpenEnv environment: `reset` gives an arithmetic word problem, one `step` scores the answer.

The CPU demo's environment (config/openenv_trajectory_cpu.yaml), written with OpenEnv's own server
API and served from `.venv-openenv` (PYTHONPATH=<repo root>):

    .venv-openenv/bin/python -m uvicorn recipe.atropos.openenv.examples.arithmetic_env:app --host 127.0.0.1 --port 8010

`reset(seed=s)` poses `make_problem(Random(s))`, the problems the tiny demo model was warmed up on
(recipe/atropos/demo/tiny_assets.py), with GSM8K's instruction. `step(answer=...)` earns 1.0 when the
number after the answer's last `####` equals the problem's answer, else 0.0, and ends the episode.
OPENENV_MAX_SESSIONS (default 64) caps the concurrent WebSocket sessions.
"""

from __future__ import annotations

import os
import random
import re
from typing import Any, Optional
from uuid import uuid4

from openenv.core.env_server.http_server import create_app
from openenv.core.env_server.interfaces import Environment
from openenv.core.env_server.types import Action, ConcurrencyConfig, Observation, State
from pydantic import Field

from recipe.atropos.demo.tiny_assets import INSTRUCTION, make_problem

_FINAL_ANSWER = re.compile(r"####\s*(-?\d+)")


class ArithmeticAction(Action):
    answer: str = Field(..., description="the solution, ending with '#### <number>'")


class ArithmeticObservation(Observation):
    question: str = Field(default="", description="the problem to solve")
    feedback: str = Field(default="", description="after the step: whether the answer was right")


class ArithmeticState(State):
    answer: str = Field(default="", description="the problem's answer")


def final_answer(text: str) -> str | None:
    """The number after the last `####`, or None."""
    found = _FINAL_ANSWER.findall(text)
    return found[-1] if found else None


class ArithmeticEnvironment(Environment[ArithmeticAction, ArithmeticObservation, ArithmeticState]):
    SUPPORTS_CONCURRENT_SESSIONS = True  # each session has its own instance and nothing shared

    def __init__(self) -> None:
        super().__init__()
        self._state = ArithmeticState(episode_id=str(uuid4()))

    def reset(self, seed: Optional[int] = None, episode_id: Optional[str] = None, **kwargs: Any) -> ArithmeticObservation:
        problem = make_problem(random.Random(seed))
        self._state = ArithmeticState(episode_id=episode_id or str(uuid4()), answer=problem.answer)
        return ArithmeticObservation(question=f"{problem.question} {INSTRUCTION}")

    def step(self, action: ArithmeticAction, timeout_s: Optional[float] = None, **kwargs: Any) -> ArithmeticObservation:
        self._state.step_count += 1
        correct = final_answer(action.answer) == self._state.answer
        return ArithmeticObservation(feedback="correct" if correct else f"wrong: the answer is {self._state.answer}",
                                     reward=1.0 if correct else 0.0, done=True)

    @property
    def state(self) -> ArithmeticState:
        return self._state


app = create_app(
    ArithmeticEnvironment, ArithmeticAction, ArithmeticObservation, env_name="arithmetic", state_cls=ArithmeticState,
    concurrency_config=ConcurrencyConfig(max_concurrent_envs=int(os.environ.get("OPENENV_MAX_SESSIONS", "64")),
                                         session_timeout=None),
)
