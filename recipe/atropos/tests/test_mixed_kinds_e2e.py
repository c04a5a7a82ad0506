"""Every kind of environment in one run through verl's real trainer: two OpenEnv environments (the
multi-turn guess game and the single-step arithmetic one: real OpenEnv servers from .venv-openenv, each
played by its driver process, `python -m recipe.atropos.openenv`, one server started by its `command`),
a verifiers environment (tests/vf_test_envs.py's single-turn one, played by its runner process,
`python -m recipe.atropos.verifiers`), and two atroposlib `BaseEnv`s (the repo's ramp environment and
its reasoning-gym one), all generating through the trainer's policy gateway and pushing to run-api
(the launcher's, which names each registration).

Each entry's share of the batch is steered by its `min_batch_allocation` (run-api's batcher: the mix
of a trajectory-mode run, docs/many_environments.md); the verifiers entry is given twice the others'.
What the trainer trained on, token by token, is what was played: the guess game's per-turn advantages
computed here by hand (GRPO process supervision), the verifiers episodes' GRPO over the rewards the
environment recorded."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from recipe.atropos.demo.run_report import read_jsonl, read_steps
from recipe.atropos.demo.tiny_assets import build_reasoning_gym_data
from recipe.atropos.environments.advantages import compute_grpo_outcome_advantages_np

from .conftest import PYTHON, repo_env
from .e2e_harness import (
    Launched,
    cpu_trainer_env,
    start_atropos_env,
    tiny_batch,
    trainer_argv,
    wait_for_trajectory_trainer,
)
from .openenv_guess_actions import guess_any, secret_of, step_reward
from .openenv_servers import ARITHMETIC_APP, GUESS_APP, openenv_server, openenv_server_argv, require_openenv
from .ramp_advantage_env import ramp
from .servers import find_free_loopback_port, start_server_process

pytestmark = [pytest.mark.ray, pytest.mark.slow]

GROUP, MAX_TOKENS, TURNS, STEPS = 4, 8, 3, 3
# Groups of each entry in a step's batch (24 sequences) when each has its share queued, by its
# min_batch_allocation: int(24 x share) sequences, and the shares add up to the whole batch.
GROUPS = {"guess": 1, "arithmetic": 1, "digits": 2, "ramp": 1, "reasoning_gym": 1}
BATCH_GROUPS = sum(GROUPS.values())


def _share(name: str) -> float:
    return (GROUPS[name] + 0.01) / BATCH_GROUPS  # a hair over: int() of the sequences is the groups' exactly


def _runner(kind: str, name: str, entry: dict, api_url: str, policy_port: int, model_dir, tmp_path) -> Launched:
    entry = {"type": kind, "group_size": GROUP, "concurrency": GROUP, "min_batch_allocation": _share(name), **entry}
    return Launched([PYTHON, "-m", f"recipe.atropos.{kind}", "--name", name, "--spec-json", json.dumps(entry),
                     "--policy-url", f"http://127.0.0.1:{policy_port}/v1", "--run-api", api_url,
                     "--tokenizer", str(model_dir)], tmp_path / f"{name}.log", env=repo_env())


def _turns(trained: list[int], eos: int) -> list[list[int]]:
    """A sample's trained tokens, split into its turns: each ends with the stop token or at MAX_TOKENS."""
    turns, current = [], []
    for token in trained:
        current.append(token)
        if token == eos or len(current) == MAX_TOKENS:
            turns.append(current)
            current = []
    return turns + ([current] if current else [])


def check_guess_group(samples: list[dict], tokenizer) -> None:
    """The game's rewards recomputed from each turn's text, credited by GRPO process supervision over
    the group (the formula of test_openenv_driver.process_advantages), against what the trainer used."""
    rewards, ends = [], []
    for sample in samples:
        secret = secret_of(int(sample["input"].split("Game ", 1)[1].split(":", 1)[0]))
        turns = _turns(sample["trained_token_ids"], tokenizer.eos_token_id)
        assert 1 <= len(turns) <= TURNS
        guesses = [guess_any(tokenizer.decode(t, skip_special_tokens=True), {})["guess"] for t in turns]
        assert secret not in guesses[:-1]  # a right guess ends the episode
        rewards.append([step_reward(g, secret) for g in guesses])
        ends.append(list(np.cumsum([len(t) for t in turns]) - 1))
    flat = np.array([r for rs in rewards for r in rs])
    mean, std = flat.mean(), flat.std(ddof=1)
    for sample, sample_rewards, sample_ends in zip(samples, rewards, ends):
        expected_T = np.zeros(len(sample["trained_token_ids"]))
        for reward, end in zip(sample_rewards, sample_ends):
            expected_T[: end + 1] += (reward - mean) / (std + 1e-6)
        assert sample["advantages"] == pytest.approx(expected_T.tolist(), abs=1e-4)
        assert sample["score"] == pytest.approx(sum(sample_rewards), abs=1e-6)


