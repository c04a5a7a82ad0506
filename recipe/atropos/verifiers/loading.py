"""The entry's verifiers environment, loaded and made to run on this machine only.

`load_env(name, spec)` imports what `spec.env` names:

- `package.module:callable`: `callable(**env_args)` must return a `vf.Env`;
- an id (no colon): an installed environment package, loaded by verifiers' own loader
  (`vf.resolve_env_config` + `vf.load_environment`) with `env_args` as the EnvConfig's fields.

then `localized` rewrites its config so that nothing reaches outside the machine, or refuses it:

- every agent's runtime: left unset it is verifiers' default, a hosted sandbox: it becomes the local
  subprocess runtime; one set to anything else (docker, prime, modal, e2b, ...) is refused;
- every agent's harness: left unset it is the taskset's or verifiers' `bash`, which install their
  programs from the package registry when a rollout starts: it becomes the in-process chat harness
  (harness.py); one of verifiers' own harnesses set explicitly is refused, for the same reason;
- a model client pinned on an agent, or a judge of the task config, must point at a loopback address
  (the policy gateway, or a local judge server): nothing may call a hosted provider.

Every refusal raises `EpisodeSpecError` naming the entry's key, what was found and the fix.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any
from urllib.parse import urlparse

import verifiers.v1 as vf
from verifiers.v1.configs.agent import agent_config_fields
from verifiers.v1.configs.env import default_agent_harness
from verifiers.v1.utils.loaders import harness_class

from recipe.atropos.episodes.spec import KEY, EpisodeSpecError
from recipe.atropos.verifiers.harness import HARNESS_ID, InProcessChatConfig, InProcessChatHarness
from recipe.atropos.verifiers.spec import VerifiersEnvSpec

__all__ = ["load_env", "localized"]

logger = logging.getLogger("verl.recipe.atropos.verifiers")

_BUILTIN_HARNESSES = "verifiers.v1.harnesses."
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    return host in _LOOPBACK or host.startswith("127.")


def _from_callable(where: str, target: str, env_args: dict[str, Any]) -> vf.Env:
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise EpisodeSpecError(
            f"{where}.env: cannot import {module_name!r} ({type(exc).__name__}: {exc}); fix: make it importable by "
            "the runner (a module of this repo, or a package installed in .venv), or correct the path "
            "(`package.module:callable`)") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise EpisodeSpecError(f"{where}.env: {module_name!r} has no callable {attr!r}; fix: name the function "
                               "that returns the vf.Env (`package.module:callable`)")
    try:
        env = factory(**env_args)
    except TypeError as exc:  # arguments it does not take
        raise EpisodeSpecError(f"{where}.env_args: {target}(**{env_args!r:.200}) failed: {exc}") from exc
    if not isinstance(env, vf.Env):
        raise EpisodeSpecError(f"{where}.env: {target}(**env_args) returned {type(env).__name__}, not a vf.Env")
    return env


def _from_id(where: str, env_id: str, env_args: dict[str, Any]) -> vf.EnvConfig:
    raw = {**env_args, "taskset": {**dict(env_args.get("taskset") or {}), "id": env_id}}
    try:
        return vf.resolve_env_config(raw)
    except ImportError as exc:  # not installed, or installed without what it imports
        raise EpisodeSpecError(
            f"{where}.env: verifiers cannot load the environment {env_id!r} ({exc}); fix: install its package (with "
            "its extras) into the runner's venv before the run (pip install into .venv; nothing is installed while "
            "training), or give `package.module:callable`") from exc
    except ValueError as exc:  # pydantic's ValidationError included
        raise EpisodeSpecError(f"{where}.env_args: not a valid config of {env_id!r}: {exc}") from exc


def _localized_agent(where: str, role: str, agent: vf.AgentConfig, taskset_id: str) -> vf.AgentConfig:
    update: dict[str, Any] = {}
    if "runtime" not in agent.model_fields_set:
        update["runtime"] = vf.SubprocessConfig()
    elif not isinstance(agent.runtime, vf.SubprocessConfig):
        raise EpisodeSpecError(
            f"{where}: agent {role!r} runs in the {agent.runtime.type!r} runtime, which provisions a sandbox or "
            "container outside this process; fix: leave its runtime unset (the runner uses the local subprocess "
            "runtime)")
    harness = agent.harness if agent.harness is not None else default_agent_harness(taskset_id)
    if harness_class(harness.id).__module__.startswith(_BUILTIN_HARNESSES):
        if agent.harness is not None and harness.id != HARNESS_ID:
            raise EpisodeSpecError(
                f"{where}: agent {role!r} uses verifiers' {harness.id!r} harness, which installs its program from the "
                f"package registry when a rollout starts; fix: leave its harness unset (the runner plays the "
                f"in-process chat harness {HARNESS_ID!r}) or give a harness that runs in-process")
        update["harness"] = InProcessChatConfig()
    if agent.client is not None and not _is_loopback(agent.client.base_url):
        raise EpisodeSpecError(
            f"{where}: agent {role!r} pins a model client at {agent.client.base_url}; fix: leave its client unset "
            "(every agent then calls the policy gateway) or point it at a loopback server")
    return agent.model_copy(update=update) if update else agent


def localized(where: str, config: vf.EnvConfig) -> vf.EnvConfig:
    """`config` with local runtimes and in-process harnesses; EpisodeSpecError for what would reach out."""
    for judge in config.taskset.task.judges:
        if not _is_loopback(judge.base_url):
            raise EpisodeSpecError(
                f"{where}: the task config's judge {judge.id!r} calls {judge.base_url}; fix: point its base_url at a "
                "loopback server or drop it")
    agents = {role: _localized_agent(where, role, agent, config.taskset.id)
              for role, agent in agent_config_fields(config).items()}
    return config.model_copy(update=agents)


def _rebuilt(where: str, env: vf.Env, config: vf.EnvConfig) -> vf.Env:
    """`env` built again from `config` (an Env derives its agents and harnesses from its config when
    built), keeping the attributes its factory set after building it."""
    try:
        rebuilt = type(env)(config)
    except TypeError as exc:
        raise EpisodeSpecError(
            f"{where}.env: {type(env).__name__}(config) cannot be built again with local runtimes ({exc}); fix: "
            "give its agents `runtime=vf.SubprocessConfig()` and an in-process harness in the factory") from exc
    for key, value in vars(env).items():
        vars(rebuilt).setdefault(key, value)
    return rebuilt


def load_env(name: str, spec: VerifiersEnvSpec) -> vf.Env:
    """The entry's environment, localized (see the module's docstring)."""
    where = f"{KEY}.{name}"
    if ":" in spec.env:
        env = _from_callable(where, spec.env, dict(spec.env_args))
        config = localized(where, env.config)
        if config != env.config:
            env = _rebuilt(where, env, config)
    else:
        env = vf.load_environment(localized(where, _from_id(where, spec.env, dict(spec.env_args))))
    for role, agent in agent_config_fields(env.config).items():
        harness = agent.harness.id if agent.harness is not None else "?"
        logger.info("%s: agent %r plays with harness %r in the %s runtime", name, role, harness, agent.runtime.type)
    assert InProcessChatHarness  # registered with verifiers on import (harness.py)
    return env
