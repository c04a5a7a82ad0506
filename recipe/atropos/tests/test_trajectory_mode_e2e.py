"""Trajectory mode end to end on CPU: atroposlib's run-api, the repo's atroposlib GSM8K environment
generating through the trainer's policy gateway (in front of the CPU rollout's server), and verl's
real trainer pulling and training."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest
import requests

from recipe.atropos.trajectory.runapi_client import AtroposRunAPIClient
from recipe.atropos.demo.run_report import read_jsonl, read_steps

from .conftest import PYTHON, REPO_ROOT, repo_env
from .ramp_advantage_env import ramp
from .servers import find_free_loopback_port, start_atropos_run_api
from .test_atropos_env import EnvProcess

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _health(root_url: str) -> dict | None:
    try:
        return requests.get(f"{root_url}/health", timeout=2).json()
    except (requests.RequestException, ValueError):
        return None


def _gateway_health(port: int) -> dict | None:
    return _health(f"http://127.0.0.1:{port}")


@pytest.mark.timeout(480)
def test_trainer_pulls_environment_groups_and_trains_on_their_advantages(tiny_assets, tmp_path):
    api = start_atropos_run_api()
    policy_port = find_free_loopback_port()
    metrics_path = tmp_path / "metrics.jsonl"
    dump_dir = tmp_path / "rollouts"
    trainer_env = repo_env(
        VERL_PLATFORM="cpu", VERL_USE_EXTERNAL_MODULES="recipe.atropos.cpu", VERL_FILE_LOGGER_PATH=str(metrics_path),
        VERL_CPU_MODEL_PATH=str(tiny_assets.model_dir), VERL_CPU_TRAIN_FILES=str(tiny_assets.train_file),
        VERL_CPU_VAL_FILES=str(tiny_assets.test_file),
    )
    trainer_log = open(tmp_path / "trainer.log", "w")
    trainer = subprocess.Popen(
        [PYTHON, "-m", "verl.trainer.main_ppo", "--config-path", "recipe/atropos/config", "--config-name", "gsm8k_grpo_cpu",
         "trainer.atropos.mode=trajectory", f"trainer.atropos.trajectory_api_url={api.url}",
         "trainer.atropos.batch_timeout_s=240", f"trainer.atropos.policy_gateway_port={policy_port}",
         "actor_rollout_ref.rollout.engine_kwargs.hf.port=0", f"trainer.rollout_data_dir={dump_dir}",
         "actor_rollout_ref.rollout.engine_kwargs.hf.served_model_name=tiny",
         "data.train_batch_size=2", "actor_rollout_ref.rollout.n=4", "actor_rollout_ref.actor.ppo_mini_batch_size=2",
         "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8",
         "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8",
         "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=8",
         "trainer.total_training_steps=3", "+ray_kwargs.ray_init.include_dashboard=false"],
        cwd=REPO_ROOT, env=trainer_env, stdout=trainer_log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    env_process, gateway_seen, server_steps_seen = None, [], set()
    try:
        client = AtroposRunAPIClient(api.url, timeout=5, retry_attempts=1, max_wait_time=5)
        deadline = time.monotonic() + 240
        # Environments start once the trainer's policy gateway is up and it has registered.
        while (_gateway_health(policy_port) is None or client.info().batch_size < 0) and time.monotonic() < deadline:
            assert trainer.poll() is None, (tmp_path / "trainer.log").read_text()[-5000:]
            time.sleep(0.5)
        assert client.info().batch_size == 8
        env_process = EnvProcess(
            [sys.executable, "recipe/atropos/tests/ramp_advantage_env.py", "serve", "--slurm", "false",
             "--openai.base_url", f"http://127.0.0.1:{policy_port}/v1", "--openai.model_name", "tiny",
             "--openai.api_key", "x", "--openai.server_type", "vllm", "--openai.tokenizer_name", str(tiny_assets.model_dir),
             "--env.tokenizer_name", str(tiny_assets.model_dir), "--env.data_path", str(tiny_assets.train_file),
             "--env.rollout_server_url", api.url, "--env.group_size", "4", "--env.max_response_tokens", "24",
             "--env.use_wandb", "false", "--env.emit_advantages", "true", "--env.ensure_scores_are_not_same", "false",
             "--env.max_num_workers", "2"],
            tmp_path / "env.log",
        )
        while trainer.poll() is None and time.monotonic() < deadline + 180:
            health = _gateway_health(policy_port)
            if health is not None:
                gateway_seen.append(health)
                # The CPU rollout server behind the gateway reports the step of the weights it holds.
                server = _health(health["servers"][0])
                if server is not None:
                    server_steps_seen.add(server["global_steps"])
            time.sleep(0.1)
    finally:
        if trainer.poll() is None:
            trainer.kill()
        if env_process is not None:
            env_process.stop()
        api.stop()
        trainer_log.close()
    assert trainer.returncode == 0, (tmp_path / "trainer.log").read_text()[-6000:] + "\nENV:\n" + (tmp_path / "env.log").read_text()[-3000:]
    steps = read_steps(metrics_path)
    assert [s["step"] for s in steps] == [1, 2, 3]
    for step in steps:
        # Two groups of four from the environment each step, trained on the advantages it sent.
        assert step["atropos/batch_groups"] == 2
        assert step["atropos/override_fraction"] == 1.0
        assert step["atropos/advantage_groups_fraction"] == 1.0
        assert "atropos/staleness/mean" in step
    # Token by token, the advantages trained on are the environment's ramp (GRPO would give one
    # value per answer), for every sample of every step (verl's rollout dump, with our fields).
    for step in (1, 2, 3):
        samples = read_jsonl(dump_dir / f"{step}.jsonl")  # the policy's text may hold U+2028
        assert len(samples) == 8
        for sample in samples:
            assert len(sample["advantages"]) == len(sample["trained_token_ids"]) > 0
            assert sample["advantages"] == pytest.approx(ramp(len(sample["advantages"])), abs=1e-6)
            assert sample["gts"] is None  # the dataloader row's answer is not the environment's
    # The gateway the environment called was closed during training and opened with each step's
    # weights, which reached the server behind it (0 is the initial sync; polls may miss a step on
    # a busy machine).
    # Closed before the servers slept, opened after each sync (the one before step 1, then one per
    # step); the last poll may come before the last step's sync.
    assert max(h["times_closed"] for h in gateway_seen) >= 2, gateway_seen[-1]
    assert max(h["times_opened"] for h in gateway_seen) >= 3, gateway_seen[-1]
    assert max(h["global_steps"] or 0 for h in gateway_seen) >= 1
    assert max(server_steps_seen) >= 1, sorted(server_steps_seen)
    # Nothing of the trainer's is left: its gateway is closed.
    assert _gateway_health(policy_port) is None
    assert not [p for p in psutil.process_iter(["cmdline"]) if "verl.trainer.main_ppo" in " ".join(p.info["cmdline"] or [])]


@pytest.mark.timeout(240)
def test_a_busy_gateway_port_stops_the_trainer_before_its_workers_start(tiny_assets, tmp_path):
    import socket

    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        result = subprocess.run(
            [PYTHON, "-m", "verl.trainer.main_ppo", "--config-path", "recipe/atropos/config", "--config-name",
             "gsm8k_grpo_cpu", "trainer.atropos.mode=trajectory", f"trainer.atropos.policy_gateway_port={port}",
             "trainer.total_training_steps=1", "+ray_kwargs.ray_init.include_dashboard=false"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=200,
            env=repo_env(VERL_PLATFORM="cpu", VERL_USE_EXTERNAL_MODULES="recipe.atropos.cpu",
                         VERL_CPU_MODEL_PATH=str(tiny_assets.model_dir), VERL_CPU_TRAIN_FILES=str(tiny_assets.train_file),
                         VERL_CPU_VAL_FILES=str(tiny_assets.test_file)),
        )
    log = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in log and "trainer.atropos.policy_gateway_port" in log, log[-3000:]
    # It stopped before verl built its workers (whose output Ray prefixes with "(WorkerDict pid=...)").
    assert "WorkerDict" not in log, log[-3000:]
