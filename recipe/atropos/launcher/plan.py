"""One launch, made concrete: every service's command, environment, port and health URL, in order.

The plan is built before anything starts, so that ``--dry-run`` prints exactly what a real launch
would do, and so that every config mistake that can be found without starting a process (ports
that collide, too few GPU ids, a missing model) stops the launch before the first process.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from recipe.atropos.config import API_KEY_ENV, POLICY_API_KEY_ENV, check_gateway_exposure
from recipe.atropos.env_diagnostics import RUN_DIR_ENV
from recipe.atropos.launcher.config import SECRET_KEYS, LauncherConfig, LauncherConfigError, override_key

__all__ = ["LaunchPlan", "PolicyEndpoint", "Registration", "ServiceSpec", "build_plan", "format_plan", "REPO_ROOT"]

# The repo root: its verl/ overlay must come first on every child's sys.path.
REPO_ROOT = Path(__file__).resolve().parents[3]

# Environment variables whose values the plan never prints.
_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD", re.IGNORECASE)
_WILDCARD_HOSTS = {"", "0.0.0.0", "::"}
# What {policy_api_key} becomes when no key is set (vLLM's word for "no key"; a gateway without a
# key ignores what clients send).
NO_POLICY_KEY = "EMPTY"
# A config made for CPU (trainer.device: cpu) runs only on verl's CPU platform (recipe/atropos/cpu):
# without it verl picks CUDA and the run dies in a Ray worker ("Distributed package doesn't have
# NCCL built in"). The launcher gives the trainer these, unless launcher.trainer.env sets them.
CPU_PLATFORM_ENV = {"VERL_PLATFORM": "cpu"}
CPU_MODULE = "recipe.atropos.cpu"
EXTERNAL_MODULES_ENV = "VERL_USE_EXTERNAL_MODULES"
# verl's workers rendezvous through a TCPStore that torch's env:// binds to every interface; this
# scheme binds it to MASTER_ADDR (recipe/atropos/rendezvous.py). A DIST_INIT_METHOD of the user's wins.
RENDEZVOUS_MODULE = "recipe.atropos.rendezvous"
RENDEZVOUS_ENV = "DIST_INIT_METHOD"
RENDEZVOUS_INIT_METHOD = "atropos-env://"
# Where the trainer reads each secret of its own config from when the config leaves it null
# (recipe/atropos/config.py).
_TRAINER_SECRET_ENV = {"trainer.atropos.api_key": API_KEY_ENV, "trainer.atropos.policy_api_key": POLICY_API_KEY_ENV}


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

    evaluate mode: environment service, inference workers, registrations, trainer.
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

    @property
    def services(self) -> tuple[ServiceSpec, ...]:
        """In start order."""
        if self.mode == "trajectory":
            return (*([self.trajectory_api] if self.trajectory_api else []), self.trainer, *self.environments)
        return (*([self.environment] if self.environment else []), *self.inference, self.trainer)

    def child_env(self, spec: ServiceSpec) -> dict[str, str]:
        """The full environment of ``spec``'s process."""
        return {**self.base_env, **spec.env}


