"""What a launch plan is made of: the processes to start, the registrations to make, the trainer's
policy endpoint to wait for, and the plan that orders them (built by :mod:`.plan`)."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from recipe.atropos.launcher.config import LauncherConfig

__all__ = ["LaunchPlan", "PolicyEndpoint", "Registration", "ServiceSpec", "connect_host"]

_WILDCARD_HOSTS = {"", "0.0.0.0", "::"}


@dataclass(frozen=True)
class ServiceSpec:
    """One process to start. ``health_url`` None: nothing to wait for (the trainer)."""

    name: str
    role: str  # "environment", "inference", "trainer", "trajectory_api" or "atropos_env"
    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)  # added to the launcher's environment
    host: str | None = None
    port: int | None = None
    health_url: str | None = None
    start_timeout_s: float = 0.0
    config_key: str = ""  # where it is configured, for error messages
    cwd: str | None = None  # working directory; None: the plan's workdir
    secrets: tuple[str, ...] = ()  # values never printed (dry run, log headers): shown as ***

    def shown(self, text: str) -> str:
        """``text`` with this service's secrets replaced by ``***`` (a secret shorter than 4
        characters only as a whole word: masking every 'x' would garble the line)."""
        for secret in sorted(self.secrets, key=len, reverse=True):
            if text == secret:
                return "***"
            if len(secret) >= 4:
                text = text.replace(secret, "***")
        return text

    def shown_argv(self) -> str:
        """The command as a shell line, secrets masked (log headers, the dry run)."""
        return shlex.join(self.shown(word) for word in self.argv)

    @property
    def base_url(self) -> str | None:
        """``http://host:port`` that clients on this machine use (a wildcard bind becomes loopback)."""
        if self.port is None or self.host is None:
            return None
        return f"http://{connect_host(self.host)}:{self.port}"


@dataclass(frozen=True)
class Registration:
    """One ``POST /register_inference_endpoint`` made after the workers are healthy."""

    worker: str
    base_url: str
    model: str
    api_key: str | None = None


@dataclass(frozen=True)
class PolicyEndpoint:
    """Trajectory mode: the trainer's policy endpoint, waited for before the environments start."""

    base_url: str  # what environments get as {policy_base_url} (usually ends in /v1)
    health_url: str  # GET {base_url without /v1}{health_path}
    host: str
    port: int | None
    start_timeout_s: float
    model: str
    tokenizer: str


@dataclass(frozen=True)
class LaunchPlan:
    """Everything a launch does, in order.

    evaluate mode: environment service(s), inference workers, registrations, trainer.
    trajectory mode: run-api, trainer, (the trainer's policy endpoint answers) environments.
    """

    config: LauncherConfig
    config_file: Path
    run_dir: Path
    workdir: Path
    environment: ServiceSpec | None
    inference: tuple[ServiceSpec, ...]
    registrations: tuple[Registration, ...]
    trainer: ServiceSpec
    env_api_key: str | None
    base_env: dict[str, str]
    mode: str = "evaluate"
    trajectory_api: ServiceSpec | None = None
    policy: PolicyEndpoint | None = None
    environments: tuple[ServiceSpec, ...] = ()
    # Evaluate mode: launcher.environment_services, after `environment`.
    environment_services: tuple[ServiceSpec, ...] = ()

    @property
    def services(self) -> tuple[ServiceSpec, ...]:
        """In start order."""
        if self.mode == "trajectory":
            return (*([self.trajectory_api] if self.trajectory_api else []), self.trainer, *self.environments)
        return (
            *([self.environment] if self.environment else []), *self.environment_services, *self.inference, self.trainer
        )

    def child_env(self, spec: ServiceSpec) -> dict[str, str]:
        """The full environment of ``spec``'s process."""
        return {**self.base_env, **spec.env}


def connect_host(host: str) -> str:
    """Address to reach a server bound to ``host`` from this machine (wildcards: loopback)."""
    if host in _WILDCARD_HOSTS:
        return "127.0.0.1"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
