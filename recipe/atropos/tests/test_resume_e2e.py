"""Resume end to end, in both modes: verl's real trainer on CPU is killed (SIGKILL) after a checkpoint
and mid-step, and the same command, run again (``trainer.resume_mode=auto``), goes on from the checkpoint.

Each test checks what a user would: every step is logged once, in order, in the metrics file
(the steps before the checkpoint kept from the killed run, the ones after it logged again); the run
loaded the checkpoint and went on with its data; the services it talks to, left running, are used
again. The kill is never a race: the trainer is made to wait at the step after the one the test
waits for (evaluate: the service holds that step's answer; trajectory: the environment sends half a
batch), so it is killed there whatever the machine's speed.

Trajectory mode also checks what happens to a group generated before the kill that run-api still
holds: it comes from weights that are gone, and its log-probs died with the killed trainer's
behaviour records, so it is dropped as stale (counted), never trained as fresh
(trajectory/behavior_journal.py); the run uses verl's rollout correction in bypass mode
(the gateway's recorded log-probs as the old policy), which the test checks too.
"""

from __future__ import annotations

import json

import pytest
import requests

from recipe.atropos.demo.run_report import read_jsonl, read_steps

from .conftest import PYTHON, repo_env
from .e2e_harness import (
    Launched,
    checkpointing,
    cpu_trainer_env,
    gateway_health,
    logged_steps,
    start_atropos_env,
    tiny_batch,
    trainer_argv,
    wait_for_trajectory_trainer,
)
from .servers import ServerProcess, find_free_loopback_port, start_atropos_run_api

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SAVE_FREQ, CHECKPOINT = 2, 2  # verl saves a checkpoint at step 2 (and at 4)


def _latest_checkpoint(directory) -> int:
    return int((directory / "latest_checkpointed_iteration.txt").read_text())


def _history(path, up_to: int) -> list[dict]:
    return [r for r in read_jsonl(path) if r["step"] <= up_to]


@pytest.mark.timeout(900)
def test_evaluate_mode_resumes_from_its_checkpoint_after_a_kill(tiny_assets, tmp_path):
    steps_wanted, held_step = 4, 4
    port = find_free_loopback_port()
    service = ServerProcess(
        [PYTHON, "recipe/atropos/tests/held_gsm8k_server.py", "serve", "--slurm", "false", "--host", "127.0.0.1",
         "--port", str(port), "--env.token_level", "true", "--env.hold_step", str(held_step), "--env.hold_s", "30"],
        port=port, env=repo_env(),
    ).start()
    metrics, checkpoints, dump = tmp_path / "metrics.jsonl", tmp_path / "checkpoints", tmp_path / "rollouts"
    argv = trainer_argv("gsm8k_grpo_cpu", f"trainer.atropos.api_url={service.url}", *tiny_batch(2, 4),
                        *checkpointing(checkpoints, SAVE_FREQ), f"trainer.total_training_steps={steps_wanted}",
                        f"trainer.rollout_data_dir={dump}")
    env = cpu_trainer_env(tiny_assets, metrics)
    try:
        with Launched(argv, tmp_path / "killed.log", env) as killed:
            # Step 3 logged, step 4's answer held by the service: the trainer cannot get further.
            killed.wait_until(lambda: logged_steps(metrics) == [1, 2, 3] and "holding the first request of step 4"
                              in service.log_text(), "step 3 logged and step 4 waiting", timeout_s=400)
            print("left after the kill:", killed.crash())
        history, killed_step3 = _history(metrics, CHECKPOINT), read_jsonl(dump / "3.jsonl")
        assert _latest_checkpoint(checkpoints) == CHECKPOINT
        with Launched(argv, tmp_path / "resumed.log", env) as resumed:
            resumed.run_to_end(timeout_s=400)
        resumed.assert_exit(0, service)
        log = resumed.log(limit=10**7)
    finally:
        service.stop()
    # Every step once, in order: the killed run's steps up to the checkpoint as they were, step 3
    # (logged by the killed run after the checkpoint) once more, by the resumed run.
    assert logged_steps(metrics) == [1, 2, 3, 4]
    assert _history(metrics, CHECKPOINT) == history
    assert f"Load from checkpoint folder: {checkpoints}/global_step_{CHECKPOINT}" in log
    assert _latest_checkpoint(checkpoints) == steps_wanted
    # verl's dataloader went on from the checkpoint: the resumed step 3 has the killed run's step-3
    # prompts, not step 1's (what a run that ignored the checkpoint would draw).
    prompts = {step: sorted({s["input"] for s in read_jsonl(dump / f"{step}.jsonl")}) for step in (1, 3)}
    assert prompts[3] == sorted({s["input"] for s in killed_step3}) != prompts[1]
    # The service, up all along, judged every resumed step: its advantages, no fallback.
    for step in read_steps(metrics)[CHECKPOINT:]:
        assert step["atropos/override_fraction"] == 1.0 and step["atropos/fallback"] == 0.0, step["step"]


