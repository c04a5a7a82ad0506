"""The tests' multi-turn OpenEnv environment: guess a number from 1 to 16 with higher/lower hints, a
reward at every step. Written with OpenEnv's own server API; served from `.venv-openenv`:

    .venv-openenv/bin/python -m uvicorn recipe.atropos.tests.openenv_guess_env:app --host 127.0.0.1 --port N

- `reset(seed=s)`: the secret is `Random(s).randint(1, 16)` (`secret_of`); the question names the game's seed.
- `step(guess=g)`: the right number earns 1.0 and ends the episode; any other earns
  -|g - secret| / 16 and a hint ("Too high." / "Too low."). The game never ends otherwise: the
  driver's turn limit does. A guess outside 1..16 fails the action's validation (VALIDATION_ERROR).

Faults for the tests, from the environment variable GUESS_FAULTS ("error_every=N,stall_every=M,
stall_s=S", any subset): every Nth step of the server raises (EXECUTION_ERROR), every Mth sleeps S
seconds first (a stall). OPENENV_MAX_SESSIONS (default 64) caps the concurrent sessions.

The driver maps text to a guess with `recipe.atropos.tests.openenv_guess_actions:parse_guess`.
"""

from __future__ import annotations

import itertools
import os
import time
from typing import Any, Optional
from uuid import uuid4

from openenv.core.env_server.http_server import create_app
from openenv.core.env_server.interfaces import Environment
from openenv.core.env_server.types import Action, ConcurrencyConfig, Observation, State
from pydantic import Field

from recipe.atropos.tests.openenv_guess_actions import HIGHEST, secret_of, step_reward

_FAULTS = dict(item.split("=") for item in os.environ.get("GUESS_FAULTS", "").split(",") if item)
_STEPS = itertools.count(1)  # steps taken by this server, all sessions together (for the faults)


class GuessAction(Action):
    guess: int = Field(..., ge=1, le=HIGHEST, description=f"a number from 1 to {HIGHEST}")


class GuessObservation(Observation):
    prompt: str = Field(default="", description="the question, or the hint after a wrong guess")


class GuessState(State):
    secret: int = Field(default=0)


class GuessEnvironment(Environment[GuessAction, GuessObservation, GuessState]):
    SUPPORTS_CONCURRENT_SESSIONS = True

    def __init__(self) -> None:
        super().__init__()
        self._state = GuessState(episode_id=str(uuid4()))

    def reset(self, seed: Optional[int] = None, episode_id: Optional[str] = None, **kwargs: Any) -> GuessObservation:
        self._state = GuessState(episode_id=episode_id or str(uuid4()), secret=secret_of(seed))
        # The seed in the text lets a test recompute every reward from the trained tokens alone.
        return GuessObservation(prompt=f"Game {seed}: I am thinking of a number from 1 to {HIGHEST}. Guess it: "
                                       "answer with one number.")

    def step(self, action: GuessAction, timeout_s: Optional[float] = None, **kwargs: Any) -> GuessObservation:
        n = next(_STEPS)
        if "error_every" in _FAULTS and n % int(_FAULTS["error_every"]) == 0:
            raise RuntimeError(f"injected fault at step {n}")
        if "stall_every" in _FAULTS and n % int(_FAULTS["stall_every"]) == 0:
            time.sleep(float(_FAULTS.get("stall_s", "5")))
        self._state.step_count += 1
        secret = self._state.secret
        if action.guess == secret:
            return GuessObservation(prompt="Correct!", reward=1.0, done=True)
        hint = "Too high." if action.guess > secret else "Too low."
        return GuessObservation(prompt=f"{hint} Guess again.", reward=step_reward(action.guess, secret))

    @property
    def state(self) -> GuessState:
        return self._state


app = create_app(
    GuessEnvironment, GuessAction, GuessObservation, env_name="guess", state_cls=GuessState,
    concurrency_config=ConcurrencyConfig(max_concurrent_envs=int(os.environ.get("OPENENV_MAX_SESSIONS", "64")),
                                         session_timeout=None),
)
