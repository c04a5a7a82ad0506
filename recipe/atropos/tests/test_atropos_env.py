"""The atroposlib GSM8K environment end to end: policy server -> env -> run-api -> trainer batch -> verl tensors.

Everything runs as real processes on 127.0.0.1: this repo's CPU policy server (OpenAI-compatible,
plus the `/generate` atroposlib's `server_type: vllm` posts), atroposlib's own `run-api`, and the
environment through atroposlib's own CLI (`serve`). wandb is off and the hub is offline.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recipe.atropos.trajectory.runapi_client import AtroposRunAPIClient
from recipe.atropos.environments.atropos_gsm8k_env import (
    AtroposGSM8KEnv,
    load_rl_parquet,
    score_answer,
    token_advantages,
)
from recipe.atropos.environments.gsm8k_answers import AnswerMatcher
from recipe.atropos.tests.conftest import REPO_ROOT, repo_env
from recipe.atropos.tests.servers import start_atropos_run_api, start_cpu_policy_server
from recipe.atropos.trajectory.metrics import trajectory_metrics
from recipe.atropos.trajectory.scored_data import TrajectoryLimits, scored_groups_to_batch

GROUP_SIZE = 4
BATCH_SIZE = 8  # two groups per trainer batch


@pytest.mark.timeout(60)
def test_scoring_is_the_evaluate_mode_gsm8k_scoring():
    matcher = AnswerMatcher()
    assert score_answer(matcher, "so it is \\boxed{1,000}", "#### 1000") == 1.0
    assert score_answer(matcher, "#### 12", "12") == 1.0
    assert score_answer(matcher, "#### 13", "12") == 0.0
    assert score_answer(matcher, "no answer", "12") == 0.0


@pytest.mark.timeout(30)
def test_token_advantages_cover_trained_tokens_only():
    out = token_advantages([[-100, -100, 5, 6], [-100, 7, -100]], [0.5, -1.0])
    assert out == [[0.0, 0.0, 0.5, 0.5], [0.0, -1.0, 0.0]]


@pytest.mark.timeout(120)
def test_reads_verl_rl_parquet(tiny_assets):
    rows = load_rl_parquet(tiny_assets.train_file)
    messages, ground_truth = rows[0]
    assert messages[0]["role"] == "user" and messages[0]["content"]
    assert ground_truth.strip()


@pytest.mark.timeout(30)
def test_config_defaults_are_offline_and_use_the_vllm_server_type():
    env_config, servers = AtroposGSM8KEnv.config_init()
    assert env_config.use_wandb is False
    assert servers[0].server_type == "vllm"
    assert servers[0].base_url.startswith("http://127.0.0.1")


class EnvProcess:
    """The environment as a child process (it serves no HTTP: nothing to wait for), log in a file."""

    def __init__(self, argv: list[str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")
        env = repo_env(WANDB_MODE="disabled", WANDB_DISABLED="true", PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT,
                                        start_new_session=True)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()


def _wait_for_batch(client: AtroposRunAPIClient, env: EnvProcess, timeout_s: float) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if env.process.poll() is not None:
            raise RuntimeError(f"environment exited with {env.process.returncode}; log:\n{env.log_text()[-4000:]}")
        batch = client.get_batch()
        if batch is not None:
            return batch
        time.sleep(0.5)
    raise TimeoutError(f"no batch within {timeout_s} s; environment log:\n{env.log_text()[-4000:]}")


@pytest.mark.timeout(300)
def test_env_generates_scores_and_groups_arrive_as_a_verl_batch(tiny_assets, tmp_path):
    policy = start_cpu_policy_server(tiny_assets.model_dir)
    policy_port = policy.port
    api = start_atropos_run_api()
    env_process = None
    try:
        client = AtroposRunAPIClient(api.url, timeout=10.0, retry_attempts=2, retry_delay=0.2, max_wait_time=30.0)
        client.register_trainer(batch_size=BATCH_SIZE, max_token_len=512, num_steps=10)
        assert client.get_batch() is None  # marks the trainer as started: environments may now register
        env_argv = [
            sys.executable, "recipe/atropos/environments/atropos_gsm8k_env.py", "serve", "--slurm", "false",
            "--openai.base_url", f"http://127.0.0.1:{policy_port}/v1", "--openai.model_name", "tiny",
            "--openai.api_key", "x", "--openai.server_type", "vllm",
            "--openai.tokenizer_name", str(tiny_assets.model_dir),
            "--env.tokenizer_name", str(tiny_assets.model_dir), "--env.data_path", str(tiny_assets.train_file),
            "--env.rollout_server_url", api.url, "--env.group_size", str(GROUP_SIZE),
            "--env.max_response_tokens", "12", "--env.use_wandb", "false", "--env.emit_advantages", "true",
            "--env.ensure_scores_are_not_same", "false", "--env.max_num_workers", "2",
        ]
        env_process = EnvProcess(env_argv, tmp_path / "env.log")
        groups = _wait_for_batch(client, env_process, timeout_s=180)

        assert sum(len(g["tokens"]) for g in groups) == BATCH_SIZE
        for g in groups:
            assert len(g["tokens"]) == GROUP_SIZE and set(g["scores"]) <= {0.0, 1.0}
            assert g["generation_params"]["policy_step"] >= 0
            assert all(len(lp) == len(t) for lp, t in zip(g["inference_logprobs"], g["tokens"]))
        batch = scored_groups_to_batch(groups, TrajectoryLimits(max_prompt_length=256, max_response_length=12,
                                                                pad_token_id=0))
        assert batch.responses_BT.shape == (BATCH_SIZE, 12)
        assert len(set(batch.uid_B)) == len(groups)
        assert batch.response_mask_BT.sum(-1).min() >= 1
        assert batch.rollout_log_probs_BT is not None
        assert (batch.rollout_log_probs_BT[batch.response_mask_BT.bool()] <= 0).all()  # real log-probs
        assert batch.advantage_override_mask_B.all()
        torch_scores = batch.rm_scores_BT.sum(-1).tolist()
        assert torch_scores == [s for g in groups for s in g["scores"]]
        metrics = trajectory_metrics(groups)
        assert metrics["atropos/batch_groups"] == len(groups)
    finally:
        if env_process is not None:
            env_process.stop()
        api.stop()
        policy.stop()