@pytest.mark.timeout(900)
def test_trajectory_mode_resumes_and_drops_what_was_generated_before_the_kill(tiny_assets, tmp_path):
    steps_wanted = 5
    api, policy_port = start_atropos_run_api(), find_free_loopback_port()
    metrics, checkpoints, groups_log = tmp_path / "metrics.jsonl", tmp_path / "checkpoints", tmp_path / "groups.jsonl"
    argv = trainer_argv(
        "gsm8k_trajectory_cpu", f"trainer.atropos.trajectory_api_url={api.url}",
        f"trainer.atropos.policy_gateway_port={policy_port}", "trainer.atropos.batch_timeout_s=240",
        "actor_rollout_ref.rollout.engine_kwargs.hf.served_model_name=tiny",
        # Batches of 2 groups of 2; verl's rollout correction trains against the gateway's log-probs
        # (bypass mode), which needs samples the gateway never generated dropped.
        *tiny_batch(2, 2), "algorithm.rollout_correction.bypass_mode=true", "trainer.atropos.unmatched_samples=drop",
        *checkpointing(checkpoints, SAVE_FREQ), f"trainer.total_training_steps={steps_wanted}",
    )
    env = cpu_trainer_env(tiny_assets, metrics)
    environment = None
    try:
        with Launched(argv, tmp_path / "killed.log", env) as killed:
            wait_for_trajectory_trainer(killed, api.url, policy_port)
            # Two groups per weights version; one at the 4th (version 3, after step 3): the trainer
            # waits at step 4 with that group in run-api. At the 5th (the restarted trainer's first
            # version) three: one more than a batch, for the group the trainer is expected to drop.
            environment = start_atropos_env(
                "recipe/atropos/tests/resume_env.py", tiny_assets, api.url, policy_port, tmp_path / "env.log",
                "--env.max_num_workers", "1", "--env.gateway_url", f"http://127.0.0.1:{policy_port}",
                "--env.log_path", str(groups_log), "--env.turns", "3:1,4:3", group_size=2,
            )

            def environment_alive() -> None:
                assert environment.alive, environment.log()

            killed.wait_until(lambda: logged_steps(metrics) == [1, 2, 3] and _queued(api.url) == 1,
                              "step 3 logged and half a batch in run-api", timeout_s=400, watch=environment_alive)
            print("left after the kill:", killed.crash())
        assert _queued(api.url) == 1 and gateway_health(policy_port) is None
        history = _history(metrics, CHECKPOINT)
        with Launched(argv, tmp_path / "resumed.log", env) as resumed:
            resumed.run_to_end(timeout_s=400, watch=environment_alive)
        resumed.assert_exit(0, environment)
        log = resumed.log(limit=10**7)
    finally:
        if environment is not None:
            environment.stop()
        api.stop()
    assert logged_steps(metrics) == list(range(1, steps_wanted + 1))
    assert _history(metrics, CHECKPOINT) == history
    assert f"Load from checkpoint folder: {checkpoints}/global_step_{CHECKPOINT}" in log
    sent = [json.loads(line) for line in groups_log.read_text().splitlines()]
    # The restarted gateway's weights version went on from the checkpoint's step (2), not from 0
    # and not from the killed run's 3: the environment's 5th turn generated with version 2.
    assert [(g["turn"], g["version"]) for g in sent if g["turn"] in (3, 4)] == [(3, 3), (4, 2), (4, 2), (4, 2)]
    steps = {s["step"]: s for s in read_steps(metrics)}
    # The group generated by step 3's weights (thrown away by the restart), still in run-api, was
    # dropped as stale once the resumed run pulled it (step 3 or 4: run-api hands out its newest
    # complete batch first), never trained; nothing was unmatched.
    stale = [steps[n]["atropos/dropped_groups/stale"] for n in sorted(steps)]
    assert sum(stale) == 1 and stale[0] == stale[1] == 0, stale
    assert all(s["atropos/dropped_groups/unmatched"] == 0 and s["atropos/behavior_matched_fraction"] == 1.0
               for s in steps.values())
    assert steps[3]["atropos/staleness/max"] == 0  # the first resumed step: the restored weights' groups
    for n, step in steps.items():
        # Bypass mode: no old log-prob recomputation; the old policy is the gateway's record of the
        # sampling weights, so a step trained on its own weights' samples starts at ratio 1: |ppo_kl|
        # measured at most 4.5e-8 (the CPU server's and the actor's log-probs of the same weights),
        # against 1.6e-4 and 4.2e-4 for steps with samples one version old, and about 6 (the
        # log-probs' size) had the old policy not been the records.
        assert "timing_s/old_log_prob" not in step, n
        if step["atropos/staleness/max"] == 0:
            assert abs(step["actor/ppo_kl"]) < 1e-5, (n, step["actor/ppo_kl"])


def _queued(api_url: str) -> int:
    """Groups in run-api's queue (not yet in a batch)."""
    try:
        return requests.get(f"{api_url}/status", timeout=2).json()["queue_size"]
    except (requests.RequestException, ValueError, KeyError):
        return -1
