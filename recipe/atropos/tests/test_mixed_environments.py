"""Several environments in one run (docs/many_environments.md), with real components:

- trajectory mode: atroposlib's run-api (as the launcher starts it, recipe.atropos.launcher.run_api)
  with two registered environments; the trainer's per-environment metrics name each env_id;
- the mixed configs as the launcher plans them (two environment services; atroposlib's weight
  knobs on the environments' command lines);
- the launcher runs two environment services (the real GSM8K and reasoning-gym ones) and restarts a
  killed one;
- the mixed CPU demo (Ray, 12 steps): one service killed after the first step falls back until the
  launcher restarted it, the other never does; reward.png has one reward curve per environment.

Run under the loopback-only wrapper (``../shared/bin/loopback-only``).
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys

import pytest
import requests
import torch

from verl import DataProto

from recipe.atropos.config import AtroposTrainerConfig
from recipe.atropos.launcher.config import load_launcher_config
from recipe.atropos.launcher.plan import build_plan
from recipe.atropos.demo.run_report import environment_rewards, read_steps, reward_curves
from recipe.atropos.tests.conftest import PYTHON, REPO_ROOT
from recipe.atropos.tests.e2e_harness import Launched, logged_steps
from recipe.atropos.tests.servers import LOOPBACK_HOST, find_free_loopback_port, start_server_process
from recipe.atropos.tests.test_launcher import (
    FAST,
    STUB_TRAINER,
    assert_services_gone,
    is_gone,
    start_launcher,
    stub_inference,
    trainer_report,
)
from recipe.atropos.trajectory.metrics import environment_metrics
from recipe.atropos.trajectory.mode import TrajectoryMode
from recipe.atropos.trajectory.scored_data import TrajectoryLimits, scored_groups_to_batch

CONFIG_DIR = REPO_ROOT / "recipe" / "atropos" / "config"


# --------------------------------------------------------------------------------------------
# Trajectory mode: per-environment metrics from a real run-api
# --------------------------------------------------------------------------------------------


def _group(env_id: int, scores: list[float], prompt: int) -> dict:
    tokens = [[prompt, 11 + i, 12] for i in range(len(scores))]
    return {"tokens": tokens, "masks": [[-100, t[1], t[2]] for t in tokens], "scores": scores, "env_id": env_id}


@pytest.mark.timeout(90)
def test_per_environment_metrics_name_each_registered_environment_of_a_real_run_api():
    port = find_free_loopback_port()
    argv = [sys.executable, "-m", "recipe.atropos.launcher.run_api", "--host", LOOPBACK_HOST, "--port", str(port)]
    with start_server_process(argv, port=port, health_path="/") as api:
        trainer = {"wandb_group": "g", "wandb_project": "p", "batch_size": 12, "max_token_len": 64,
                   "checkpoint_dir": "", "save_checkpoint_interval": 0, "starting_step": 0, "num_steps": 2}
        assert requests.post(f"{api.url}/register", json=trainer, timeout=10).status_code == 200
        # run-api takes environments once the trainer has asked for a batch (as its first step does).
        assert requests.get(f"{api.url}/batch", timeout=10).json()["batch"] is None
        ids = {}
        for name, extra in (("gsm8k", {"weight": 2.0}), ("reasoning_gym", {"weight": 1.0, "min_batch_allocation": 0.3})):
            answer = requests.post(f"{api.url}/register-env", timeout=10,
                                   json={"max_token_length": 64, "desired_name": name, "group_size": 4, **extra}).json()
            assert answer["status"] == "success", answer
            ids[name] = answer["env_id"]
        # Two gsm8k groups (scores 1 and 0.5 on average), one reasoning-gym group (0).
        for group in (_group(ids["gsm8k"], [1.0, 1.0, 1.0, 1.0], 5), _group(ids["reasoning_gym"], [0.0] * 4, 6),
                      _group(ids["gsm8k"], [1.0, 0.0, 1.0, 0.0], 7)):
            assert requests.post(f"{api.url}/scored_data", json=group, timeout=10).status_code == 200
        groups = requests.get(f"{api.url}/batch", timeout=10).json()["batch"]
        assert sorted(len(g["tokens"]) for g in groups) == [4, 4, 4]

        # /envs (run_api's own route) lists the registrations as atroposlib keeps them.
        envs = requests.get(f"{api.url}/envs", timeout=10).json()["envs"]
        assert [(e["env_id"], e["name"], e["real_name"], e["min_batch_allocation"]) for e in envs] == [
            (ids["gsm8k"], "gsm8k", "gsm8k_0", None), (ids["reasoning_gym"], "reasoning_gym", "reasoning_gym_0", 0.3)]

        # The trainer's path: run-api's groups -> verl's batch -> advantages -> before_update's metrics.
        converted = scored_groups_to_batch(groups, TrajectoryLimits(max_prompt_length=4, max_response_length=4, pad_token_id=0))
        tensors = converted.tensors()
        batch = DataProto.from_dict(
            tensors={"token_level_rewards": tensors["token_level_scores"], "response_mask": tensors["response_mask"],
                     # Every token of a sequence carries its advantage: here its score - 0.5.
                     "advantages": (tensors["token_level_scores"].sum(-1, keepdim=True) - 0.5)
                     * torch.ones_like(tensors["response_mask"], dtype=torch.float32)},
            non_tensors=converted.non_tensors(),
        )
        mode = TrajectoryMode(AtroposTrainerConfig.parse({"mode": "trajectory", "trajectory_api_url": api.url}), None)
        metrics = mode._environment_metrics(batch)
        assert metrics["atropos/env/gsm8k/batch_share"] == pytest.approx(8 / 12)
        assert metrics["atropos/env/reasoning_gym/batch_share"] == pytest.approx(4 / 12)
        assert metrics["atropos/env/gsm8k/mean_score"] == pytest.approx(0.75)
        assert metrics["atropos/env/reasoning_gym/mean_score"] == 0.0
        assert metrics["atropos/env/gsm8k/advantage_mean"] == pytest.approx(0.25)
        assert metrics["atropos/env/reasoning_gym/advantage_mean"] == pytest.approx(-0.5)
        assert metrics["atropos/env/reasoning_gym/samples"] == 4.0

        # A run-api without /envs (a 404 here): the ids are reported as env_<id>, training goes on.
        plain = TrajectoryMode(AtroposTrainerConfig.parse({"mode": "trajectory", "trajectory_api_url": f"{api.url}/no"}), None)
        unnamed = plain._environment_metrics(batch)
        assert f"atropos/env/env_{ids['gsm8k']}/mean_score" in unnamed and plain.env_names._unsupported


def test_environment_metrics_of_unknown_ids_and_odd_names():
    metrics = environment_metrics([0, 0, None, 3], [1.0, math.nan, 0.0, 2.0], [0.5, 0.5, 0.0, -1.0],
                                  names={0: "math/gsm8k", 3: "x"})
    assert metrics["atropos/env/math_gsm8k/mean_score"] == 1.0  # the nan score is left out, '/' replaced
    assert metrics["atropos/env/unknown/batch_share"] == 0.25
    assert metrics["atropos/env/x/advantage_abs_mean"] == 1.0
    assert sum(v for k, v in metrics.items() if k.endswith("batch_share")) == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------
# The mixed configs, as the launcher plans them
# --------------------------------------------------------------------------------------------


def test_mixed_configs_plan_two_environment_services_and_pass_atroposlib_weights(tmp_path):
    plan = build_plan(load_launcher_config(CONFIG_DIR / "mixed_grpo_cpu.yaml", []), CONFIG_DIR / "mixed_grpo_cpu.yaml",
                      [], run_dir=tmp_path)
    assert [s.name for s in plan.services] == ["environment", "environment-reasoning_gym", "trainer"]
    assert "recipe.atropos.environments.reasoning_gym_server" in plan.environment_services[0].argv
    assert plan.environment_services[0].health_url == "http://127.0.0.1:9002/health"

    config = CONFIG_DIR / "mixed_trajectory_cpu.yaml"
    plan = build_plan(load_launcher_config(config, []), config, [], run_dir=tmp_path)
    assert plan.trajectory_api.argv[1:3] == ("-m", "recipe.atropos.launcher.run_api")
    argv = {spec.name: list(spec.argv) for spec in plan.environments}

    def flag(name: str, key: str) -> str | None:
        words = argv[name]
        return words[words.index(key) + 1] if key in words else None

    assert flag("env-gsm8k", "--env.wandb_name") == "gsm8k" and flag("env-gsm8k", "--env.inference_weight") == "2.0"
    assert flag("env-reasoning_gym", "--env.wandb_name") == "reasoning_gym"
    assert flag("env-reasoning_gym", "--env.min_batch_allocation") == "0.5"


# --------------------------------------------------------------------------------------------
# The launcher: two environment services, one killed mid-run
# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_launcher_runs_two_environment_services_and_restarts_the_killed_one(tmp_path):
    env_port, rg_port, p0 = (find_free_loopback_port() for _ in range(3))
    done = tmp_path / "done"
    reasoning_gym = (
        "launcher.environment_services=[{name:reasoning_gym,port:" + str(rg_port) + ",restart_backoff_s:0.2,"
        "command:[python,-m,recipe.atropos.environments.reasoning_gym_server,serve,--slurm,'false',"
        "--host,'{host}',--port,'{port}',--env.tasks,basic_arithmetic]}]"
    )
    launch = start_launcher(tmp_path, f"launcher.environment.port={env_port}", reasoning_gym, *stub_inference(p0),
                            STUB_TRAINER, *FAST, env={"STUB_TRAINER_WAIT_FOR": str(done)})
    try:
        launch.wait_until(lambda: bool(trainer_report(tmp_path)), "the trainer to start", timeout_s=90)
        services = launch.state()["services"]
        assert {"environment", "environment-reasoning_gym", "inference-0", "trainer"} <= set(services)
        for port in (env_port, rg_port):  # both healthy and told the inference endpoint
            health = requests.get(f"http://127.0.0.1:{port}/health", timeout=5).json()
            assert health["inference_endpoint"]["base_url"] == f"http://127.0.0.1:{p0}/v1", health
        first_pid = services["environment-reasoning_gym"]["pid"]
        os.killpg(first_pid, signal.SIGKILL)

        def restarted() -> bool:
            env = launch.state()["services"]["environment-reasoning_gym"]
            return env["restarts"] == 1 and env["restart_state"] == "up"

        launch.wait_until(restarted, "the reasoning-gym service to be restarted", timeout_s=60)
        state = launch.state()["services"]
        assert state["environment-reasoning_gym"]["pid"] != first_pid and is_gone(first_pid)
        assert state["environment"]["restarts"] == 0  # the other service was left alone
        health = requests.get(f"http://127.0.0.1:{rg_port}/health", timeout=5).json()
        assert health["inference_endpoint"]["base_url"] == f"http://127.0.0.1:{p0}/v1"  # registered again
        done.touch()
        assert launch.wait(30) == 0, launch.stderr()
    finally:
        if launch.popen.poll() is None:
            launch.popen.kill()
    assert "restarting the environment service environment-reasoning_gym" in launch.stderr()
    assert_services_gone(launch)


# --------------------------------------------------------------------------------------------
# The mixed CPU demo (Ray)
# --------------------------------------------------------------------------------------------


def test_reward_curves_one_per_environment():
    steps = [{"step": 1, "critic/score/mean": 0.5, "atropos/env/gsm8k/mean_score": 0.9, "atropos/env/mean_score": 0.5,
              "atropos/env/reasoning_gym/mean_score": 0.1, "atropos/env/gsm8k/accuracy": 1.0},
             {"step": 2, "critic/score/mean": 0.6, "atropos/env/gsm8k/mean_score": 1.0}]
    curves = reward_curves(steps)
    assert list(curves) == ["reward (mean score)", "reward: gsm8k", "reward: reasoning_gym"]
    assert curves["reward: gsm8k"] == [0.9, 1.0] and math.isnan(curves["reward: reasoning_gym"][1])


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_mixed_demo_trains_both_environments_and_survives_one_killed_mid_run(tmp_path):
    """The mixed demo through the launcher; after step 1 the reasoning-gym service is SIGKILLed: its
    samples fall back to GRPO until the launcher has restarted it, the GSM8K samples never do, and
    the run ends with both environments' curves in reward.png."""
    out, steps_wanted = tmp_path / "demo", 12
    # No held-out evaluation (the demo's before and after training): this test is not about learning.
    argv = [PYTHON, "-m", "recipe.atropos.demo", "--config", "mixed_grpo_cpu", "--out", str(out),
            f"trainer.total_training_steps={steps_wanted}", "trainer.val_before_train=false", "trainer.test_freq=-1"]
    metrics = out / "metrics.jsonl"
    with Launched(argv, tmp_path / "demo.log") as demo:
        demo.wait_until(lambda: logged_steps(metrics), "the demo's first step", timeout_s=600)
        services = json.loads((out / "launch" / "services.json").read_text())["services"]
        os.killpg(services["environment-reasoning_gym"]["pid"], signal.SIGKILL)
        demo.run_to_end(timeout_s=600)
    demo.assert_exit(0)
    output = demo.log(limit=10**7)
    steps = read_steps(metrics)
    assert [s["step"] for s in steps] == list(range(1, steps_wanted + 1))
    # Both environments had rows in every step (drawn by weight 0.5 / 0.5), and each scored its own
    # whenever it was up (a service that is down sends no scores: that step has no point on its curve).
    assert all(s[f"atropos/env/{name}/batch_share"] > 0 for s in steps for name in ("gsm8k", "reasoning_gym"))
    assert all(s["atropos/env/gsm8k/fallback"] == 0 for s in steps)
    fell_back = [s["step"] for s in steps if s["atropos/env/reasoning_gym/fallback"] > 0]
    up = [s for s in steps if s["step"] not in fell_back]
    assert all(set(environment_rewards(s)) == {"gsm8k", "reasoning_gym"} for s in up), [sorted(s) for s in up]
    assert fell_back and fell_back[0] > 1, fell_back  # down after step 1 ...
    assert steps[-1]["atropos/env/reasoning_gym/fallback"] == 0, fell_back  # ... and back before the end
    services = json.loads((out / "launch" / "services.json").read_text())["services"]
    assert set(services) == {"environment", "environment-reasoning_gym", "trainer"}
    assert services["environment-reasoning_gym"]["restarts"] == 1 and services["environment"]["restarts"] == 0
    assert list(reward_curves(steps)) == ["reward (mean score)", "reward: gsm8k", "reward: reasoning_gym"]
    assert (out / "reward.png").read_bytes()[:4] == b"\x89PNG"
    assert "gsm8k" in output and "reasoning_gym" in output
