"""The verifiers runner (recipe/atropos/verifiers) against the real parts over loopback, without the
trainer: the CPU policy server, the policy gateway in front of it, atroposlib's run-api, and this test
standing in for the trainer (it registers and pulls the batches).

Four environments of tests/vf_test_envs.py play at once, each until it pushed two groups: single-turn
(`@vf.reward`), three turns with the environment's text between them, one assigning its own per-token
advantages, and one whose tasks raise or hang. What a user checks in what reaches the trainer: the
tokens are the ones sampled, masks are 1 exactly on them, the log-probs are the policy's, the
advantages are GRPO's over the rewards or the environment's own, and failures are counted and named.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections import defaultdict

import numpy as np
import pytest
import requests

from recipe.atropos.episodes.cli import RunnerArgs, runner_main
from recipe.atropos.episodes.loop import EpisodeStats
from recipe.atropos.episodes.spec import EpisodeSpecError, load_spec
from recipe.atropos.protocol import IGNORE_INDEX
from recipe.atropos.trajectory.gateway import PolicyGateway
from recipe.atropos.trajectory.runapi_client import AtroposRunAPIClient

from .servers import start_atropos_run_api, start_cpu_policy_server
from .vf_test_envs import FEEDBACK, ramp

pytestmark = pytest.mark.slow

GROUP = 4
GROUPS_EACH = 2
ENVS = ("single_turn", "multi_turn", "own_credit", "faulty")
# Long enough for a normal episode on a loaded machine (under 1 s on an idle one), short: a hang costs it.
HANG_TIMEOUT_S = 6.0
# The server scores a sequence in one forward pass; it sampled it token by token in batches padded
# to their longest prompt: the two agree to float32 rounding (max difference seen here: 1e-6 over 32 sequences).
LOGPROB_TOL = 1e-4


def _spec(name: str) -> dict:
    spec = {"type": "verifiers", "env": f"recipe.atropos.tests.vf_test_envs:{name}", "group_size": GROUP,
            "concurrency": GROUP, "max_tokens": 8, "max_groups": GROUPS_EACH, "max_token_length": 512,
            "max_batches_offpolicy": 0}  # the test takes the groups once every runner is done
    if name == "faulty":
        spec["episode_timeout_s"] = HANG_TIMEOUT_S
    return spec


@pytest.fixture(scope="module")
def loopback_parts(tiny_assets):
    server = start_cpu_policy_server(tiny_assets.model_dir)
    api = start_atropos_run_api()
    gateway = PolicyGateway([server.url]).start()
    gateway.open(0)
    try:
        yield server, api, gateway
    finally:
        gateway.stop()
        api.stop()
        server.stop()


def _pull_groups(api_url: str, wanted: int, deadline_s: float) -> list[dict]:
    client = AtroposRunAPIClient(api_url, timeout=10, retry_attempts=1, max_wait_time=5)
    groups, deadline = [], time.monotonic() + deadline_s
    while len(groups) < wanted and time.monotonic() < deadline:
        batch = client.get_batch()
        groups.extend(batch or [])
        if not batch:
            time.sleep(0.2)
    return groups


def _runs(mask: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of trained (mask != -100) positions."""
    runs, start = [], None
    for i, m in enumerate([*mask, IGNORE_INDEX]):
        if m != IGNORE_INDEX and start is None:
            start = i
        elif m == IGNORE_INDEX and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _server_logprobs(server_url: str, tokens: list[int]) -> list[float | None]:
    answer = requests.post(f"{server_url}/v1/completions", timeout=60,
                           json={"prompt": tokens, "max_tokens": 0, "echo": True, "logprobs": 0})
    return answer.json()["choices"][0]["logprobs"]["token_logprobs"]


def _grpo(scores: list[float]) -> np.ndarray:
    r = np.asarray(scores, dtype=np.float64)
    return (r - r.mean()) / (r.std(ddof=1) + 1e-6)


def _check_group(name: str, group: dict, server_url: str, tokenizer) -> None:
    """One pushed group of environment `name`, as the trainer will read it."""
    assert len(group["tokens"]) == GROUP
    for tokens, mask, logprobs, advantages in zip(group["tokens"], group["masks"], group["inference_logprobs"],
                                                  group["advantages"]):
        trained = [i for i, m in enumerate(mask) if m != IGNORE_INDEX]
        assert trained and all(mask[i] == tokens[i] for i in trained)  # masks name the sampled token ids
        assert all(logprobs[i] == 1.0 for i, m in enumerate(mask) if m == IGNORE_INDEX)
        assert all(advantages[i] == 0.0 for i, m in enumerate(mask) if m == IGNORE_INDEX)
        # The behaviour log-probs are the policy's for exactly these tokens in exactly this context.
        scored = _server_logprobs(server_url, tokens)
        assert max(abs(logprobs[i] - scored[i]) for i in trained) < LOGPROB_TOL
        runs = _runs(mask)
        if name == "multi_turn":
            assert len(runs) == 3  # three policy turns
            between = [tokenizer.decode(tokens[a_end:b_start]) for (_, a_end), (b_start, _) in zip(runs, runs[1:])]
            assert all(FEEDBACK in text for text in between), between
        else:
            assert len(runs) == 1
        if name == "own_credit":
            assert [advantages[i] for i in trained] == pytest.approx(ramp(len(trained)), abs=1e-6)
    if name != "own_credit":  # GRPO over the group's rewards, on every sampled token
        for row, mask, a in zip(group["advantages"], group["masks"], _grpo(group["scores"])):
            assert [row[i] for i, m in enumerate(mask) if m != IGNORE_INDEX] == pytest.approx(
                [a] * sum(m != IGNORE_INDEX for m in mask), abs=1e-6)