def _runners(guess_url: str, api_url: str, policy_port: int, assets, tmp_path) -> list[Launched]:
    """The guess game's driver (a running server), the arithmetic driver (its server started from
    `command`), the verifiers runner (recording what it played), and the two atroposlib environments."""
    model, (rg_train, _) = assets.model_dir, build_reasoning_gym_data(tmp_path / "rg", num_train=64, num_test=8)
    atropos_env = {"group_size": GROUP, "max_tokens": 16}
    return [
        _runner("openenv", "guess", {"url": guess_url, "max_turns": TURNS, "max_tokens": MAX_TOKENS, "max_token_length": 160,
                                     "action_function": "recipe.atropos.tests.openenv_guess_actions:guess_any"},
                api_url, policy_port, model, tmp_path),
        _runner("openenv", "arithmetic", {"command": openenv_server_argv(ARITHMETIC_APP, python="{openenv_python}"),
                                          "max_turns": 1, "max_tokens": 16, "max_token_length": 160},
                api_url, policy_port, model, tmp_path),
        _runner("verifiers", "digits", {"env": "recipe.atropos.tests.vf_test_envs:single_turn", "weight": 2.0,
                                        "env_args": {"record_to": str(tmp_path / "digits.jsonl")}, "max_tokens": 16},
                api_url, policy_port, model, tmp_path),
        *(start_atropos_env(script, assets, api_url, policy_port, tmp_path / f"{name}.log", "--env.emit_advantages", "true",
                            "--env.max_num_workers", "2", "--env.wandb_name", name,
                            "--env.min_batch_allocation", str(_share(name)), data_path=data, **atropos_env)
          for name, script, data in (("ramp", "recipe/atropos/tests/ramp_advantage_env.py", None),
                                     ("reasoning_gym", "recipe/atropos/environments/atropos_reasoning_gym_env.py", rg_train))),
    ]


def _check_digits_group(samples: list[dict], played: dict[tuple, list[dict]]) -> None:
    """A verifiers group: episodes the environment played, token for token, with GRPO over the rewards
    it recorded for them."""
    episodes = [played.get(tuple(sample["trained_token_ids"])) for sample in samples]
    assert all(episodes), "trained tokens that the verifiers environment never sampled"
    expected = compute_grpo_outcome_advantages_np([e[0]["reward"] for e in episodes], [0] * GROUP)
    for sample, value in zip(samples, expected):
        assert sample["advantages"] == pytest.approx([value] * len(sample["advantages"]), abs=1e-4)


def _check_trained_groups(dump, tokenizer, played) -> dict[str, int]:
    """Every trained group of verl's rollout dump checked by the environment it came from; how many of each."""
    kinds: dict[str, int] = defaultdict(int)
    for index in range(1, STEPS + 1):
        groups: dict[str, list[dict]] = {}
        for sample in read_jsonl(dump / f"{index}.jsonl"):
            groups.setdefault(sample["uid"], []).append(sample)
        for samples in groups.values():
            name = samples[0]["environment"]
            assert {s["environment"] for s in samples} == {name} and len(samples) == GROUP
            kinds[name] += 1
            if name == "guess":
                check_guess_group(samples, tokenizer)
            elif name == "digits":
                _check_digits_group(samples, played)
            elif name == "ramp":  # the Atropos environment's own token-level advantages
                for sample in samples:
                    assert sample["advantages"] == pytest.approx(ramp(len(sample["advantages"])), abs=1e-6)
            elif name == "arithmetic":  # the single-step OpenEnv episode: its one step's reward, GRPO over the group
                expected = compute_grpo_outcome_advantages_np([s["score"] for s in samples], [0] * GROUP)
                for sample, value in zip(samples, expected):
                    assert sample["advantages"] == pytest.approx([value] * len(sample["advantages"]), abs=1e-4)
    return dict(kinds)