def connect_host(host: str) -> str:
    """Address to reach a server bound to ``host`` from this machine (wildcards: loopback)."""
    if host in _WILDCARD_HOSTS:
        return "127.0.0.1"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def build_plan(
    cfg: LauncherConfig,
    config_file: Path,
    overrides: Sequence[str],
    *,
    run_dir: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> LaunchPlan:
    """Turn the launcher section and the command line into concrete commands (starts nothing)."""
    environ = dict(os.environ if environ is None else environ)
    config_file = Path(config_file).resolve()
    workdir = Path(cfg.workdir).resolve() if cfg.workdir else Path.cwd()
    if run_dir is None:
        run_dir = Path(cfg.run_dir) if cfg.run_dir else Path(cfg.log_dir) / time.strftime("%Y%m%d-%H%M%S")
    run_dir = (workdir / run_dir).resolve()
    common = {
        "python": sys.executable,
        "run_dir": str(run_dir),
        "config_dir": str(config_file.parent),
        "config_name": config_file.stem,
    }

    if cfg.mode == "trajectory":
        return _trajectory_plan(cfg, config_file, overrides, run_dir, workdir, common, environ)

    env_cfg = cfg.environment
    api_key = env_cfg.api_key or environ.get("ATROPOS_ENV_API_KEY") or environ.get("ATROPOS_API_KEY") or None
    environment = ServiceSpec(
        name="environment",
        role="environment",
        argv=_expand(env_cfg.command, {**common, "host": env_cfg.host, "port": str(env_cfg.port)}),
        env={**env_cfg.env, **({"ATROPOS_ENV_API_KEY": api_key} if api_key else {})},
        host=env_cfg.host,
        port=env_cfg.port,
        health_url=f"http://{connect_host(env_cfg.host)}:{env_cfg.port}{env_cfg.health_path}",
        start_timeout_s=env_cfg.start_timeout_s,
        config_key="launcher.environment",
    )

    inference, registrations = _inference_services(cfg, common)

    trainer_cfg = cfg.trainer
    trainer_argv = _trainer_argv(cfg, config_file, overrides, common)
    key = trainer_cfg.api_url_override
    if key and not any(override_key(o) == key for o in overrides):
        trainer_argv.append(f"{key}={environment.base_url}")
    trainer_env = {**trainer_cfg.env, **_verl_env(cfg, environ)}
    if api_key and API_KEY_ENV not in environ:
        trainer_env[API_KEY_ENV] = api_key
    trainer_env.update(_trainer_secret_env(cfg))
    trainer = ServiceSpec(
        name="trainer", role="trainer", argv=tuple(trainer_argv), env=trainer_env, config_key="launcher.trainer",
        secrets=_secrets(cfg, api_key),
    )

    _check_ports_distinct((environment, *inference))
    return LaunchPlan(
        config=cfg,
        config_file=config_file,
        run_dir=run_dir,
        workdir=workdir,
        environment=environment,
        inference=inference,
        registrations=registrations,
        trainer=trainer,
        env_api_key=api_key,
        base_env=_base_env(environ),
    )


def _trajectory_plan(
    cfg: LauncherConfig,
    config_file: Path,
    overrides: Sequence[str],
    run_dir: Path,
    workdir: Path,
    common: Mapping[str, str],
    environ: Mapping[str, str],
) -> LaunchPlan:
    """Trajectory mode: run-api, the trainer pointed at it, then the Atropos environments."""
    api_cfg = cfg.trajectory_api
    trajectory_api = ServiceSpec(
        name="run-api",
        role="trajectory_api",
        argv=_expand(api_cfg.command, {**common, "host": api_cfg.host, "port": str(api_cfg.port)}),
        env=dict(api_cfg.env),
        host=api_cfg.host,
        port=api_cfg.port,
        health_url=f"http://{connect_host(api_cfg.host)}:{api_cfg.port}{api_cfg.health_path}",
        start_timeout_s=api_cfg.start_timeout_s,
        config_key="launcher.trajectory_api",
    )
    trainer_cfg = cfg.trainer
    trainer_argv = _trainer_argv(cfg, config_file, overrides, common)
    key = trainer_cfg.trajectory_api_url_override
    trajectory_api_url = trajectory_api.base_url or ""
    given = [o for o in overrides if key and override_key(o) == key and "=" in o]
    if given:  # the user's URL: the environments push where the trainer pulls
        trajectory_api_url = given[-1].split("=", 1)[1].strip("'\"")
    elif key:
        trainer_argv.append(f"{key}={trajectory_api_url}")
    # The run folder: a trainer waiting for batches reports what the environments logged there.
    trainer_env = {RUN_DIR_ENV: str(run_dir), **trainer_cfg.env, **_verl_env(cfg, environ), **_trainer_secret_env(cfg)}
    # The gateway's key: the trainer reads it from its environment, the environments get it as
    # {policy_api_key} (their clients send it as the bearer key) and in their environment.
    policy_key = cfg.config_secrets.get("trainer.atropos.policy_api_key") or environ.get(POLICY_API_KEY_ENV) or None
    try:
        check_gateway_exposure(cfg.policy_gateway_host, policy_key)
    except ValueError as exc:
        raise LauncherConfigError(str(exc)) from exc
    if policy_key:
        trainer_env[POLICY_API_KEY_ENV] = policy_key
    secrets = _secrets(cfg, policy_key)
    trainer = ServiceSpec(
        name="trainer", role="trainer", argv=tuple(trainer_argv), env=trainer_env, config_key="launcher.trainer",
        secrets=secrets,
    )

    policy = _policy_endpoint(cfg)
    environments = []
    for index, env_cfg in enumerate(cfg.environments):
        values = {
            **common,
            "name": env_cfg.name,
            "index": str(index),
            "policy_base_url": policy.base_url,
            "trajectory_api_url": trajectory_api_url,
            "model": policy.model,
            "tokenizer": policy.tokenizer,
            "policy_api_key": policy_key or NO_POLICY_KEY,
        }
        argv = _expand(env_cfg.command, values)
        cwd = (workdir / _fill(env_cfg.workdir, values)).resolve() if env_cfg.workdir else None
        if cwd is not None and not cwd.is_dir():
            raise LauncherConfigError(
                f"launcher.environments[{index}].workdir={env_cfg.workdir!r}: {cwd} is not a folder "
                f"(a relative workdir is taken from launcher.workdir, here {workdir})"
            )
        environments.append(
            ServiceSpec(
                name=f"env-{env_cfg.name}",
                role="atropos_env",
                argv=with_atroposlib_compat(argv) if env_cfg.atroposlib_compat else argv,
                env={
                    **({POLICY_API_KEY_ENV: policy_key} if policy_key else {}),
                    **{k: _fill(v, values) for k, v in env_cfg.env.items()},
                },
                config_key=f"launcher.environments[{index}]",
                cwd=str(cwd) if cwd is not None else None,
                secrets=secrets,
            )
        )
    if not environments:
        raise LauncherConfigError(
            "trainer.atropos.mode=trajectory but launcher.environments is empty: nothing would generate batches "
            "(see recipe/atropos/config/gsm8k_trajectory_cpu.yaml)"
        )
    _check_ports_distinct([trajectory_api, *trajectory_ports_to_check(policy)])
    return LaunchPlan(
        config=cfg,
        config_file=config_file,
        run_dir=run_dir,
        workdir=workdir,
        environment=None,
        inference=(),
        registrations=(),
        trainer=trainer,
        env_api_key=None,
        base_env=_base_env(environ),
        mode="trajectory",
        trajectory_api=trajectory_api,
        policy=policy,
        environments=tuple(environments),
    )


_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}


