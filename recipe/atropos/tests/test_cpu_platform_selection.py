"""A config made for CPU (trainer.device: cpu) selects verl's CPU platform itself.

Launched without VERL_PLATFORM=cpu such a config used to die about 30 s in, inside a Ray worker,
with "Distributed package doesn't have NCCL built in". Now the launcher gives the trainer
VERL_PLATFORM=cpu and VERL_USE_EXTERNAL_MODULES=recipe.atropos.cpu, and the trainer's entry point,
started by hand without them, stops before Ray starts with a message naming them.
Run under the loopback-only wrapper.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from recipe.atropos.launcher.config import load_launcher_config
from recipe.atropos.launcher.plan import build_plan
from recipe.atropos.tests.conftest import REPO_ROOT, repo_env
from recipe.atropos.tests.servers import find_free_loopback_port

CONFIG_DIR = REPO_ROOT / "recipe" / "atropos" / "config"
LAUNCHER = REPO_ROOT / "recipe" / "atropos" / "launch_atropos_verl_services.py"
CPU_CONFIGS = ["gsm8k_grpo_cpu", "gsm8k_trajectory_cpu"]


def without_platform(**extra: str) -> dict[str, str]:
    env = repo_env(**extra)
    for name in ("VERL_PLATFORM", "VERL_USE_EXTERNAL_MODULES"):
        if name not in extra:
            env.pop(name, None)
    return env


@pytest.mark.timeout(120)
@pytest.mark.parametrize("config_name", CPU_CONFIGS)
def test_the_trainer_started_by_hand_without_the_cpu_platform_stops_before_ray(config_name, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "verl.trainer.main_ppo", "--config-path", str(CONFIG_DIR), "--config-name", config_name],
        cwd=REPO_ROOT, env=without_platform(RAY_TMPDIR=str(tmp_path)), capture_output=True, text=True, timeout=110,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert "trainer.device=cpu" in output and "VERL_PLATFORM=cpu" in output, output[-3000:]
    assert "VERL_USE_EXTERNAL_MODULES=recipe.atropos.cpu" in output
    # Before Ray: upstream prints its ray.init arguments just before starting it.
    assert "ray init kwargs" not in output and "NCCL" not in output, output[-3000:]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("config_name", "overrides", "cpu"),
    [
        ("gsm8k_grpo_cpu", [], True),
        ("gsm8k_trajectory_cpu", [], True),
        ("gsm8k_grpo_example", ["+cpu=gpu_example"], True),  # the GPU config with the CPU overlay
        ("gsm8k_grpo_example", [], False),
    ],
)
def test_the_launcher_gives_the_trainer_of_a_cpu_config_the_cpu_platform(config_name, overrides, cpu, tmp_path):
    config_file = CONFIG_DIR / f"{config_name}.yaml"
    cfg = load_launcher_config(config_file, overrides)
    environ = {"VERL_USE_EXTERNAL_MODULES": "my.plugin"}  # the user's own modules stay
    plan = build_plan(cfg, config_file, overrides, run_dir=tmp_path / "plan", environ=environ)
    env = plan.child_env(plan.trainer)
    if cpu:
        assert env["VERL_PLATFORM"] == "cpu"
        assert env["VERL_USE_EXTERNAL_MODULES"] == "my.plugin,recipe.atropos.cpu,recipe.atropos.rendezvous"
    else:
        assert "VERL_PLATFORM" not in env
        assert env["VERL_USE_EXTERNAL_MODULES"] == "my.plugin,recipe.atropos.rendezvous"
    # Only the trainer: services and environments run without verl.
    for spec in plan.services:
        if spec is not plan.trainer:
            assert "VERL_PLATFORM" not in spec.env

    # launcher.trainer.env has the last word.
    cfg = load_launcher_config(config_file, [*overrides, "+launcher.trainer.env.VERL_PLATFORM=npu"])
    plan = build_plan(cfg, config_file, overrides, run_dir=tmp_path / "plan", environ={})
    assert plan.child_env(plan.trainer)["VERL_PLATFORM"] == "npu"


@pytest.mark.timeout(180)
def test_a_launch_of_the_cpu_config_without_verl_platform_runs_its_trainer_on_the_cpu_platform(tmp_path):
    probe_out = tmp_path / "probe.json"
    env_port = find_free_loopback_port()
    result = subprocess.run(
        [sys.executable, str(LAUNCHER), "--config", str(CONFIG_DIR / "gsm8k_grpo_cpu.yaml"), "--run-dir",
         str(tmp_path / "run"), f"launcher.environment.port={env_port}", "launcher.poll_interval_s=0.1",
         "launcher.trainer.command=[python,-m,recipe.atropos.tests.launcher_platform_probe]"],
        cwd=REPO_ROOT, env=without_platform(PLATFORM_PROBE_OUT=str(probe_out)),
        capture_output=True, text=True, timeout=170,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(probe_out.read_text())
    assert report["VERL_PLATFORM"] == "cpu" and report["device_name"] == "cpu", report
