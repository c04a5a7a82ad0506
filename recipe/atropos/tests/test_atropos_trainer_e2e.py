"""RayGRPOAtroposTrainer end to end on CPU: verl's real trainer, the real environment service.

Each test runs `python -m verl.trainer.main_ppo` with config/gsm8k_grpo_cpu.yaml (CPU mode, tiny
model) as a subprocess, reads verl's metrics file as the run goes, and acts on the service.
"""

from __future__ import annotations

from pathlib import Path

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


SERVE_ARGS = ["serve", "--slurm", "false", "--host", "127.0.0.1", "--env.token_level", "true"]

# A restarted service that has already imported everything and waits for its flag file: a cold
# start under CI load took as long as 7 fallback steps (the trainer raced past step 12 before it
# answered), leaving too few steps to see it trained on again.
_STANDBY = """
import pathlib, sys, time
import uvicorn  # noqa: F401
from recipe.atropos.environments.gsm8k import GSM8KEnvironment
from recipe.atropos.environments.service import main
flag = pathlib.Path(sys.argv[1])
while not flag.exists():
    time.sleep(0.02)
sys.exit(main(GSM8KEnvironment, sys.argv[2:]))
"""


def _service(port: int) -> ServerProcess:
    argv = [PYTHON, "-m", "recipe.atropos.environments.gsm8k_server", *SERVE_ARGS, "--port", str(port)]
    return ServerProcess(argv, port=port, env=repo_env())


def _trainer(tiny_assets, metrics_path, api_url: str, *overrides: str) -> Launched:
    argv = trainer_argv("gsm8k_grpo_cpu", f"trainer.atropos.api_url={api_url}", *SMALL_RUN, *overrides)
    return Launched(argv, metrics_path.with_suffix(".log"), cpu_trainer_env(tiny_assets, metrics_path))


def _standby_service(port: int, flag: Path) -> ServerProcess:
    """A replacement for the service on ``port``, spawned now, serving once ``flag`` exists (then
    ``wait_ready()``: until then /health on ``port`` is the first service's)."""
    argv = [PYTHON, "-c", _STANDBY, str(flag), *SERVE_ARGS, "--port", str(port)]
    return ServerProcess(argv, port=port, env=repo_env()).spawn()


@pytest.mark.timeout(420)
def test_overrides_every_step_then_fallback_while_the_service_is_down_then_resume(tiny_assets, tmp_path):
    port = find_free_loopback_port()
    service = _service(port).start()
    metrics_path = tmp_path / "metrics.jsonl"
    follower, killed_after, healthy_again_after = StepFollower(metrics_path), None, None
    flag = tmp_path / "serve-again"
    restarted = _standby_service(port, flag)

    def logged_now() -> int:
        # Read after an event: steps from this one + 2 on asked after it (a step asks once the
        # step before it is logged).
        return max(s["step"] for s in read_steps(metrics_path))

    def act_on_steps() -> None:
        nonlocal killed_after, healthy_again_after
        for step in follower.new_steps():
            if step["step"] >= 2 and killed_after is None:
                service.stop()  # killed mid-run (the next step's request may already be out)
                killed_after = logged_now()
            if killed_after is not None and healthy_again_after is None and step["step"] >= killed_after + 3:
                flag.touch()
                restarted.wait_ready(startup_timeout_s=300)
                healthy_again_after = logged_now()

    try:
        with _trainer(tiny_assets, metrics_path, f"http://127.0.0.1:{port}", "trainer.total_training_steps=14") as trainer:
            trainer.run_to_end(timeout_s=360, watch=act_on_steps)
    finally:
        service.stop()
        restarted.stop()
    trainer.assert_exit(0)
    steps = {s["step"]: s for s in read_steps(metrics_path)}
    assert sorted(steps) == list(range(1, 15))  # training went on through the outage
    for n in (1, 2):  # the service's advantages on every step while it is up
        assert steps[n]["atropos/override_fraction"] == 1.0 and steps[n]["atropos/fallback"] == 0.0, n
        assert steps[n]["atropos/env/accuracy"] >= 0.0 and steps[n]["atropos/api_latency_s"] > 0
    # Down: the steps that asked after the kill and before the restart fall back (two at least).
    down = range(killed_after + 2, killed_after + 4)
    for n in down:
        assert steps[n]["atropos/fallback"] == 1.0 and steps[n]["atropos/override_fraction"] == 0.0, n
        assert steps[n]["atropos/fallback/unavailable"] == 1.0, n
    # Back: every step that asked once it was healthy again has overrides again.
    resumed = range(healthy_again_after + 2, 15)
    assert len(resumed) >= 2, (killed_after, healthy_again_after)
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