def _trainer_argv(cfg: LauncherConfig, config_file: Path, overrides: Sequence[str], common: Mapping[str, str]) -> list[str]:
    """The trainer's command: its config and the command line's overrides, except secrets.

    A key given as an override (or written in the config) would otherwise sit on the trainer's
    command line (visible in ps) and in trainer.log, where verl prints its whole config. Each set
    secret is nulled there instead; the trainer reads its own from the environment (_trainer_secret_env).
    """
    argv = list(_expand(cfg.trainer.command, common))
    if cfg.trainer.pass_config:
        kept = [o for o in overrides if override_key(o) not in SECRET_KEYS]
        nulled = [f"++{key}=null" for key in SECRET_KEYS if key in cfg.config_secrets]
        argv += ["--config-path", str(config_file.parent), "--config-name", config_file.stem, *kept, *nulled]
    return argv


def _verl_env(cfg: LauncherConfig, environ: Mapping[str, str]) -> dict[str, str]:
    """What verl reads from the environment, in the trainer and, through the environment Ray passes
    on, in its workers: for a CPU config (trainer.device: cpu) verl's CPU platform, selected and
    loaded; for every config the rendezvous that binds the workers' store to MASTER_ADDR. What
    launcher.trainer.env sets stays (its modules are kept, the others added)."""
    given = {**environ, **cfg.trainer.env}
    modules = [m.strip() for m in given.get(EXTERNAL_MODULES_ENV, "").split(",") if m.strip()]
    env: dict[str, str] = {}
    if cfg.trainer_device == "cpu":
        env.update({k: v for k, v in CPU_PLATFORM_ENV.items() if k not in cfg.trainer.env})
        modules.append(CPU_MODULE)
    if RENDEZVOUS_ENV not in given:
        env[RENDEZVOUS_ENV] = RENDEZVOUS_INIT_METHOD
        modules.append(RENDEZVOUS_MODULE)
    if modules:
        env[EXTERNAL_MODULES_ENV] = ",".join(dict.fromkeys(modules))
    return env


def _trainer_secret_env(cfg: LauncherConfig) -> dict[str, str]:
    """The trainer's own secrets of the composed config, as the environment variables it reads."""
    return {env: cfg.config_secrets[key] for key, env in _TRAINER_SECRET_ENV.items() if key in cfg.config_secrets}


def _secrets(cfg: LauncherConfig, *more: str | None) -> tuple[str, ...]:
    return tuple(dict.fromkeys(v for v in (*cfg.config_secrets.values(), *more) if v))


