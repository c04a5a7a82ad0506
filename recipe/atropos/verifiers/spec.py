"""`VerifiersEnvSpec`: an entry `type: verifiers` of `trainer.atropos.environments`.

    trainer.atropos.environments:
      arith:
        type: verifiers
        env: my_envs.arith:make_env      # or an installed environment package's id, e.g. gsm8k-v1
        env_args: {difficulty: 2}        # callable: its keyword arguments; id: the EnvConfig's fields
        group_size: 4                    # = actor_rollout_ref.rollout.n
        concurrency: 8
        max_tokens: 64                   # per policy turn
        sampling_args: {top_k: 20}       # more sampling keys, passed to the policy as they are

The fields every episode kind has (group size, concurrency, weight, timeouts, credit, sampling) are the
core's (recipe/atropos/episodes/spec.py).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from recipe.atropos.episodes.spec import EpisodeEnvSpec

__all__ = ["VerifiersEnvSpec"]


class VerifiersEnvSpec(EpisodeEnvSpec):
    type: Literal["verifiers"] = "verifiers"
    env: str = Field(min_length=1, description=(
        "the verifiers environment: `package.module:callable` returning a vf.Env, or the id of an installed "
        "environment (taskset) package"))
    env_args: dict[str, Any] = Field(default_factory=dict, description=(
        "for a callable: its keyword arguments; for an id: fields of the environment's EnvConfig "
        "(e.g. {taskset: {...}, max_concurrent_agents: 1})"))
    sampling_args: dict[str, Any] = Field(default_factory=dict, description=(
        "more sampling keys for every policy call (e.g. {top_k: 20}); max_tokens, temperature and top_p "
        "have their own keys"))
    renderer: dict[str, Any] | None = Field(default=None, description=(
        "the renderers package's RendererConfig for the policy's chat template (e.g. {name: qwen3}); null: "
        "chosen from the tokenizer, the generic chat-template renderer for models it does not know"))

    @field_validator("sampling_args")
    @classmethod
    def _no_shadowed_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        shadowed = sorted({"max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k"} & set(value))
        if shadowed:
            raise ValueError(f"sampling_args sets {shadowed}: set them as the entry's own keys instead")
        return value
