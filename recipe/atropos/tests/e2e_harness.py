"""The end-to-end tests' one harness: launch the real trainer (and its services), collect, stop.

Every test that runs ``python -m verl.trainer.main_ppo`` on CPU, directly or through the launcher or
the demo, starts and stops it here, so that a new e2e test (another environment, another mode) is
a few lines:

    from .e2e_harness import Launched, cpu_trainer_env, tiny_batch, trainer_argv

    def test_x(tiny_assets, tmp_path):
        metrics = tmp_path / "metrics.jsonl"
        with Launched(trainer_argv("gsm8k_grpo_cpu", "trainer.total_training_steps=2", *tiny_batch(4, 4)),
                      tmp_path / "trainer.log", env=cpu_trainer_env(tiny_assets, metrics)) as trainer:
            trainer.run_to_end(timeout_s=300)
        trainer.assert_exit(0)
        steps = read_steps(metrics)

API
- :func:`cpu_trainer_env` ``(assets, metrics_path=None, **extra)``: the environment of a CPU run of the
  tiny offline model (``VERL_PLATFORM=cpu``, the CPU module, the model and data of ``assets``, verl's
  file logger at ``metrics_path``), on top of :func:`conftest.repo_env`.
- :func:`trainer_argv` ``(config_name, *overrides)``: ``python -m verl.trainer.main_ppo`` with a config of
  ``recipe/atropos/config``, Ray's dashboard off, then ``overrides``.
- :func:`tiny_batch` ``(prompts, n, micro=None)``: the overrides of a batch of ``prompts`` x ``n`` samples
  (one mini-batch; micro-batches of ``micro`` rows, default the whole batch).
- :func:`checkpointing` ``(directory, save_freq)``: the overrides that save a checkpoint every
  ``save_freq`` steps under ``directory`` and resume from the latest there (``resume_mode=auto``).
- :class:`Launched` ``(argv, log_path, env=None)``: a process in its own session, its output in
  ``log_path``. ``alive``, ``assert_alive()``, ``returncode``, ``log(limit)``, ``wait_until(condition, what, timeout_s,
  watch=None)`` (fails with the log if the process exits first), ``run_to_end(timeout_s, watch=None,
  every_s=0.2)`` (polls until it exits, calling ``watch()`` each time; at the deadline it is stopped
  and the test fails),
  ``crash(grace_s=3)`` (SIGKILL to the process alone, as a crash would; what it started, Ray's
  processes included, is killed if still there after ``grace_s``), ``stop()`` (SIGTERM, then SIGKILL, to
  the whole tree), ``assert_exit(code, *others)`` (on failure, the logs of it and of ``others``,
  Launched or servers.ServerProcess).
  As a context manager it stops everything on the way out.
- :func:`start_atropos_env` ``(script, assets, api_url, policy_port, log_path, *extra, group_size=4,
  max_tokens=16)``: an atroposlib environment of this repo (``serve``) generating through the
  trainer's policy gateway and pushing to run-api; ``extra`` are more ``--env.`` / ``--openai.`` flags.
- :func:`wait_for_trajectory_trainer` ``(trainer, api_url, policy_port, timeout_s)``: until the trainer's
  policy gateway answers and the trainer registered with run-api (environments start after that).
- :func:`http_health` ``(root_url)``, :func:`gateway_health` ``(port)``: ``GET /health`` as a dict, or None.
- :func:`logged_steps` ``(metrics_path)``: the step of every training line of verl's metrics file,
  in file order, repeats included (``demo.run_report.read_steps`` gives the metrics, one per step).
- :func:`descendants` ``(pid)`` and :func:`gone` ``(processes)``: a process tree, and whether it has exited.

Run every test that uses it under a loopback-only network namespace (as `.ci/run` does).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil
import requests

from recipe.atropos.trajectory.runapi_client import AtroposRunAPIClient

from .conftest import PYTHON, REPO_ROOT, repo_env
from .servers import ServerProcess

__all__ = [
    "Launched", "checkpointing", "cpu_trainer_env", "descendants", "gateway_health", "gone", "http_health",
    "logged_steps", "start_atropos_env", "tiny_batch", "trainer_argv", "wait_for_trajectory_trainer",
]

CONFIG_DIR = "recipe/atropos/config"
TREE_LISTING_S = 2.0  # how often a poll lists the processes a Launched started


def cpu_trainer_env(assets, metrics_path: Path | None = None, **extra: str) -> dict[str, str]:
    """The environment of a CPU trainer on the tiny offline model and data of ``assets``."""
    env = {
        "VERL_PLATFORM": "cpu", "VERL_USE_EXTERNAL_MODULES": "recipe.atropos.cpu",
        "VERL_CPU_MODEL_PATH": str(assets.model_dir), "VERL_CPU_TRAIN_FILES": str(assets.train_file),
        "VERL_CPU_VAL_FILES": str(assets.test_file), "WANDB_MODE": "disabled",
    }
    if metrics_path is not None:
        env["VERL_FILE_LOGGER_PATH"] = str(metrics_path)
    return repo_env(**env, **extra)


def trainer_argv(config_name: str, *overrides: str) -> list[str]:
    """verl's entry point on one of the recipe's configs."""
    return [PYTHON, "-m", "verl.trainer.main_ppo", "--config-path", CONFIG_DIR, "--config-name", config_name,
            "+ray_kwargs.ray_init.include_dashboard=false", *overrides]


def tiny_batch(prompts: int, n: int, micro: int | None = None) -> list[str]:
    """One mini-batch of ``prompts`` x ``n`` samples, micro-batches of ``micro`` rows (all by default)."""
    micro = micro or prompts * n
    return [f"data.train_batch_size={prompts}", f"actor_rollout_ref.rollout.n={n}",
            f"actor_rollout_ref.actor.ppo_mini_batch_size={prompts}",
            f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={micro}",
            f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={micro}",
            f"actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu={micro}"]


def checkpointing(directory: Path, save_freq: int) -> list[str]:
    """verl's checkpoints every ``save_freq`` steps in ``directory``; a run started again resumes from the latest."""
    return [f"trainer.default_local_dir={directory}", f"trainer.save_freq={save_freq}", "trainer.resume_mode=auto"]