@pytest.mark.timeout(600)
def test_every_kind_of_environment_trains_together_on_what_was_played(tiny_assets, tmp_path):
    from transformers import AutoTokenizer

    require_openenv()
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets.model_dir)
    guess_server = openenv_server(GUESS_APP)
    api_port = find_free_loopback_port()
    run_api = [sys.executable, "-m", "recipe.atropos.launcher.run_api", "--host", "127.0.0.1", "--port", str(api_port)]
    with ThreadPoolExecutor(2) as pool:
        api_future = pool.submit(start_server_process, run_api, port=api_port, health_path="/")
        guess_future = pool.submit(guess_server.start, 180)
    api = api_future.result()
    policy_port, metrics, dump = find_free_loopback_port(), tmp_path / "metrics.jsonl", tmp_path / "rollouts"
    argv = trainer_argv("gsm8k_grpo_cpu", "trainer.atropos.mode=trajectory", f"trainer.atropos.trajectory_api_url={api.url}",
                        "trainer.atropos.batch_timeout_s=300", f"trainer.atropos.policy_gateway_port={policy_port}",
                        "actor_rollout_ref.rollout.engine_kwargs.hf.port=0", f"trainer.rollout_data_dir={dump}",
                        "actor_rollout_ref.rollout.engine_kwargs.hf.served_model_name=tiny",
                        "data.max_response_length=96", f"trainer.total_training_steps={STEPS}",
                        *tiny_batch(BATCH_GROUPS, GROUP))
    others = []
    try:
        with Launched(argv, tmp_path / "trainer.log", env=cpu_trainer_env(tiny_assets, metrics)) as trainer:
            guess_future.result()
            # Every runner starts while the trainer boots and registers with run-api at its first batch
            # request, long before any group is played: run-api then holds each to its share from the
            # first batch on (runners register first; atroposlib environments register at start).
            others = _runners(guess_server.url, api.url, policy_port, tiny_assets, tmp_path)
            wait_for_trajectory_trainer(trainer, api.url, policy_port, timeout_s=300)
            trainer.run_to_end(timeout_s=420)
            trainer.assert_exit(0, *others)
    finally:
        for process in others:
            process.stop()
        guess_server.stop()
        api.stop()
    steps = read_steps(metrics)
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    trained = defaultdict(int)
    for step in steps:
        assert step["atropos/batch_groups"] == BATCH_GROUPS
        assert step["atropos/behavior_matched_fraction"] == 1.0  # every trained token was sampled by the policy
        assert step["atropos/behavior_in_context_fraction"] == 1.0  # after exactly the tokens it was sampled after
        # Each entry's part of the batch, under its own name. run-api holds back a batch until every
        # entry with a minimum has a group queued, then takes up to each one's minimum of what is queued
        # and fills the rest from any entry: an entry that is behind when the batch forms (the verifiers
        # runner's first groups, still playing when the first batch formed in one CI run) gets fewer than
        # its share and another more, but never none. The exact mix is the usual case, not a guarantee.
        for name in GROUPS:
            samples = step[f"atropos/env/{name}/samples"]
            assert GROUP <= samples <= (BATCH_GROUPS - len(GROUPS) + 1) * GROUP and samples % GROUP == 0, name
            assert step[f"atropos/env/{name}/batch_share"] == pytest.approx(samples / (BATCH_GROUPS * GROUP)), name
            trained[name] += samples // GROUP
        for name in ("guess", "arithmetic", "digits"):  # the runners' own counters
            assert step[f"atropos/env/{name}/failures"] == 0, name
        assert step["atropos/env/guess/episodes"] >= 1 and step["atropos/env/digits/episodes"] >= 1
        assert step["atropos/trajectory/dropped/length"] == 0  # every episode fits the trainer's lengths
    played = defaultdict(list)
    for episode in read_jsonl(tmp_path / "digits.jsonl"):
        played[tuple(episode["sampled"])].append(episode)
    assert _check_trained_groups(dump, tokenizer, played) == trained
