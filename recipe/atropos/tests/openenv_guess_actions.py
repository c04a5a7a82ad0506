"""The guess game's rules without openenv (openenv_guess_env.py serves them): what the driver and the
tests import.

`parse_guess` is an entry's `action_function`: the first whole number of the answer is the guess;
an answer without one cannot be played (the policy's mistake: the entry's parse penalty).
"""

from __future__ import annotations

import random
import re

HIGHEST = 16
_NUMBER = re.compile(r"-?\d+")


def parse_guess(text: str, observation: dict) -> dict:
    found = _NUMBER.search(text)
    if found is None:
        raise ValueError(f"no number in {text[:80]!r}")
    return {"guess": int(found.group())}


def secret_of(seed: int | None) -> int:
    return random.Random(seed).randint(1, HIGHEST)


def step_reward(guess: int, secret: int) -> float:
    return 1.0 if guess == secret else -abs(guess - secret) / HIGHEST


def guess_any(text: str, observation: dict) -> dict:
    """Always a valid guess (from the text's length): every turn is played, so episodes run to the turn
    limit or the right number, whatever the (untrained) test model writes."""
    return {"guess": len(text) % HIGHEST + 1}


def out_of_range(text: str, observation: dict) -> dict:
    """A guess the action schema refuses (the server answers VALIDATION_ERROR)."""
    return {"guess": HIGHEST + 1}