def descendants(pid: int) -> list[psutil.Process]:
    """``pid`` and every process it started (that has not been reparented yet)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def gone(processes: Sequence[psutil.Process]) -> bool:
    return not [p for p in processes if _running(p)]


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Launched:
    """A process of the test (the trainer, the launcher, the demo, an environment) in its own session."""

    def __init__(self, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None):
        self.argv = list(argv)
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "wb")
        self.popen = subprocess.Popen(self.argv, cwd=REPO_ROOT, env=env if env is not None else repo_env(),
                                      stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        self._tree: list[psutil.Process] = []
        self._tree_listed_at = -float("inf")
        self.name = " ".join(Path(word).name for word in self.argv[1:3])  # e.g. "-m verl.trainer.main_ppo"

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def log(self, limit: int = 6000) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[-limit:]

    def assert_alive(self) -> None:
        """Fails, with its log, when the process has exited (a ``watch`` for the services of a run)."""
        assert self.alive, f"{self.name} exited ({self.returncode}):\n{self.log()}"

    def _remember_tree(self, every_s: float = 0.0) -> None:
        """Every process it has started so far (kept: they are reparented once it dies). Listing them
        scans every process of the machine (about 0.1 s under load): polls do it every ``every_s``."""
        now = time.monotonic()
        if now - self._tree_listed_at < every_s:
            return
        self._tree_listed_at = now
        known = {p.pid for p in self._tree}
        self._tree += [p for p in descendants(self.popen.pid) if p.pid not in known]

    def wait_until(self, condition: Callable[[], object], what: str, timeout_s: float,
                   watch: Callable[[], None] | None = None, every_s: float = 0.2) -> object:
        """Poll ``condition`` until it is truthy (its value is returned); fails if the process exits
        first or ``timeout_s`` passes. ``watch`` runs every poll (e.g. asserts a service is alive)."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = condition()
            if value:
                return value
            assert self.alive, f"{self.name} exited ({self.returncode}) before {what}:\n{self.log()}"
            assert time.monotonic() < deadline, f"no {what} within {timeout_s} s:\n{self.log()}"
            if watch is not None:
                watch()
            self._remember_tree(every_s=TREE_LISTING_S)
            time.sleep(every_s)

    def run_to_end(self, timeout_s: float, watch: Callable[[], None] | None = None, every_s: float = 0.2) -> int:
        """Until the process exits; its exit code. Still running after ``timeout_s``: stopped, with its
        tree, and the test fails with its log."""
        deadline = time.monotonic() + timeout_s
        while self.alive and time.monotonic() < deadline:
            if watch is not None:
                watch()
            self._remember_tree(every_s=TREE_LISTING_S)
            time.sleep(every_s)
        if self.alive:
            self.stop()
            raise AssertionError(f"{self.name} still running after {timeout_s:g} s:\n{self.log()}")
        return self.popen.wait()

    def crash(self, grace_s: float = 3.0) -> list[str]:
        """SIGKILL to this process alone, as the OOM killer or a lost node would. The processes it
        started exit on their own (Ray's fate sharing) or are killed after ``grace_s``; returns those
        (Ray's dashboard and runtime-env agents outlive their raylet by about a minute)."""
        self._remember_tree()
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(30)
        deadline = time.monotonic() + grace_s
        while not gone(self._tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [_name(p) for p in self._tree if _running(p)]
        self._kill_tree()
        return left

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM to its process group, SIGKILL after ``grace_s``; then every process it started."""
        self._remember_tree()
        if self.alive:
            _signal_group(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                _signal_group(self.popen.pid, signal.SIGKILL)
                self.popen.wait(30)
        self._kill_tree()
        self._log.close()

    def _kill_tree(self) -> None:
        for process in self._tree:
            if _running(process):
                try:
                    process.kill()
                except psutil.NoSuchProcess:
                    pass
        psutil.wait_procs([p for p in self._tree if _running(p)], timeout=10)

    def assert_exit(self, code: int = 0, *others: Launched | ServerProcess) -> None:
        """The exit code, or a failure with this process's log and the tails of ``others``' logs."""
        if self.returncode != code:
            logs = "".join(f"\n--- {other.log_path.name}\n{_log_of(other)[-3000:]}" for other in others)
            raise AssertionError(f"exit {self.returncode}, expected {code}:\n{self.log()}{logs}")

    def __enter__(self) -> Launched:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _log_of(process: Launched | ServerProcess) -> str:
    return process.log(limit=10**6) if isinstance(process, Launched) else process.log_text()


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _name(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline()[:3]) or process.name()
    except psutil.Error:
        return "?"


def http_health(root_url: str) -> dict | None:
    try:
        return requests.get(f"{root_url}/health", timeout=2).json()
    except (requests.RequestException, ValueError):
        return None


def gateway_health(port: int) -> dict | None:
    """The trainer's policy gateway's ``/health`` on loopback, or None while it does not answer."""
    return http_health(f"http://127.0.0.1:{port}")


def wait_for_trajectory_trainer(trainer: Launched, api_url: str, policy_port: int, timeout_s: float = 240) -> None:
    """Until the trainer's policy gateway answers and it registered with run-api (its first step asks
    for a batch): environments started earlier would find no policy."""
    client = AtroposRunAPIClient(api_url, timeout=5, retry_attempts=1, max_wait_time=5)
    trainer.wait_until(lambda: gateway_health(policy_port) is not None and client.info().batch_size > 0,
                       "policy gateway and run-api registration", timeout_s, every_s=0.5)


def start_atropos_env(script: str, assets, api_url: str, policy_port: int, log_path: Path, *extra: str,
                      group_size: int = 4, max_tokens: int = 16, data_path: Path | None = None) -> Launched:
    """One of this repo's atroposlib environments (``recipe/atropos/...py serve``) on the tiny model,
    generating through the gateway (``server_type: vllm``, served name ``tiny``), pushing to run-api;
    its problems from ``data_path`` (default the assets' training set)."""
    argv = [sys.executable, script, "serve", "--slurm", "false",
            "--openai.base_url", f"http://127.0.0.1:{policy_port}/v1", "--openai.model_name", "tiny",
            "--openai.api_key", "x", "--openai.server_type", "vllm", "--openai.tokenizer_name", str(assets.model_dir),
            "--env.tokenizer_name", str(assets.model_dir), "--env.data_path", str(data_path or assets.train_file),
            "--env.rollout_server_url", api_url, "--env.group_size", str(group_size),
            "--env.max_response_tokens", str(max_tokens), "--env.use_wandb", "false",
            "--env.ensure_scores_are_not_same", "false", *extra]
    return Launched(argv, log_path, env=repo_env(WANDB_MODE="disabled", WANDB_DISABLED="true", PYTHONUNBUFFERED="1"))


def logged_steps(metrics_path: Path) -> list[int]:
    """The step of every training line of verl's metrics file, in file order, repeats included (a
    line still being written is skipped). ``demo.run_report.read_steps`` gives their metrics."""
    if not metrics_path.exists():
        return []
    steps = []
    for line in metrics_path.read_bytes().split(b"\n"):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if "timing_s/step" in record.get("data", {}):
            steps.append(record["step"])
    return steps
