"""Separate rollout placement end to end on CPU (trainer.atropos.rollout_placement=separate, docs/async.md).

One run, with what a user would check: atroposlib's run-api, the repo's atroposlib GSM8K environment
generating through the trainer's policy gateway, and verl's real trainer on verl's separation seam
with the HF rollout server on a pool (a process) of its own, config separate_trajectory_cpu. After
step 2 the rollout server's process is killed (SIGKILL, as the OOM killer would):

- requests were served while the actor updated: a probe sending completions back to back through
  the gateway gets answers inside the actor-update windows the trainer logged (with colocated
  placement none can: the gateway is closed then), and the gateway reports requests in flight during
  updates (``atropos/async/update_served_fraction``). How many *trained* samples the gateway recorded
  during an update (the rollout dump's ``generated_at``) is printed, not asserted: the trainer trains
  the environment's backlog oldest first, so in some runs none of them (measured: 20 of 48 twice, 0
  of 48 once);
- every trained group is within ``max_staleness``, and what was trained is what was sampled: every
  sample's tokens are a completion the gateway relayed, with the log-probs the server returned;
- the killed server is started again (once) and, once the gateway lets requests through to it, holds
  the weights version the gateway reports; the run completes every step; then nothing it started is
  left running.
"""

from __future__ import annotations

import math
import signal
import threading
import time

import psutil
import pytest
import requests

from recipe.atropos.demo.run_report import read_jsonl, read_steps

from .e2e_harness import (
    Launched, cpu_trainer_env, descendants, gateway_health, gone, http_health, start_atropos_env, tiny_batch,
    trainer_argv, wait_for_trajectory_trainer,
)
from .servers import find_free_loopback_port, start_atropos_run_api

pytestmark = [pytest.mark.ray, pytest.mark.slow]

STEPS, KILL_AFTER_STEP, MAX_STALENESS = 6, 2, 2


def _rollout_server(trainer: Launched) -> psutil.Process | None:
    """The HF rollout server's process (Ray names it after the actor class)."""
    for process in descendants(trainer.popen.pid):
        try:
            if " ".join(process.cmdline()).startswith("ray::HFRolloutServer"):
                return process
        except psutil.Error:
            continue
    return None


@pytest.mark.timeout(1200)
def test_separate_rollout_serves_during_updates_and_survives_its_servers_death(tiny_assets, tmp_path):
    api = start_atropos_run_api()
    policy_port = find_free_loopback_port()
    metrics, dump_dir = tmp_path / "metrics.jsonl", tmp_path / "dump"
    argv = trainer_argv(
        "separate_trajectory_cpu", *tiny_batch(2, 4),
        f"trainer.atropos.trajectory_api_url={api.url}", f"trainer.atropos.policy_gateway_port={policy_port}",
        "trainer.atropos.batch_timeout_s=240", f"trainer.atropos.max_staleness={MAX_STALENESS}",
        "actor_rollout_ref.rollout.engine_kwargs.hf.served_model_name=tiny", f"trainer.rollout_data_dir={dump_dir}",
        f"trainer.total_training_steps={STEPS}", "trainer.val_before_train=false", "trainer.test_freq=-1",
    )
    killed = None
    try:
        with Launched(argv, tmp_path / "trainer.log", env=cpu_trainer_env(tiny_assets, metrics)) as trainer:
            # Start-up: two worker pools (trainer's, rollout's); minutes on two busy cores.
            wait_for_trajectory_trainer(trainer, api.url, policy_port, timeout_s=480)
            with start_atropos_env("recipe/atropos/environments/atropos_gsm8k_env.py", tiny_assets, api.url,
                                   policy_port, tmp_path / "env.log", "--env.max_num_workers", "2") as env, \
                    Probe(policy_port) as probe:
                server = trainer.wait_until(lambda: _rollout_server(trainer), "the rollout server's process", 60)
                trainer.wait_until(lambda: len(read_steps(metrics)) >= KILL_AFTER_STEP if metrics.exists() else False,
                                   f"step {KILL_AFTER_STEP}", 300, watch=lambda: _alive(env))
                old_servers = gateway_health(policy_port)["servers"]
                killed = server.pid
                server.send_signal(signal.SIGKILL)
                # Its successor serves with the weights the gateway says the servers hold.
                versions = trainer.wait_until(lambda: _successor_versions(policy_port, old_servers),
                                              "the restarted server behind the open gateway", 240,
                                              watch=lambda: _alive(env), every_s=0.1)
                assert versions[0] == versions[1], f"restarted server at version {versions[0]}, gateway {versions[1]}"
                trainer.run_to_end(timeout_s=360, watch=lambda: _alive(env))
            trainer.assert_exit(0, env)
            # Nothing the trainer started (Ray's processes, the restarted server) outlives it.
            tree = list(trainer._tree)
            psutil.wait_procs([p for p in tree if p.is_running()], timeout=30)
            assert gone(tree), [f"{p.pid} {p.name()}" for p in tree if p.is_running()]
    finally:
        api.stop()
    assert killed is not None
    steps = read_steps(metrics)
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    # The killed server came back once, and the steps after it trained (they need its generation).
    restarts = [s["atropos/async/server_restarts"] for s in steps]
    print("server restarts by step:", restarts)
    assert restarts[KILL_AFTER_STEP - 1] == 0 and restarts[-1] == 1, restarts
    assert "was started again" in trainer.log(limit=10**7)
    _check_overlap_bound_and_samples(steps, dump_dir, probe.answered)