@pytest.mark.timeout(300)
def test_runner_pushes_exact_groups_of_four_verifiers_environments(loopback_parts, tiny_assets, caplog, tmp_path):
    from transformers import PreTrainedTokenizerFast

    from recipe.atropos.verifiers.runner import run

    server, api, gateway = loopback_parts
    trainer = AtroposRunAPIClient(api.url, timeout=10, retry_attempts=1, max_wait_time=5)
    trainer.register_trainer(batch_size=GROUP, max_token_len=512, num_steps=100)
    assert trainer.get_batch() is None  # the first pull starts run-api (environments may register)
    stats = {name: EpisodeStats() for name in ENVS}

    async def all_runners():
        await asyncio.gather(*(
            run(RunnerArgs(name, gateway.base_url, api.url, str(tiny_assets.model_dir)), load_spec(name, _spec(name)),
                stats[name]) for name in ENVS))

    caplog.set_level(logging.WARNING, logger="verl.recipe.atropos.episodes")
    asyncio.run(all_runners())
    groups = _pull_groups(api.url, len(ENVS) * GROUPS_EACH, deadline_s=30)

    by_env = defaultdict(list)
    for group in groups:
        by_env[group["group_overrides"]["env_name"]].append(group)
    assert {name: len(g) for name, g in by_env.items()} == {name: GROUPS_EACH for name in ENVS}
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tiny_assets.model_dir))
    for name, env_groups in by_env.items():
        for group in env_groups:
            _check_group(name, group, server.url, tokenizer)
    assert all(g["group_overrides"]["episode_stats"]["turns_mean"] == 3.0 for g in by_env["multi_turn"])

    # The faulty environment's failures: counted by kind, logged with the task and the error.
    faulty = stats["faulty"].total
    assert faulty["failures/error"] >= 1 and faulty["failures/timeout"] >= 1, dict(faulty)
    assert faulty["pushed_groups"] == GROUPS_EACH and faulty.get("dropped_groups", 0) == 0, dict(faulty)
    assert re.search(r"episode of task count-\d+ \(try \d+\) failed \(error\): .*episode \d+ of task count-\d+ exploded "
                     r"on purpose", caplog.text), caplog.text[-2000:]
    assert re.search(r"episode of task count-\d+ \(try \d+\) failed \(timeout\)", caplog.text), caplog.text[-2000:]
    reported = [g["group_overrides"]["episode_stats"] for g in by_env["faulty"]]
    assert sum(s.get("failures/error", 0) + s.get("failures/timeout", 0) for s in reported) > 0
    # Every completion the runners got was recorded by the gateway (staleness and off-policy correction use them).
    health = requests.get(f"http://127.0.0.1:{gateway.port}/health", timeout=5).json()
    assert health["behavior_records"]["unrecorded"] == 0 and health["in_flight"] == 0


def test_an_environment_that_cannot_load_is_refused_with_the_fix(tiny_assets, capsys):
    from recipe.atropos.verifiers.runner import run as _run

    argv = ["--name", "arith", "--policy-url", "http://127.0.0.1:9/v1", "--run-api", "http://127.0.0.1:9",
            "--tokenizer", str(tiny_assets.model_dir)]

    def refusal(env: str, **extra) -> str:
        spec = {"type": "verifiers", "env": env, **extra}
        assert runner_main("verifiers", _run, [*argv, "--spec-json", json.dumps(spec)]) == 2
        return capsys.readouterr().err

    missing = refusal("no_such_package.envs:make")
    assert "trainer.atropos.environments.arith.env" in missing and "'no_such_package.envs'" in missing
    assert "fix:" in missing
    not_env = refusal("recipe.atropos.tests.vf_test_envs:digit_share", env_args={"text": "1"})
    assert "not a vf.Env" in not_env
    # verifiers' default runtime and harness are made local; explicit remote ones are refused.
    remote = refusal("recipe.atropos.tests.vf_test_envs:single_turn_in", env_args={"runtime": {"type": "docker"}})
    assert "agent 'agent'" in remote and "'docker' runtime" in remote and "leave its runtime unset" in remote
    installing = refusal("recipe.atropos.tests.vf_test_envs:single_turn_in", env_args={"harness": {"id": "bash"}})
    assert "'bash' harness" in installing and "installs its program" in installing
    hosted = refusal("recipe.atropos.tests.vf_test_envs:single_turn_in",
                     env_args={"client": {"type": "eval", "base_url": "https://api.openai.com/v1"}})
    assert "https://api.openai.com/v1" in hosted
    with pytest.raises(EpisodeSpecError, match="sampling_args"):
        load_spec("arith", {"type": "verifiers", "env": "x:y", "sampling_args": {"temperature": 0.5}})
