"""Trajectory mode end to end on CPU: atroposlib's run-api, the repo's atroposlib GSM8K environment
generating through the trainer's policy gateway (in front of the CPU rollout's server), and verl's
real trainer pulling and training."""

from __future__ import annotations

import psutil
import pytest

from recipe.atropos.demo.run_report import read_jsonl, read_steps

from .e2e_harness import (
    Launched,
    cpu_trainer_env,
    gateway_health,
    http_health,
    start_atropos_env,
    tiny_batch,
    trainer_argv,
    wait_for_trajectory_trainer,
)
from .ramp_advantage_env import ramp
from .servers import find_free_loopback_port, start_atropos_run_api

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.mark.timeout(480)
def test_trainer_pulls_environment_groups_and_trains_on_their_advantages(tiny_assets, tmp_path):
    api, policy_port = start_atropos_run_api(), find_free_loopback_port()
    metrics_path, dump_dir = tmp_path / "metrics.jsonl", tmp_path / "rollouts"
    argv = trainer_argv(
        "gsm8k_grpo_cpu", "trainer.atropos.mode=trajectory", f"trainer.atropos.trajectory_api_url={api.url}",
        "trainer.atropos.batch_timeout_s=240", f"trainer.atropos.policy_gateway_port={policy_port}",
        "actor_rollout_ref.rollout.engine_kwargs.hf.port=0", f"trainer.rollout_data_dir={dump_dir}",
        "actor_rollout_ref.rollout.engine_kwargs.hf.served_model_name=tiny", *tiny_batch(2, 4),
        "trainer.total_training_steps=3",
    )
    environment, gateway_seen, server_steps_seen = None, [], set()

    def sample_health() -> None:
        environment.assert_alive()
        health = gateway_health(policy_port)
        if health is not None:
            gateway_seen.append(health)
            # The CPU rollout server behind the gateway reports the step of the weights it holds.
            server = http_health(health["servers"][0])
            if server is not None:
                server_steps_seen.add(server["global_steps"])

    try:
        with Launched(argv, tmp_path / "trainer.log", cpu_trainer_env(tiny_assets, metrics_path)) as trainer:
            # Environments start once the trainer's policy gateway is up and it has registered.
            wait_for_trajectory_trainer(trainer, api.url, policy_port)
            environment = start_atropos_env(
                "recipe/atropos/tests/ramp_advantage_env.py", tiny_assets, api.url, policy_port, tmp_path / "env.log",
                "--env.emit_advantages", "true", "--env.max_num_workers", "2", max_tokens=24,
            )
            trainer.run_to_end(timeout_s=420, watch=sample_health, every_s=0.1)
            trainer.assert_exit(0, environment)
            # Nothing of the trainer's is left once it exited: its gateway is closed.
            assert gateway_health(policy_port) is None
            assert not [p for p in psutil.process_iter(["cmdline"]) if str(dump_dir) in " ".join(p.info["cmdline"] or [])]
    finally:
        if environment is not None:
            environment.stop()
        api.stop()
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


@pytest.mark.timeout(240)
def test_a_busy_gateway_port_stops_the_trainer_before_its_workers_start(tiny_assets, tmp_path):
    import socket

    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        argv = trainer_argv("gsm8k_grpo_cpu", "trainer.atropos.mode=trajectory",
                            f"trainer.atropos.policy_gateway_port={port}", "trainer.total_training_steps=1")
        with Launched(argv, tmp_path / "trainer.log", cpu_trainer_env(tiny_assets)) as trainer:
            trainer.run_to_end(timeout_s=200)
    log = trainer.log(limit=10**6)
    assert trainer.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in log and "trainer.atropos.policy_gateway_port" in log, log[-3000:]
    # It stopped before verl built its workers (whose output Ray prefixes with "(WorkerDict pid=...)").
    assert "WorkerDict" not in log, log[-3000:]