def _policy_endpoint(cfg: LauncherConfig) -> PolicyEndpoint:
    pol = cfg.policy_endpoint
    parsed = urlsplit(pol.base_url)
    try:
        port = parsed.port
    except ValueError as exc:
        raise LauncherConfigError(f"launcher.policy_endpoint.base_url {pol.base_url!r}: {exc}") from exc
    if port == 0:
        raise LauncherConfigError(
            f"launcher.policy_endpoint.base_url {pol.base_url!r} has port 0: the environments need a known port. "
            "Pin the policy gateway's port (trainer.atropos.policy_gateway_port=8001, which this URL follows "
            "by default) or set launcher.policy_endpoint.base_url"
        )
    root = pol.base_url.rstrip("/").removesuffix("/v1")
    if not pol.tokenizer and not pol.model:
        raise LauncherConfigError(
            "launcher.policy_endpoint.model and .tokenizer are both unset (and the config has no "
            "actor_rollout_ref.model.path to default to)"
        )
    tokenizer = pol.tokenizer or pol.model or ""
    return PolicyEndpoint(
        base_url=pol.base_url,
        health_url=f"{root}{pol.health_path}",
        host=parsed.hostname or "",
        port=port,
        start_timeout_s=pol.start_timeout_s,
        model=pol.model or tokenizer,
        tokenizer=tokenizer,
    )


def _inference_services(
    cfg: LauncherConfig, common: Mapping[str, str]
) -> tuple[tuple[ServiceSpec, ...], tuple[Registration, ...]]:
    """The inference workers and their registrations (none unless ``launcher.inference.enabled``)."""
    inf = cfg.inference
    if not inf.enabled:
        return (), ()
    if not inf.model:
        raise LauncherConfigError(
            "launcher.inference.model is not set (and the config has no actor_rollout_ref.model.path to default to)"
        )
    if inf.ports is not None and len(inf.ports) != inf.count:
        raise LauncherConfigError(
            f"launcher.inference.ports lists {len(inf.ports)} port(s) for launcher.inference.count={inf.count} workers"
        )
    ports = list(inf.ports) if inf.ports is not None else [inf.base_port + i for i in range(inf.count)]
    if max(ports) > 65535:
        raise LauncherConfigError(f"launcher.inference.base_port={inf.base_port} + count={inf.count} passes port 65535")
    gpu_ids = list(inf.gpu_ids) if inf.gpu_ids is not None else list(range(inf.count * inf.gpus_per_worker))
    if len(gpu_ids) < inf.count * inf.gpus_per_worker:
        raise LauncherConfigError(
            f"launcher.inference.gpu_ids has {len(gpu_ids)} id(s); count={inf.count} x "
            f"gpus_per_worker={inf.gpus_per_worker} needs {inf.count * inf.gpus_per_worker}"
        )
    served = inf.served_model_name or inf.model
    workers: list[ServiceSpec] = []
    registrations: list[Registration] = []
    for index, port in enumerate(ports):
        values = {
            **common,
            "host": inf.host,
            "port": str(port),
            "index": str(index),
            "model": inf.model,
            "served_model_name": served,
            "gpus_per_worker": str(inf.gpus_per_worker),
            "tensor_parallel_size": str(max(1, inf.gpus_per_worker)),
        }
        env = dict(inf.env)
        if inf.gpus_per_worker > 0:
            mine = gpu_ids[index * inf.gpus_per_worker : (index + 1) * inf.gpus_per_worker]
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, mine))
        worker = ServiceSpec(
            name=f"inference-{index}",
            role="inference",
            argv=_expand(inf.command, values) + _expand(inf.extra_args, values),
            env=env,
            host=inf.host,
            port=port,
            health_url=f"http://{connect_host(inf.host)}:{port}{inf.health_path}",
            start_timeout_s=inf.start_timeout_s,
            config_key="launcher.inference",
        )
        workers.append(worker)
        if inf.register:
            registrations.append(Registration(worker.name, f"{worker.base_url}/v1", served, inf.api_key))
    return tuple(workers), tuple(registrations)


ENV_RUNNER = "recipe.atropos.environments.run_env"


def with_atroposlib_compat(argv: tuple[str, ...]) -> tuple[str, ...]:
    """``python FILE.py ARGS`` / ``python -m MODULE ARGS`` run through :data:`ENV_RUNNER` (atroposlib 0.4.0
    under transformers 5, environments/atroposlib_compat.py); any other command is left as written."""
    if len(argv) < 2 or argv[0] != sys.executable or argv[1:3] == ("-m", ENV_RUNNER):
        return argv
    if argv[1] == "-m" or argv[1].endswith(".py"):
        return (argv[0], "-m", ENV_RUNNER, *argv[1:])
    return argv


def _expand(words: Sequence[str], values: Mapping[str, str]) -> tuple[str, ...]:
    """Fill ``{name}`` placeholders (known names only: other braces, e.g. JSON, stay as written)."""
    pattern = re.compile(r"\{(" + "|".join(map(re.escape, values)) + r")\}")
    out = [pattern.sub(lambda m: values[m.group(1)], word) for word in words]
    if out and out[0] in ("python", "python3"):
        out[0] = sys.executable  # the launcher's interpreter: the same virtual environment
    return tuple(out)


