"""What ``--dry-run`` prints: a launch plan's steps in order, secrets masked."""

from __future__ import annotations

import re
import shlex

from recipe.atropos.launcher.spec import LaunchPlan, ServiceSpec

__all__ = ["format_plan"]

# Environment variables whose values the plan never prints.
_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD", re.IGNORECASE)


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
    for svc_cfg, spec in zip(plan.config.environment_services, plan.environment_services, strict=True):
        describe(
            spec,
            f"environment service {svc_cfg.name}; restarted up to {svc_cfg.max_restarts} time(s) in a row if it dies, "
            f"backoff {svc_cfg.restart_backoff_s:g} s doubling",
        )
    for worker in plan.inference:
        describe(worker, "inference worker; its exit ends the run")
    for reg in plan.registrations:
        step += 1
        for service in (plan.environment, *plan.environment_services):
            lines.append(
                f"{step}. POST {service.base_url}/register_inference_endpoint "
                f"base_url={reg.base_url} model={reg.model} (404: not supported, go on)"
            )
    describe(plan.trainer, "its exit ends the run with its exit code")
    return "\n".join(lines)
