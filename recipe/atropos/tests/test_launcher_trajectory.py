"""The launcher in trajectory mode (trainer.atropos.mode: trajectory).

Order: atroposlib's run-api (real), the trainer pointed at it, then, once the trainer's policy
endpoint answers, the Atropos environments. The quick tests use stand-ins for the trainer and the
environment (``launcher_traj_*.py``); one test runs the real thing end to end on CPU. Run under the
loopback-only wrapper (``../shared/bin/loopback-only``).
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from recipe.atropos.demo.run_report import read_steps
from recipe.atropos.tests.conftest import REPO_ROOT, repo_env
from recipe.atropos.tests.e2e_harness import Launched, cpu_trainer_env
from recipe.atropos.tests.servers import find_free_loopback_port
from recipe.atropos.tests.test_launcher import LAUNCHER, Launch, is_gone, port_is_free

CONFIG = REPO_ROOT / "recipe" / "atropos" / "config" / "gsm8k_trajectory_cpu.yaml"
FAST = ["launcher.poll_interval_s=0.1", "launcher.progress_interval_s=1", "launcher.shutdown_grace_s=5"]
STUB_TRAINER = "launcher.trainer.command=[python,-m,recipe.atropos.tests.launcher_traj_trainer]"


def stub_environment(die_first: int = 0, max_restarts: int = 3) -> str:
    """Override: one stand-in environment, using every placeholder, with quick restarts."""
    return (
        "launcher.environments=[{name:stub,command:[python,-m,recipe.atropos.tests.launcher_traj_env,"
        "--policy,'{policy_base_url}',--api,'{trajectory_api_url}',--model,'{model}',--tokenizer,'{tokenizer}',"
        f"--die-first,'{die_first}'],env:{{TRAJ_NAME:'{{name}}',TRAJ_API:'{{trajectory_api_url}}'}},"
        f"max_restarts:{max_restarts},restart_backoff_s:0.2}}]"
    )


def launch(tmp_path: Path, *args: str, env: dict[str, str] | None = None, dry_run: bool = False) -> Launch:
    run_dir = tmp_path / "run"
    out_path, err_path = tmp_path / "launcher.out", tmp_path / "launcher.err"
    extra = {
        "TRAJ_TRAINER_REPORT": str(tmp_path / "trainer.json"),
        "TRAJ_ENV_RECORD": str(tmp_path / "env.jsonl"),
        **(env or {}),
    }
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        popen = subprocess.Popen(
            [sys.executable, str(LAUNCHER), "--config", str(CONFIG), "--run-dir", str(run_dir),
             *(["--dry-run"] if dry_run else []), *args],
            stdout=out, stderr=err, cwd=REPO_ROOT, env=repo_env(**extra),
        )
    return Launch(popen, run_dir, out_path, err_path)


def env_starts(tmp_path: Path) -> list[dict]:
    path = tmp_path / "env.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def trainer_report(tmp_path: Path) -> dict:
    path = tmp_path / "trainer.json"
    return json.loads(path.read_text()) if path.exists() else {}


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_dry_run_shows_run_api_then_trainer_then_environments_and_no_environment_service(tmp_path):
    run = launch(tmp_path, "trainer.total_training_steps=2", dry_run=True)
    assert run.wait(30) == 0, run.stderr()
    out = run.stdout()
    steps = ["1. start run-api", "2. start trainer", "3. wait for the trainer's policy endpoint", "4. start env-gsm8k"]
    positions = [out.index(s) for s in steps]
    assert positions == sorted(positions), out
    # No environment service, no inference workers, nothing registered.
    assert "start environment" not in out and "gsm8k_server" not in out
    assert "register" not in out and "inference" not in out
    assert "python -m atroposlib.cli.run_api --host 127.0.0.1 --port 8000" in out
    assert "GET http://127.0.0.1:8000/ answers 200" in out
    assert "GET http://127.0.0.1:8001/health answers 200" in out
    trainer_line = next(line for line in out.splitlines() if "verl.trainer.main_ppo" in line)
    assert "--config-name gsm8k_trajectory_cpu trainer.total_training_steps=2" in trainer_line
    assert trainer_line.endswith("trainer.atropos.trajectory_api_url=http://127.0.0.1:8000")
    assert "trainer.atropos.api_url=" not in trainer_line
    env_line = next(line for line in out.splitlines() if "atropos_gsm8k_env.py serve" in line)
    for expected in ("--openai.base_url http://127.0.0.1:8001/v1", "--openai.model_name policy",
                     "--env.rollout_server_url http://127.0.0.1:8000", "--env.group_size 4"):
        assert expected in env_line, env_line
    assert "{" not in env_line, env_line
    assert not run.run_dir.exists()


@pytest.mark.timeout(60)
def test_dry_run_follows_ports_and_keeps_a_trajectory_api_url_given_on_the_command_line(tmp_path):
    run = launch(
        tmp_path, "launcher.trajectory_api.port=8123", "trainer.atropos.policy_gateway_port=8124",
        "trainer.atropos.trajectory_api_url=http://127.0.0.1:9999", dry_run=True,
    )
    assert run.wait(30) == 0, run.stderr()
    out = run.stdout()
    assert "--port 8123" in out and "GET http://127.0.0.1:8124/health" in out
    trainer_line = next(line for line in out.splitlines() if "verl.trainer.main_ppo" in line)
    assert trainer_line.count("trajectory_api_url=") == 1
    assert trainer_line.endswith("trainer.atropos.trajectory_api_url=http://127.0.0.1:9999")
    env_line = next(line for line in out.splitlines() if "atropos_gsm8k_env.py serve" in line)
    assert "--env.rollout_server_url http://127.0.0.1:9999" in env_line
    assert "--openai.base_url http://127.0.0.1:8124/v1" in env_line


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.atropos.policy_gateway_port=0", "has port 0"),
        ("launcher.environments=[]", "launcher.environments is empty"),
        ("trainer.atropos.mode=judge", "trainer.atropos.mode must be one of"),
        ("launcher.environments=[{name:a,command:[x]},{name:a,command:[y]}]", "names must be unique"),
    ],
)
def test_trajectory_config_mistakes_are_refused_before_anything_starts(tmp_path, override, message):
    run = launch(tmp_path, override, dry_run=True)
    assert run.wait(30) == 2, run.stderr()
    assert message in run.stderr()


# --------------------------------------------------------------------------------------------
# Real launches with stand-ins (run-api is real)
# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_launch_orders_substitutes_logs_and_restarts_a_dying_environment(tmp_path, tiny_assets):
    api_port, policy_port = find_free_loopback_port(), find_free_loopback_port()
    done = tmp_path / "done"
    run = launch(
        tmp_path, STUB_TRAINER, stub_environment(die_first=1), *FAST,
        f"launcher.trajectory_api.port={api_port}", f"trainer.atropos.policy_gateway_port={policy_port}",
        env={"TRAJ_WAIT_FOR": str(done), "TRAJ_POLICY_DELAY_S": "2", "VERL_CPU_MODEL_PATH": str(tiny_assets.model_dir)},
    )
    try:
        run.wait_until(lambda: len(env_starts(tmp_path)) >= 2, "the environment's restart", timeout_s=60)
        time.sleep(0.5)
        state = run.state()
        assert state["mode"] == "trajectory"
        assert state["services"]["env-stub"]["restarts"] == 1
        assert state["services"]["env-stub"]["status"] == "running"
        done.touch()
        assert run.wait(30) == 0, run.stderr()
    finally:
        if run.popen.poll() is None:
            run.popen.kill()
    err = run.stderr()
    api_url, policy_url = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{policy_port}/v1"

    # The trainer was pointed at the real run-api, which answered.
    report = trainer_report(tmp_path)
    assert report["trajectory_api_url"] == api_url and report["api_status"] == 200
    # Order: run-api healthy, trainer, policy endpoint healthy, then the environment.
    order = ["run-api is healthy", "trainer started", "policy endpoint is healthy", "started env-stub"]
    positions = [err.index(s) for s in order]
    assert positions == sorted(positions), err
    first = env_starts(tmp_path)[0]
    assert first["started_at"] >= report["policy_up_at"]
    assert first["policy_status"] == 200
    # Placeholders in the command and in the environment variables.
    argv = first["argv"]
    assert argv[argv.index("--policy") + 1] == policy_url
    assert argv[argv.index("--api") + 1] == api_url
    assert argv[argv.index("--model") + 1] == "policy"  # the config's served_model_name
    assert argv[argv.index("--tokenizer") + 1] == str(tiny_assets.model_dir)
    assert first["env"]["TRAJ_NAME"] == "stub" and first["env"]["TRAJ_API"] == api_url
    # No environment service or registration in this mode.
    assert "environment service" not in err and "register" not in err
    # The crash and the restart.
    assert "environment env-stub exited with code 3" in err
    assert "restarting the environment env-stub" in err and "the trainer waits for batches" in err
    # Logs: one per service.
    env_log = (run.run_dir / "env-stub.log").read_text()
    assert env_log.count("launcher: start") == 2 and "stand-in environment: crashing" in env_log
    assert (run.run_dir / "run-api.log").stat().st_size > 0
    assert "stand-in trainer: done, exit 0" in (run.run_dir / "trainer.log").read_text()
    for info in run.state()["services"].values():
        assert is_gone(info["pid"])
    assert port_is_free(api_port) and port_is_free(policy_port)


@pytest.mark.timeout(90)
def test_environment_that_keeps_dying_ends_the_run(tmp_path):
    api_port, policy_port = find_free_loopback_port(), find_free_loopback_port()
    run = launch(
        tmp_path, STUB_TRAINER, stub_environment(die_first=99, max_restarts=1), *FAST,
        f"launcher.trajectory_api.port={api_port}", f"trainer.atropos.policy_gateway_port={policy_port}",
        env={"TRAJ_WAIT_FOR": str(tmp_path / "never"), "TRAJ_POLICY_DELAY_S": "0.2"},
    )
    assert run.wait(60) == 1, run.stderr()
    assert "giving up after 1 restart(s) in a row (launcher.environments[0].max_restarts=1)" in run.stderr()
    assert len(env_starts(tmp_path)) == 2
    for info in run.state()["services"].values():
        assert is_gone(info["pid"])


@pytest.mark.timeout(90)
def test_sigterm_stops_run_api_trainer_and_environments(tmp_path):
    api_port, policy_port = find_free_loopback_port(), find_free_loopback_port()
    run = launch(
        tmp_path, STUB_TRAINER, stub_environment(), *FAST,
        f"launcher.trajectory_api.port={api_port}", f"trainer.atropos.policy_gateway_port={policy_port}",
        env={"TRAJ_WAIT_FOR": str(tmp_path / "never"), "TRAJ_POLICY_DELAY_S": "0.2"},
    )
    try:
        run.wait_until(lambda: len(env_starts(tmp_path)) == 1, "the environment", timeout_s=60)
        launcher = psutil.Process(run.popen.pid)
        started = {p.pid: p.create_time() for p in launcher.children(recursive=True)}
        assert len(started) >= 3, started  # run-api, trainer, environment
        run.popen.send_signal(signal.SIGTERM)
        assert run.wait(30) == 128 + signal.SIGTERM
    finally:
        if run.popen.poll() is None:
            run.popen.kill()
    left = [pid for pid, created in started.items() if not is_gone(pid, created)]
    assert not left, f"still running after SIGTERM to the launcher: {left}"
    assert port_is_free(api_port) and port_is_free(policy_port)
    assert "SIGTERM received" in run.stderr()


# --------------------------------------------------------------------------------------------
# The real thing, on CPU
# --------------------------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_real_trajectory_run_through_the_launcher_trains_two_steps(tmp_path, tiny_assets):
    metrics, run_dir = tmp_path / "m.jsonl", tmp_path / "run"
    argv = [sys.executable, str(REPO_ROOT / "recipe" / "atropos" / "launch_atropos_verl_services.py"),
            "--config", str(CONFIG), "--run-dir", str(run_dir),
            "trainer.total_training_steps=2", "+ray_kwargs.ray_init.include_dashboard=false"]
    # Meanwhile: no process of the run (Ray's included) listens on every interface.
    wide_open: set[tuple[str, str, int]] = set()
    with Launched(argv, tmp_path / "launcher.log", cpu_trainer_env(tiny_assets, metrics)) as launcher:
        sampler = threading.Thread(target=_sample_wildcard_listeners, args=(launcher.popen, wide_open), daemon=True)
        sampler.start()
        launcher.run_to_end(timeout_s=380)
        # The launcher stopped every service it started (checked before the harness cleans up).
        state = run_dir / "services.json"
        services = json.loads(state.read_text())["services"].values() if state.exists() else []
        left = [info for info in services if not is_gone(info["pid"])]
    sampler.join(timeout=10)
    logs = "".join(
        f"\n--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(run_dir.glob("*.log"))
    )
    assert launcher.returncode == 0, launcher.log(4000) + logs
    steps = read_steps(metrics)
    assert [s["step"] for s in steps] == [1, 2], logs
    assert all(s["atropos/batch_groups"] == 2 for s in steps), steps
    out = launcher.log(limit=10**7)  # the launcher's stdout and stderr
    assert out.index("run-api is healthy") < out.index("policy endpoint is healthy") < out.index("started env-gsm8k")
    assert not left, left
    assert not wide_open, f"listening on every interface during the run: {sorted(wide_open)}"


def _sample_wildcard_listeners(launcher: subprocess.Popen, found: set) -> None:
    """Until the launcher exits: (process name, address, port) of every TCP socket its descendants
    listen on with a wildcard address."""
    while launcher.poll() is None:
        try:
            pids = {p.pid: p for p in psutil.Process(launcher.pid).children(recursive=True)}
            for conn in psutil.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN and conn.pid in pids and conn.laddr.ip in ("0.0.0.0", "::", ""):
                    with contextlib.suppress(psutil.Error):
                        found.add((pids[conn.pid].name(), conn.laddr.ip, conn.laddr.port))
        except psutil.Error:
            pass
        time.sleep(1)
