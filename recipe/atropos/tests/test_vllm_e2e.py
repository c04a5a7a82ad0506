"""verl's own vLLM rollout (`rollout.name=vllm`) end to end on CPU, with vLLM's CPU build (.venv-vllm).

Both tests run a GPU example config unchanged but for the CPU overlay (`+cpu=gpu_example`,
config/cpu/gpu_example.yaml) through the launcher: verl's Ray workers start vLLM's engine and OpenAI
server (verl's `vLLMReplica`/`vLLMHttpServer`), weights reach vLLM through verl's shared-memory path.

- evaluate mode (gsm8k_grpo_example.yaml, the real environment service): the environment's
  advantages are trained on, and the weights vLLM answers with follow the actor after every step,
  seen from vLLM itself: the greedy answer of a fixed prompt, asked from vLLM's own OpenAI server
  during training, changes from step to step, and at every step the log-probs vLLM sampled with
  equal the actor's recomputation with its current weights (verl's `training/rollout_probs_diff_*`);
- trajectory mode (gsm8k_trajectory_example.yaml, atroposlib's run-api): the repo's atroposlib GSM8K
  environment (its ramp-advantage variant) generates through the policy gateway in front of verl's
  vLLM server with `server_type: vllm` (`/generate`), atroposlib's `server_type: openai` client
  answers through the same gateway (completions and chat), the environment's token-level advantages
  are trained token by token, and the gate closes around each weight sync.

Only the test-only knobs are added (step count, ports, dump folder, a learning rate that moves a
greedy answer). Run with `make test-vllm` (in the loopback-only namespace).
"""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

import pytest
import requests

pytest.importorskip("vllm", reason="needs vLLM's CPU build: `make install-vllm`, then `make test-vllm`")

from recipe.atropos.demo.run_report import read_jsonl, read_steps  # noqa: E402

from .conftest import REPO_ROOT  # noqa: E402
from .e2e_harness import Launched, cpu_trainer_env, gateway_health  # noqa: E402
from .ramp_advantage_env import ramp  # noqa: E402
from .servers import find_free_loopback_port  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.ray, pytest.mark.slow]

CONFIGS = REPO_ROOT / "recipe/atropos/config"
LAUNCHER = REPO_ROOT / "recipe/atropos/launch_atropos_verl_services.py"
STEPS = 3
SERVING = re.compile(r"engine \(CPU\) serving .* OpenAI API at (http://\S+)/v1")
PROBE_PROMPT = "Question: what is 3 + 4?\nAnswer:"


def _launch(config: str, tmp_path: Path, assets, *overrides: str) -> tuple[Launched, Path]:
    run_dir = tmp_path / "run"
    launcher = Launched(
        [sys.executable, str(LAUNCHER), "--config", str(CONFIGS / config), "--run-dir", str(run_dir), "+cpu=gpu_example",
         f"trainer.total_training_steps={STEPS}", "+ray_kwargs.ray_init.include_dashboard=false",
         "++ray_kwargs.ray_init.address=local", "launcher.poll_interval_s=0.2", *overrides],
        tmp_path / "launcher.log", cpu_trainer_env(assets, tmp_path / "metrics.jsonl"),
    )
    return launcher, run_dir


def _vllm_url(run_dir: Path) -> str | None:
    log = run_dir / "trainer.log"
    found = SERVING.search(log.read_text(errors="replace")) if log.exists() else None
    return found.group(1) if found else None


def _greedy_answer(url: str) -> tuple | None:
    """vLLM's greedy answer to the fixed prompt: its tokens and their log-probs (4 decimals)."""
    try:
        model = requests.get(f"{url}/v1/models", timeout=5).json()["data"][0]["id"]
        choice = requests.post(
            f"{url}/v1/completions",
            json={"model": model, "prompt": PROBE_PROMPT, "max_tokens": 8, "temperature": 0, "logprobs": 0,
                  "return_token_ids": True},
            timeout=30,
        ).json()["choices"][0]
    except (requests.RequestException, ValueError, KeyError, IndexError):
        return None
    return tuple(choice["token_ids"]), tuple(round(lp, 4) for lp in choice["logprobs"]["token_logprobs"])


def _logs(tmp_path: Path, run_dir: Path) -> str:
    parts = [(tmp_path / "launcher.log").read_text(errors="replace")[-3000:]]
    for name in ("trainer.log", "env-gsm8k.log", "environment.log"):
        if (run_dir / name).exists():
            parts.append(f"--- {name}\n" + (run_dir / name).read_text(errors="replace")[-5000:])
    return "\n".join(parts)