def _fill(word: str, values: Mapping[str, str]) -> str:
    """One word with its ``{name}`` placeholders filled (environment variable values)."""
    pattern = re.compile(r"\{(" + "|".join(map(re.escape, values)) + r")\}")
    return pattern.sub(lambda m: values[m.group(1)], word)


def _base_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The launcher's environment, with the repo root first on PYTHONPATH (the verl overlay)."""
    env = dict(environ)
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != REPO_ROOT]
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *rest])
    env["PYTHONUNBUFFERED"] = "1"  # log lines reach the log file as they happen
    return env


def trajectory_ports_to_check(policy: PolicyEndpoint) -> list[ServiceSpec]:
    """The trainer's policy endpoint as a port that must be free before the launch, when it is local:
    something already answering there would pass for the trainer's endpoint."""
    if policy.port is None or policy.host not in _LOCAL_HOSTS:
        return []
    return [
        ServiceSpec(
            name="the trainer's policy endpoint",
            role="policy",
            argv=(),
            host=policy.host,
            port=policy.port,
            config_key="launcher.policy_endpoint.base_url",
        )
    ]


def _check_ports_distinct(services: Sequence[ServiceSpec]) -> None:
    seen: dict[int, ServiceSpec] = {}
    for spec in services:
        if spec.port is None:
            continue
        if spec.port in seen:
            other = seen[spec.port]
            raise LauncherConfigError(
                f"port {spec.port} is configured for both {other.name} ({other.config_key}) and "
                f"{spec.name} ({spec.config_key})"
            )
        seen[spec.port] = spec


def format_plan(plan: LaunchPlan) -> str:
    """What ``--dry-run`` prints: the order, each command, its port and health URL, the logs."""
    lines = [
        f"config:  {plan.config_file}",
        f"run dir: {plan.run_dir}  (one <service>.log per service; not created by --dry-run)",
        f"workdir: {plan.workdir}",
        "",
    ]
    step = 0

    def describe(spec: ServiceSpec, what: str) -> None:
        nonlocal step
        step += 1
        lines.append(f"{step}. start {spec.name} ({what})")
        lines.append(f"   command: {spec.shown_argv()}")
        if spec.cwd:
            lines.append(f"   cwd:     {spec.cwd}")
        if spec.env:
            shown = {k: ("***" if _SECRET_NAME.search(k) else spec.shown(v)) for k, v in sorted(spec.env.items())}
            lines.append("   env:     " + " ".join(f"{k}={shlex.quote(v)}" for k, v in shown.items()))
        if spec.port is not None:
            lines.append(f"   listens: {spec.host}:{spec.port}")
        if spec.health_url:
            lines.append(f"   wait:    GET {spec.health_url} answers 200 (timeout {spec.start_timeout_s:g} s)")
        lines.append(f"   log:     {plan.run_dir / (spec.name + '.log')}")

    if plan.mode == "trajectory":
        lines.insert(3, "mode:    trajectory (trainer.atropos.mode): run-api, trainer, then the environments")
        describe(plan.trajectory_api, "atroposlib trajectory API; its exit ends the run")  # type: ignore[arg-type]
        describe(plan.trainer, "its exit ends the run with its exit code")
        policy = plan.policy
        assert policy is not None
        step += 1
        lines.append(f"{step}. wait for the trainer's policy endpoint {policy.base_url}")
        lines.append(f"   wait:    GET {policy.health_url} answers 200 (timeout {policy.start_timeout_s:g} s)")
        for env_cfg, spec in zip(plan.config.environments, plan.environments, strict=True):
            describe(
                spec,
                f"Atropos environment; restarted up to {env_cfg.max_restarts} time(s) in a row if it dies, "
                f"backoff {env_cfg.restart_backoff_s:g} s doubling",
            )
        return "\n".join(lines)

    env_cfg = plan.config.environment
    assert plan.environment is not None
    describe(
        plan.environment,
        f"restarted up to {env_cfg.max_restarts} time(s) in a row if it dies, "
        f"backoff {env_cfg.restart_backoff_s:g} s doubling",
    )
    for worker in plan.inference:
        describe(worker, "inference worker; its exit ends the run")
    for reg in plan.registrations:
        step += 1
        lines.append(
            f"{step}. POST {plan.environment.base_url}/register_inference_endpoint "
            f"base_url={reg.base_url} model={reg.model} (404: not supported, go on)"
        )
    describe(plan.trainer, "its exit ends the run with its exit code")
    return "\n".join(lines)