def _check_overlap_bound_and_samples(steps: list[dict], dump_dir, answered: list[float]) -> None:
    # Requests were answered while the actor updated: the probe's answers inside update windows.
    windows = [(s["atropos/async/update_started_at"], s["atropos/async/update_finished_at"]) for s in steps]
    inside = [t for t in answered if any(a < t < b for a, b in windows)]
    served = [s["atropos/async/update_served_fraction"] for s in steps]
    generated = [t for step in range(1, STEPS + 1) for row in read_jsonl(dump_dir / f"{step}.jsonl")
                 if (t := row["generated_at"]) is not None]
    during = [t for t in generated if any(a <= t <= b for a, b in windows)]
    print(f"probe: {len(inside)} of {len(answered)} answers inside an update; served fraction by step:",
          [round(f, 2) for f in served], f"; {len(during)} of {len(generated)} trained samples generated during one")
    assert inside, (windows, answered)
    assert max(served) > 0

    for s in steps:
        # Within the bound: nothing older than max_staleness versions was trained.
        assert s["atropos/staleness/max"] <= MAX_STALENESS, s
        assert math.isclose(sum(s[f"atropos/staleness/fraction_{k}"] for k in range(MAX_STALENESS + 1)), 1.0)
        # What was trained is what was sampled: every sample's tokens are a completion the gateway
        # relayed, whose recorded log-probs are those the server returned to the environment.
        assert s["atropos/behavior_matched_fraction"] == 1.0, s
        # Found after exactly the prompt ids the server was sent: no other prompt's record of the same tokens.
        assert s["atropos/behavior_in_context_fraction"] == 1.0, s
        assert s["atropos/behavior_logprob_env_max_abs_diff"] < 1e-5, s
        assert s["atropos/async/weight_sync_s"] > 0


def _successor_versions(policy_port: int, old_servers: list[str]) -> tuple[int, int] | None:
    """(the new server's weights version, the gateway's), read while the open gateway's version did
    not change; None until the gateway lists a new server."""
    before = gateway_health(policy_port)
    if before is None or before["servers"] == old_servers or before["gate"] != "open":
        return None
    server = http_health(before["servers"][0])
    after = gateway_health(policy_port)
    if server is None or after is None or (after["gate"], after["global_steps"]) != ("open", before["global_steps"]):
        return None  # a weight swap in between: read again
    return server["global_steps"], before["global_steps"]


class Probe:
    """Completions sent back to back through the gateway on two threads while it runs; ``answered``:
    the wall-clock times of the answers (HTTP 200) that came back."""

    def __init__(self, policy_port: int):
        self.url = f"http://127.0.0.1:{policy_port}/v1/completions"
        self.answered: list[float] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(2)]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                answer = requests.post(self.url, json={"model": "tiny", "prompt": "1 + 1 =", "max_tokens": 4}, timeout=60)
            except requests.RequestException:
                time.sleep(0.2)
                continue
            if answer.status_code == 200:
                self.answered.append(time.time())
            else:  # the killed server (502) until its successor serves
                time.sleep(0.2)

    def __enter__(self) -> Probe:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=70)


def _alive(env: Launched) -> None:
    assert env.alive, f"the environment exited ({env.returncode}):\n{env.log()}"