@pytest.mark.timeout(900)
def test_evaluate_mode_gpu_example_new_weights_reach_vllm_every_step(tiny_assets, tmp_path):
    launcher, run_dir = _launch(
        "gsm8k_grpo_example.yaml", tmp_path, tiny_assets,
        f"launcher.environment.port={find_free_loopback_port()}", "actor_rollout_ref.actor.optim.lr=1e-2",
    )
    metrics_path = tmp_path / "metrics.jsonl"
    answers: list[tuple[int, tuple]] = []  # (steps logged so far, vLLM's greedy answer), when it changed
    url = None

    def ask_vllm() -> None:
        nonlocal url
        url = url or _vllm_url(run_dir)
        answer = _greedy_answer(url) if url else None
        if answer is not None and (not answers or answers[-1][1] != answer):
            logged = len(metrics_path.read_text().splitlines()) if metrics_path.exists() else 0
            answers.append((logged, answer))

    with launcher:
        launcher.run_to_end(timeout_s=800, watch=ask_vllm)
    logs = _logs(tmp_path, run_dir)
    assert launcher.returncode == 0, logs
    assert url is not None, logs  # verl's vLLM server said where it serves
    steps = read_steps(tmp_path / "metrics.jsonl")
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    for step in steps:
        assert step["atropos/override_fraction"] == 1.0  # the environment's advantages, every sample
        # vLLM sampled with the weights the actor holds at that step (its log-probs equal the
        # actor's recomputation), though those weights move every step (below).
        assert step["training/rollout_probs_diff_valid"] == 1
        assert step["training/rollout_probs_diff_max"] < 1e-3, step
        assert step["timing_s/update_weights"] > 0
    # vLLM's own answers once step 1 is logged: the weights of step 1, then new ones after each
    # later step (the last step's may land after the final poll, when the trainer is stopping).
    # Log-probs that move by less than NOISE are the same weights batched with other requests.
    versions = []
    for logged, answer in answers:
        if logged >= 1 and (not versions or _moved(versions[-1], answer) > NOISE):
            versions.append(answer)
    assert len(versions) >= STEPS - 1, answers


NOISE = 1e-3


def _moved(before: tuple, after: tuple) -> float:
    """How far vLLM's greedy answer moved: the largest log-prob change, or inf for other tokens."""
    if before[0] != after[0]:
        return float("inf")
    return max(abs(a - b) for a, b in zip(before[1], after[1]))


def _openai_client_answers(gateway_v1: str) -> tuple[int, int]:
    """atroposlib's `server_type: openai` client through the gateway: chat, then completions."""
    from atroposlib.envs.server_handling.openai_server import OpenAIServer
    from atroposlib.envs.server_handling.server_baseline import APIServerConfig

    async def ask() -> tuple[int, int]:
        server = OpenAIServer(APIServerConfig(
            base_url=gateway_v1, api_key="x", model_name="whatever-the-env-calls-it", server_type="openai",
            health_check=False, timeout=120,
        ))
        chat = await server.chat_completion(messages=[{"role": "user", "content": "2+2?"}], n=2, max_tokens=6)
        completion = await server.completion(prompt=PROBE_PROMPT, n=2, max_tokens=6)
        return (sum(c.message.content is not None for c in chat.choices),
                sum(c.text is not None for c in completion.choices))

    return asyncio.run(ask())


@pytest.mark.timeout(900)
def test_trajectory_mode_gpu_example_through_the_gateway_in_front_of_vllm(tiny_assets, tmp_path):
    gateway_port = find_free_loopback_port()
    dump_dir = tmp_path / "rollouts"
    launcher, run_dir = _launch(
        "gsm8k_trajectory_example.yaml", tmp_path, tiny_assets,
        f"trainer.atropos.policy_gateway_port={gateway_port}", f"launcher.trajectory_api.port={find_free_loopback_port()}",
        f"trainer.rollout_data_dir={dump_dir}",
        # The same environment, sending token-level advantages no GRPO computation would give.
        "launcher.environments.0.command.1=recipe/atropos/tests/ramp_advantage_env.py",
    )
    gateway = f"http://127.0.0.1:{gateway_port}"
    seen, openai_answers, native = [], None, None

    def ask_gateway() -> None:
        nonlocal openai_answers, native
        health = gateway_health(gateway_port)
        if health is None:
            return
        seen.append(health)
        if openai_answers is None and health["gate"] == "open":
            openai_answers = _openai_client_answers(f"{gateway}/v1")
            native = requests.post(f"{gateway}/generate", timeout=60, json={
                "prompt": {"prompt_token_ids": [1, 2, 3]}, "n": 2, "max_tokens": 4, "logprobs": 0}).json()

    with launcher:
        launcher.run_to_end(timeout_s=800, watch=ask_gateway, every_s=0.1)
    logs = _logs(tmp_path, run_dir)
    assert launcher.returncode == 0, logs
    assert "engine (CPU) serving" in (run_dir / "trainer.log").read_text(errors="replace")
    # atroposlib's openai client (chat and completions) and vLLM's /generate dialect, answered by
    # verl's vLLM server behind the gateway.
    assert openai_answers == (2, 2), openai_answers
    assert len(native["token_ids"]) == 2, native
    assert all(len(lp) == len(ids) > 0 for lp, ids in zip(native["logprobs"], native["token_ids"])), native
    steps = read_steps(tmp_path / "metrics.jsonl")
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    for step in steps:
        assert step["atropos/batch_groups"] == 2 and step["atropos/override_fraction"] == 1.0
    # Token by token, what was trained on is the environment's ramp, for every sample of every step.
    for step in range(1, STEPS + 1):
        samples = read_jsonl(dump_dir / f"{step}.jsonl")  # the policy's text may hold U+2028
        assert len(samples) == 10  # 2 groups of rollout.n = 5
        for sample in samples:
            assert len(sample["advantages"]) == len(sample["trained_token_ids"]) > 0
            assert sample["advantages"] == pytest.approx(ramp(len(sample["advantages"])), abs=1e-6)
    # The gate closed before each sleep and opened after each weight sync into vLLM (the initial
    # one, then one per step; the last may come after the last poll).
    assert max(h["times_closed"] for h in seen) >= STEPS - 1, seen[-1]
    assert max(h["times_opened"] for h in seen) >= STEPS, seen[-1]
    assert max(h["global_steps"] or 0 for h in seen) >= STEPS - 1
