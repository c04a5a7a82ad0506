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
    text = _PlanText(plan)
    if plan.mode == "trajectory":
        text.trajectory_steps()
    else:
        text.evaluate_steps()
    return "\n".join(text.lines)


def _restarts(cfg, what: str = "") -> str:
    return (f"{what}restarted up to {cfg.max_restarts} time(s) in a row if it dies, "
            f"backoff {cfg.restart_backoff_s:g} s doubling")


class _PlanText:
    """The plan's lines, numbered steps in start order."""

    def __init__(self, plan: LaunchPlan):
        self.plan = plan
        self.step = 0
        self.lines = [
            f"config:  {plan.config_file}",
            f"run dir: {plan.run_dir}  (one <service>.log per service; not created by --dry-run)",
            f"workdir: {plan.workdir}",
            "",
        ]

    def describe(self, spec: ServiceSpec, what: str) -> None:
        self.step += 1
        lines = self.lines
        lines.append(f"{self.step}. start {spec.name} ({what})")
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
        lines.append(f"   log:     {self.plan.run_dir / (spec.name + '.log')}")

    def trajectory_steps(self) -> None:
        plan = self.plan
        self.lines.insert(3, "mode:    trajectory (trainer.atropos.mode): run-api, trainer, then the environments")
        self.describe(plan.trajectory_api, "atroposlib trajectory API; its exit ends the run")  # type: ignore[arg-type]
        self.describe(plan.trainer, "its exit ends the run with its exit code")
        policy = plan.policy
        assert policy is not None
        self.step += 1
        self.lines.append(f"{self.step}. wait for the trainer's policy endpoint {policy.base_url}")
        self.lines.append(f"   wait:    GET {policy.health_url} answers 200 (timeout {policy.start_timeout_s:g} s)")
        for env_cfg, spec in zip(plan.config.environments, plan.environments, strict=True):
            self.describe(spec, _restarts(env_cfg, "Atropos environment; "))

    def evaluate_steps(self) -> None:
        plan = self.plan
        assert plan.environment is not None
        self.describe(plan.environment, _restarts(plan.config.environment))
        for svc_cfg, spec in zip(plan.config.environment_services, plan.environment_services, strict=True):
            self.describe(spec, _restarts(svc_cfg, f"environment service {svc_cfg.name}; "))
        for worker in plan.inference:
            self.describe(worker, "inference worker; its exit ends the run")
        for reg in plan.registrations:
            self.step += 1
            for service in (plan.environment, *plan.environment_services):
                self.lines.append(
                    f"{self.step}. POST {service.base_url}/register_inference_endpoint "
                    f"base_url={reg.base_url} model={reg.model} (404: not supported, go on)"
                )
        self.describe(plan.trainer, "its exit ends the run with its exit code")
