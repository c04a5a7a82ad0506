"""`EpisodeEnvSpec`: the settings every episode-playing entry of `trainer.atropos.environments` has.

    trainer.atropos.environments:
      arith:
        type: verifiers        # the kind: recipe/atropos/<type>/spec.py extends EpisodeEnvSpec
        group_size: 4          # episodes per task; must equal actor_rollout_ref.rollout.n
        concurrency: 8         # episodes in flight at once
        weight: 1.0            # run-api's weight (min_batch_allocation fixes a share of every batch)
        ...                    # the kind's own keys

Each kind's spec is a pydantic model with `extra="forbid"`; `load_spec` turns a validation error into
one message per field naming `trainer.atropos.environments.<name>.<field>`, the value and the fix.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = ["EPISODE_KINDS", "EpisodeEnvSpec", "EpisodeSpecError", "is_episode_entry", "load_spec"]

KEY = "trainer.atropos.environments"
# type -> the pydantic spec of that kind (imported only when an entry names it).
EPISODE_KINDS = {
    "verifiers": "recipe.atropos.verifiers.spec:VerifiersEnvSpec",
    "openenv": "recipe.atropos.openenv.spec:OpenEnvSpec",
}


class EpisodeSpecError(ValueError):
    """An entry that cannot run: the message names the key, the value and the fix."""


class EpisodeEnvSpec(BaseModel):
    """What the episode loop (loop.py) needs, whatever the kind."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str = Field(description="the kind: verifiers or openenv")
    group_size: int = Field(default=4, ge=1, description="episodes per task; equal to actor_rollout_ref.rollout.n")
    concurrency: int = Field(default=8, ge=1, description="episodes in flight at once")
    weight: float = Field(default=1.0, gt=0, description=(
        "run-api's weight, sent at registration (atroposlib environments scale their inference use by "
        "it; a runner plays `concurrency` episodes whatever it is): fix shares with min_batch_allocation"))
    min_batch_allocation: float | None = Field(default=None, ge=0, le=1,
                                               description="least fraction of every batch from this entry")
    max_batches_offpolicy: int = Field(
        default=2, ge=0, description="start no new group while run-api holds this many of the trainer's batches "
                                     "(atroposlib's environments: 3), so groups are not trained on stale weights, "
                                     "unless fewer than its min_batch_allocation of them are its own; 0: no bound")
    episode_timeout_s: float = Field(default=600.0, gt=0, description="an episode past it is lost (counted)")
    max_attempts_factor: int = Field(default=2, ge=1, description="a group gets group_size x this many tries")
    credit: Literal["outcome", "process"] = Field(
        default="outcome", description="GRPO credit when episodes carry none: outcome (the reward) or process (per step)")
    norm_adv_by_std: bool = Field(default=True, description="divide by the group's std (GRPO); false: Dr. GRPO")
    max_tokens: int = Field(default=256, ge=1, description="most tokens per policy turn")
    temperature: float = Field(default=1.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=-1)
    max_token_length: int = Field(default=4096, ge=1, description="most tokens of an episode (run-api registration)")
    max_groups: int | None = Field(default=None, ge=1, description="stop after pushing this many groups (null: run on)")
    seed: int = Field(default=0, description="the order tasks are played in")


def is_episode_entry(entry: Any) -> bool:
    """An entry played by a runner process (it names an episode kind as `type`)."""
    return isinstance(entry, Mapping) and entry.get("type") in EPISODE_KINDS


def spec_class(kind: str) -> type[EpisodeEnvSpec]:
    if kind not in EPISODE_KINDS:
        raise EpisodeSpecError(f"type {kind!r} is not an episode kind; use one of {sorted(EPISODE_KINDS)}")
    module, name = EPISODE_KINDS[kind].split(":")
    return getattr(importlib.import_module(module), name)


def load_spec(name: str, entry: Mapping[str, Any]) -> EpisodeEnvSpec:
    """`entry` checked by its kind's spec; EpisodeSpecError naming each bad field."""
    where = f"{KEY}.{name}"
    if not isinstance(entry, Mapping):
        raise EpisodeSpecError(f"{where}: expected a map with `type: {'|'.join(EPISODE_KINDS)}`, got {entry!r:.200}")
    cls = spec_class(str(entry.get("type")))
    try:
        return cls.model_validate(dict(entry))
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            field = ".".join(str(p) for p in error["loc"])
            value = error.get("input")
            hint = cls.model_fields[error["loc"][0]].description if error["loc"] and error["loc"][0] in cls.model_fields else None
            fix = f"; {error['loc'][0]}: {hint}" if hint else (
                f"; known keys: {sorted(cls.model_fields)}" if error["type"] == "extra_forbidden" else "")
            lines.append(f"{where}.{field}: {error['msg']}, got {value!r:.200}{fix}")
        raise EpisodeSpecError("\n".join(lines)) from None
