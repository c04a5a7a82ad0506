"""RayGRPOAtroposTrainer end to end on CPU: verl's real trainer, the real environment service.

Each test runs `python -m verl.trainer.main_ppo` with config/gsm8k_grpo_cpu.yaml (CPU mode, tiny
model) as a subprocess, reads verl's metrics file as the run goes, and acts on the service.
"""

from __future__ import annotations


import pytest

from recipe.atropos.demo.run_report import StepFollower, read_steps

from .conftest import PYTHON, repo_env
from .e2e_harness import Launched, cpu_trainer_env, tiny_batch, trainer_argv
from .fault_server import Fault, FaultInjectingServer
from .servers import ServerProcess, find_free_loopback_port

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SMALL_RUN = [
    *tiny_batch(4, 4),
    "trainer.atropos.retry_attempts=2",
    "trainer.atropos.retry_delay=0.1",
    "trainer.atropos.max_wait_time=5",
]


def _service(port: int) -> ServerProcess:
    argv = [PYTHON, "-m", "recipe.atropos.environments.gsm8k_server", "serve", "--slurm", "false",
            "--host", "127.0.0.1", "--port", str(port), "--env.token_level", "true"]
    return ServerProcess(argv, port=port, env=repo_env())


def _trainer(tiny_assets, metrics_path, api_url: str, *overrides: str) -> Launched:
    argv = trainer_argv("gsm8k_grpo_cpu", f"trainer.atropos.api_url={api_url}", *SMALL_RUN, *overrides)
    return Launched(argv, metrics_path.with_suffix(".log"), cpu_trainer_env(tiny_assets, metrics_path))


@pytest.mark.timeout(420)
def test_overrides_every_step_then_fallback_while_the_service_is_down_then_resume(tiny_assets, tmp_path):
    port = find_free_loopback_port()
    service = _service(port).start()
    metrics_path = tmp_path / "metrics.jsonl"
    follower, seen, restarted, healthy_again_after = StepFollower(metrics_path), [], None, None

    def act_on_steps() -> None:
        nonlocal restarted, healthy_again_after
        for step in follower.new_steps():
            seen.append(step)
            if step["step"] == 2 and service.process.poll() is None:
                service.stop()  # killed mid-run (step 3's request may already be out)
            if step["step"] == 5:
                restarted = _service(port).start()
                # Steps logged by now may have asked while it was down; the one after next asks later.
                healthy_again_after = max(s["step"] for s in read_steps(metrics_path))

    try:
        with _trainer(tiny_assets, metrics_path, f"http://127.0.0.1:{port}", "trainer.total_training_steps=14") as trainer:
            trainer.run_to_end(timeout_s=360, watch=act_on_steps)
    finally:
        service.stop()
        if restarted is not None:
            restarted.stop()
    trainer.assert_exit(0)
    steps = {s["step"]: s for s in read_steps(metrics_path)}
    assert sorted(steps) == list(range(1, 15))  # training went on through the outage
    for n in (1, 2):  # the service's advantages on every step while it is up
        assert steps[n]["atropos/override_fraction"] == 1.0 and steps[n]["atropos/fallback"] == 0.0, n
        assert steps[n]["atropos/env/accuracy"] >= 0.0 and steps[n]["atropos/api_latency_s"] > 0
    # Down from the end of step 2 until step 5 is logged: the steps that asked meanwhile fall back.
    for n in (4, 5):
        assert steps[n]["atropos/fallback"] == 1.0 and steps[n]["atropos/override_fraction"] == 0.0, n
    # Back (restarted as step 5 was logged): every step that asked once it was healthy again has
    # overrides again.
    resumed = range(healthy_again_after + 2, 15)
    assert len(resumed) >= 2, healthy_again_after
    for n in resumed:
        assert steps[n]["atropos/fallback"] == 0.0 and steps[n]["atropos/override_fraction"] == 1.0, n
    assert steps[14]["atropos/fallback_steps_total"] >= 2
    output = trainer.log(limit=10**7)
    assert output.count("using standard GRPO until it answers again") == 1  # one warning per outage
    assert "answers again after" in output


@pytest.mark.timeout(240)
def test_without_fallback_a_missing_service_stops_the_run_before_training(tiny_assets, tmp_path):
    port = find_free_loopback_port()  # nothing listens there
    metrics_path = tmp_path / "metrics.jsonl"
    with _trainer(tiny_assets, metrics_path, f"http://127.0.0.1:{port}",
                  "trainer.atropos.fallback_to_grpo=false", "trainer.total_training_steps=2") as trainer:
        trainer.run_to_end(timeout_s=200)
    output = trainer.log(limit=10**7)
    assert trainer.returncode != 0
    assert f"environment service at http://127.0.0.1:{port} does not answer /health" in output
    assert "fallback_to_grpo=true" in output
    assert not metrics_path.exists() or not read_steps(metrics_path)


@pytest.mark.timeout(300)
def test_token_lists_of_the_wrong_length_stop_the_run_before_any_update(tiny_assets, tmp_path):
    batch_size = 4 * 4
    wrong = {"advantages": [[0.5] * 999] * batch_size, "scores": [0.0] * batch_size, "metrics": {}}
    with FaultInjectingServer() as server:
        server.inject("/evaluate_and_compute_advantages", Fault(status=200, body=wrong), times=100)
        metrics_path = tmp_path / "metrics.jsonl"
        with _trainer(tiny_assets, metrics_path, server.url,
                      "trainer.atropos.fallback_to_grpo=false", "trainer.total_training_steps=2") as trainer:
            trainer.run_to_end(timeout_s=240)
    output = trainer.log(limit=10**7)
    assert trainer.returncode != 0
    assert "AtroposProtocolError" in output and "999 token advantages for a response of" in output
    # Raised in the trainer's `_update_actor` before verl's update: no step was ever logged.
    assert not metrics_path.exists() or not read_steps(metrics_path)
