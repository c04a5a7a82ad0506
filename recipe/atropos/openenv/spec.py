"""`OpenEnvSpec`: an entry `type: openenv` of `trainer.atropos.environments` (trajectory mode).

    trainer.atropos.environments:
      guess:
        type: openenv
        url: http://127.0.0.1:8010           # a running OpenEnv server, or:
        command: ["{openenv_python}", -m, uvicorn, my_env.server:app, --host, "{host}", --port, "{port}"]
        group_size: 4
        concurrency: 16
        max_turns: 8
        prompt_template: "{prompt}"           # or prompt_function: my_module:render
        action_function: my_module:to_action  # default: the schema's one required string field
        parse_penalty: -1.0
        credit: process                       # per-step rewards (default); outcome: their sum

The core's settings (group_size, concurrency, weight, episode_timeout_s, credit, max_tokens, ...) are
recipe/atropos/episodes/spec.py's; docs/openenv.md explains each key.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from recipe.atropos.episodes.spec import EpisodeEnvSpec

__all__ = ["OpenEnvSpec"]

_CALLABLE = r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$"


class OpenEnvSpec(EpisodeEnvSpec):
    """How to reach one OpenEnv server and play its episodes."""

    type: Literal["openenv"] = Field(default="openenv", description="openenv")
    url: str | None = Field(default=None, description="http://host:port of a running OpenEnv server (or set command)")
    command: list[str] | None = Field(
        default=None, description="argv that serves the environment on {host}:{port} ({openenv_python}: the repo's "
                                  ".venv-openenv python); the driver starts it, restarts it when it exits and stops "
                                  "it at the end (or set url)")
    command_env: dict[str, str] = Field(default_factory=dict, description="environment variables added for command")
    command_cwd: str | None = Field(default=None, description="working directory of command (default: the driver's)")
    startup_timeout_s: float = Field(default=120.0, gt=0, description="how long the server may take to answer /health")
    system_prompt: str | None = Field(default=None, description="a system message ahead of the first observation")
    prompt_template: str | None = Field(
        default=None, description="the user message of each observation: Python format fields over the observation's "
                                  "fields and {turn} (default: its non-empty text fields, one per paragraph)")
    prompt_function: str | None = Field(
        default=None, pattern=_CALLABLE,
        description="module:callable(observation: dict, turn: int) -> str or a chat message dict, instead of prompt_template")
    action_field: str | None = Field(
        default=None, description="the action field that gets the answer's text (default: the one required string field "
                                  "of the action schema the server publishes at /schema)")
    action_function: str | None = Field(
        default=None, pattern=_CALLABLE,
        description="module:callable(text: str, observation: dict) -> action dict; raising means the answer cannot be "
                    "played (parse_penalty), instead of action_field")
    reset_kwargs: dict[str, Any] = Field(default_factory=dict, description="sent with every reset, besides its seed")
    max_turns: int = Field(default=8, ge=1, description="policy turns per episode; the driver stops there (servers "
                                                         "accept steps past done)")
    step_timeout_s: float = Field(default=60.0, gt=0, description="a reset or step unanswered this long loses the episode")
    parse_penalty: float = Field(default=0.0, description="the step reward of an answer that cannot be played (no "
                                                          "action parsed, or VALIDATION_ERROR); the episode ends there")
    reconnect_max_wait_s: float = Field(default=600.0, gt=0,
                                        description="how long an episode waits for an unreachable or full server")
    credit: Literal["outcome", "process"] = Field(
        default="process", description="process: each step's reward credits the tokens up to that step's action "
                                       "(GRPO process supervision); outcome: the sum of the rewards, on every token")

    @model_validator(mode="after")
    def _one_of_each(self) -> OpenEnvSpec:
        if (self.url is None) == (self.command is None):
            raise ValueError("set exactly one of url (a running server) and command (one the driver starts)")
        if self.command is not None and "{port}" not in " ".join(self.command):
            raise ValueError("command must contain {port} (the driver picks a free loopback port for the server)")
        if self.prompt_template is not None and self.prompt_function is not None:
            raise ValueError("set prompt_template or prompt_function, not both")
        if self.action_field is not None and self.action_function is not None:
            raise ValueError("set action_field or action_function, not both")
        return self
