"""One launch, made concrete: every service's command, environment, port and health URL, in order.

The plan is built before anything starts, so that ``--dry-run`` prints exactly what a real launch
would do, and so that every config mistake that can be found without starting a process (ports
that collide, too few GPU ids, a missing model) stops the launch before the first process.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from recipe.atropos.config import API_KEY_ENV, POLICY_API_KEY_ENV, check_gateway_exposure
from recipe.atropos.launcher.config import (
    SECRET_KEYS,
    EnvironmentConfig,
    LauncherConfig,
    LauncherConfigError,
    TrajectoryApiConfig,
    override_key,
)
from recipe.atropos.launcher.spec import LaunchPlan, PolicyEndpoint, Registration, ServiceSpec, connect_host
from recipe.atropos.trajectory.diagnostics import RUN_DIR_ENV

# The plan's parts are defined in .spec; named here too for the launcher's modules that import them from here.
__all__ = ["LaunchPlan", "PolicyEndpoint", "Registration", "ServiceSpec", "build_plan", "connect_host", "REPO_ROOT"]

# The repo root: its verl/ overlay must come first on every child's sys.path.
REPO_ROOT = Path(__file__).resolve().parents[3]

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
    plan = _trajectory_plan if cfg.mode == "trajectory" else _evaluate_plan
    return plan(cfg, config_file, overrides, run_dir, workdir, common, environ)


def _server(
    name: str, role: str, section: EnvironmentConfig | TrajectoryApiConfig, common: Mapping[str, str], config_key: str,
    env: dict[str, str],
) -> ServiceSpec:
    """A server the launcher waits for: ``section``'s command, bind address and health path."""
    return ServiceSpec(
        name=name,
        role=role,
        argv=_expand(section.command, {**common, "host": section.host, "port": str(section.port)}),
        env=env,
        host=section.host,
        port=section.port,
        health_url=f"http://{connect_host(section.host)}:{section.port}{section.health_path}",
        start_timeout_s=section.start_timeout_s,
        config_key=config_key,
    )


def _evaluate_plan(
    cfg: LauncherConfig,
    config_file: Path,
    overrides: Sequence[str],
    run_dir: Path,
    workdir: Path,
    common: Mapping[str, str],
    environ: Mapping[str, str],
) -> LaunchPlan:
    """Evaluate mode: the environment service, inference workers and their registrations, the trainer."""
    env_cfg = cfg.environment
    api_key = env_cfg.api_key or environ.get("ATROPOS_ENV_API_KEY") or environ.get("ATROPOS_API_KEY") or None
    env = {**env_cfg.env, **({"ATROPOS_ENV_API_KEY": api_key} if api_key else {})}
    environment = _server("environment", "environment", env_cfg, common, "launcher.environment", env)
    # Each further service gets the same key: its client is the same trainer. {name} is its name.
    for i, svc in enumerate(cfg.environment_services):
        if svc.api_key:
            raise LauncherConfigError(
                f"launcher.environment_services[{i}].api_key is set: every environment service gets "
                "launcher.environment.api_key (or $ATROPOS_ENV_API_KEY); set that one and leave this null"
            )
    environment_services = tuple(
        _server(f"environment-{svc.name}", "environment", svc, {**common, "name": svc.name},
                f"launcher.environment_services[{i}]", {**svc.env, **({"ATROPOS_ENV_API_KEY": api_key} if api_key else {})})
        for i, svc in enumerate(cfg.environment_services)
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

    _check_ports_distinct((environment, *environment_services, *inference))
    return LaunchPlan(
        config=cfg,
        config_file=config_file,
        run_dir=run_dir,
        workdir=workdir,
        environment=environment,
        environment_services=environment_services,
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
    trajectory_api = _server("run-api", "trajectory_api", api_cfg, common, "launcher.trajectory_api", dict(api_cfg.env))
    trainer_argv = _trainer_argv(cfg, config_file, overrides, common)
    key = cfg.trainer.trajectory_api_url_override
    trajectory_api_url = trajectory_api.base_url or ""
    given = [o for o in overrides if key and override_key(o) == key and "=" in o]
    if given:  # the user's URL: the environments push where the trainer pulls
        trajectory_api_url = given[-1].split("=", 1)[1].strip("'\"")
    elif key:
        trainer_argv.append(f"{key}={trajectory_api_url}")
    # The gateway's key: the trainer reads it from its environment, the environments get it as
    # {policy_api_key} (their clients send it as the bearer key) and in their environment.
    policy_key = cfg.config_secrets.get("trainer.atropos.policy_api_key") or environ.get(POLICY_API_KEY_ENV) or None
    try:
        check_gateway_exposure(cfg.policy_gateway_host, policy_key)
    except ValueError as exc:
        raise LauncherConfigError(str(exc)) from exc
    trainer = _trajectory_trainer(cfg, trainer_argv, run_dir, environ, policy_key)
    policy = _policy_endpoint(cfg)
    values = {
        **common,
        "policy_base_url": policy.base_url,
        "trajectory_api_url": trajectory_api_url,
        "model": policy.model,
        "tokenizer": policy.tokenizer,
        "policy_api_key": policy_key or NO_POLICY_KEY,
    }
    environments = _atropos_environments(cfg, values, workdir, policy_key, trainer.secrets)
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
        environments=environments,
    )


def _trajectory_trainer(
    cfg: LauncherConfig, argv: Sequence[str], run_dir: Path, environ: Mapping[str, str], policy_key: str | None
) -> ServiceSpec:
    """The trainer of trajectory mode, with the run folder and the gateway's key in its environment."""
    # The run folder: a trainer waiting for batches reports what the environments logged there.
    env = {RUN_DIR_ENV: str(run_dir), **cfg.trainer.env, **_verl_env(cfg, environ), **_trainer_secret_env(cfg)}
    if policy_key:
        env[POLICY_API_KEY_ENV] = policy_key
    return ServiceSpec(
        name="trainer", role="trainer", argv=tuple(argv), env=env, config_key="launcher.trainer",
        secrets=_secrets(cfg, policy_key),
    )


def _atropos_environments(
    cfg: LauncherConfig, common: Mapping[str, str], workdir: Path, policy_key: str | None, secrets: tuple[str, ...]
) -> tuple[ServiceSpec, ...]:
    """launcher.environments as processes, their placeholders filled from ``common`` (at least one)."""
    environments = []
    for index, env_cfg in enumerate(cfg.environments):
        values = {**common, "name": env_cfg.name, "index": str(index)}
        argv = _expand(env_cfg.command, values) + env_cfg.literal_args
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
            "trainer.atropos.mode=trajectory but launcher.environments is empty and trainer.atropos.environments has "
            "no verifiers or openenv entry: nothing would generate batches (see "
            "recipe/atropos/config/gsm8k_trajectory_cpu.yaml)"
        )
    return tuple(environments)


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
