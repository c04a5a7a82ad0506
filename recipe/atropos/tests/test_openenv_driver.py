"""The OpenEnv driver against real OpenEnv servers (from .venv-openenv), the CPU policy server behind the
policy gateway, and atroposlib's run-api, without the trainer: what run-api queues is what was played,
token for token, credited by GRPO process supervision as computed here by hand; faults of the server
cost episodes, are counted, and the run goes on."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psutil
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recipe.atropos.episodes.cli import RunnerArgs
from recipe.atropos.episodes.loop import EpisodeStats
from recipe.atropos.episodes.spec import EpisodeSpecError, load_spec
from recipe.atropos.episodes.types import Completion
from recipe.atropos.openenv.rendering import ChatRenderer
from recipe.atropos.environments.advantages import compute_grpo_outcome_advantages_np
from recipe.atropos.openenv.prepare_data import rows
from recipe.atropos.openenv.rendering import ObservationPrompt
from recipe.atropos.openenv.runner import run
from recipe.atropos.openenv.session import ActionRejected, OpenEnvSession
from recipe.atropos.protocol import IGNORE_INDEX
from recipe.atropos.trajectory.gateway import PolicyGateway
from recipe.atropos.trajectory.runapi_client import AtroposRunAPIClient

from .conftest import PYTHON, REPO_ROOT, repo_env
from .openenv_guess_actions import HIGHEST, guess_any, out_of_range, parse_guess, secret_of, step_reward
from .openenv_servers import ARITHMETIC_APP, GUESS_APP, openenv_server, openenv_server_argv, require_openenv, start_all
from .servers import (
    LOOPBACK_HOST,
    ServerProcess,
    find_free_loopback_port,
    start_atropos_run_api,
    start_cpu_policy_server,
)

pytestmark = [pytest.mark.slow]

GROUP = 4
PENALTY = -1.0
GUESS_ENTRY = {"type": "openenv", "group_size": GROUP, "concurrency": GROUP, "max_turns": 3, "max_tokens": 8,
               "max_token_length": 512, "parse_penalty": PENALTY, "step_timeout_s": 30, "max_batches_offpolicy": 0,
               "action_function": "recipe.atropos.tests.openenv_guess_actions:parse_guess"}


class Stack:
    """run-api (a trainer registered, batches of one group), the CPU policy server behind an open gateway,
    and the two test environments' servers."""

    def __init__(self, tiny_assets):
        require_openenv()
        self.model_dir = tiny_assets.model_dir
        self.arithmetic, self.guess = openenv_server(ARITHMETIC_APP), openenv_server(GUESS_APP)
        # The arithmetic environment as an evaluate-mode service (it waits for the server's /health itself).
        port = find_free_loopback_port()
        self.service = ServerProcess([PYTHON, "-m", "recipe.atropos.openenv.service", "serve", "--slurm", "false",
                                      "--port", str(port), "--env.url", self.arithmetic.url], port=port)
        with ThreadPoolExecutor(3) as pool:
            api = pool.submit(start_atropos_run_api)
            policy = pool.submit(start_cpu_policy_server, self.model_dir)
            start_all(self.arithmetic, self.guess, self.service)
            self.api, self.policy = api.result(), policy.result()
        self.gateway = PolicyGateway([self.policy.url], host=LOOPBACK_HOST, port=0).start()
        self.gateway.open(0)
        self.client = AtroposRunAPIClient(self.api.url, timeout=5, retry_attempts=1, max_wait_time=5)
        self.client.register_trainer(batch_size=GROUP, max_token_len=512, num_steps=100)
        self.client.get_batch()  # run-api takes environments once the trainer asked for a batch

    def args(self, name: str) -> RunnerArgs:
        return RunnerArgs(name, self.gateway.base_url, self.api.url, str(self.model_dir))

    def drain(self) -> list[dict]:
        groups = []
        while (batch := self.client.get_batch()) is not None:
            groups += batch
        return groups

    def stop(self) -> None:
        self.gateway.stop()
        for server in (self.service, self.arithmetic, self.guess, self.policy, self.api):
            server.stop()


@pytest.fixture(scope="module")
def stack(tiny_assets):
    started = Stack(tiny_assets)
    yield started
    started.stop()


@pytest.fixture(scope="module")
def tokenizer(tiny_assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_assets.model_dir)


def sampled_runs(mask: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of trained (not -100) positions: one per policy turn."""
    runs, start = [], None
    for i, m in enumerate([*mask, IGNORE_INDEX]):
        if m != IGNORE_INDEX and start is None:
            start = i
        elif m == IGNORE_INDEX and start is not None:
            runs.append((start, i))
            start = None
    return runs


def guess_step_rewards(tokenizer, tokens: list[int], runs: list[tuple[int, int]], secret: int, parse) -> list[float]:
    """The game's rules applied to each turn's text through the entry's parser: what every step must have earned."""
    rewards = []
    for start, end in runs:
        try:
            guess = parse(tokenizer.decode(tokens[start:end], skip_special_tokens=True), {})["guess"]
        except ValueError:
            rewards.append(PENALTY)  # unparseable
            break
        if not 1 <= guess <= HIGHEST:
            rewards.append(PENALTY)  # the server's VALIDATION_ERROR
            break
        rewards.append(step_reward(guess, secret))
        if guess == secret:
            break
    return rewards


def process_advantages(step_rewards: list[list[float]], step_ends: list[list[int]], lengths: list[int],
                       masks: list[list[int]]) -> list[np.ndarray]:
    """GRPO process supervision (DeepSeekMath 4.1.3), written out: every step reward of the group normalized
    together, r~ = (r - mean) / (std + 1e-6) (unbiased std); token t gets the sum of r~ over the steps of its
    sequence that end at or after t; 0 where the policy did not sample."""
    flat = np.array([r for rs in step_rewards for r in rs])
    mean, std = flat.mean(), flat.std(ddof=1)
    out = []
    for rewards, ends, length, mask in zip(step_rewards, step_ends, lengths, masks):
        advantages_T = np.zeros(length)
        for reward, end in zip(rewards, ends):
            advantages_T[: end + 1] += (reward - mean) / (std + 1e-6)
        out.append(np.where(np.array(mask) != IGNORE_INDEX, advantages_T, 0.0))
    return out


def check_guess_group(group: dict, tokenizer, gateway: PolicyGateway, parse) -> None:
    step_rewards, step_ends = [], []
    for tokens, mask, score, logprobs in zip(group["tokens"], group["masks"], group["scores"],
                                             group["inference_logprobs"]):
        runs = sampled_runs(mask)
        seed = int(re.search(r"Game (\d+):", tokenizer.decode(tokens[: runs[0][0]])).group(1))
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Game {seed}: I am thinking of a number from 1 to {HIGHEST}. Guess it: "
                                        "answer with one number."}], tokenize=False, add_generation_prompt=True)
        assert tokens[: runs[0][0]] == tokenizer(prompt, add_special_tokens=False)["input_ids"]
        for start, end in runs:  # each turn is a completion the gateway recorded, with its log-probs
            # Found after exactly the tokens before it: a short answer (a lone EOS) recurs across episodes.
            record, in_context = gateway.records.find(tokens[start:end], tokens[:start])
            assert record is not None and in_context and mask[start:end] == tokens[start:end]
            assert logprobs[start:end] == pytest.approx(record.logprobs_T.tolist(), abs=1e-6)
        rewards = guess_step_rewards(tokenizer, tokens, runs, secret_of(seed), parse)
        assert len(rewards) == len(runs) and score == pytest.approx(sum(rewards))
        for (played, end), (start, _) in zip(runs, runs[1:]):  # the hint between turns, as the template renders it
            guess = parse(tokenizer.decode(tokens[played:end], skip_special_tokens=True), {})["guess"]
            hint = "high" if guess > secret_of(seed) else "low"
            closed = tokens[end - 1] == tokenizer.eos_token_id  # else the driver closes the cut-off turn
            assert tokenizer.decode(tokens[end:start]) == ("" if closed else "<|im_end|>") + (
                f"\n<|im_start|>user\nToo {hint}. Guess again.<|im_end|>\n<|im_start|>assistant\n")
        step_rewards.append(rewards)
        step_ends.append([end - 1 for _, end in runs])
    expected = process_advantages(step_rewards, step_ends, [len(t) for t in group["tokens"]], group["masks"])
    for got, want in zip(group["advantages"], expected):
        assert got == pytest.approx(want.tolist(), abs=1e-5)


def arithmetic_answer(question: str) -> int:
    a, verb, b = re.search(r"has (\d+) \w+ and (gets|gives away) (\d+)", question).groups()
    return int(a) + int(b) if verb == "gets" else int(a) - int(b)


def check_arithmetic_group(group: dict, tokenizer) -> None:
    for tokens, mask, score, advantages in zip(group["tokens"], group["masks"], group["scores"], group["advantages"]):
        (start, end), = sampled_runs(mask)  # one step
        assert advantages[:start] == [0.0] * start and len(set(advantages[start:])) == 1
        question = re.search(r"user\n(.*)<\|im_end\|>", tokenizer.decode(tokens[:start])).group(1)
        answer = arithmetic_answer(question)
        text = tokenizer.decode(tokens[start:end], skip_special_tokens=True)
        found = re.findall(r"####\s*(-?\d+)", text)
        assert score == (1.0 if found and int(found[-1]) == answer else 0.0)


# Three ways to map the guess game's answers: every text played (guess_any: episodes run to the turn limit),
# the first number (parse_guess: most answers of the untrained test model have none, so most episodes end
# with the parse penalty), and a guess the schema refuses (out_of_range: every episode ends with it).
PARSERS = {"guess_any": guess_any, "guess_parse": parse_guess, "guess_refused": out_of_range}


@pytest.mark.timeout(300)
def test_played_episodes_reach_run_api_token_for_token_with_process_credit(stack, tokenizer):
    specs = {name: load_spec(name, {**GUESS_ENTRY, "url": stack.guess.url, "max_groups": groups, "seed": seed,
                                    "action_function": f"recipe.atropos.tests.openenv_guess_actions:{parse.__name__}"})
             for (name, parse), groups, seed in zip(PARSERS.items(), (2, 2, 1), (0, 1, 2))}
    specs["arithmetic"] = load_spec("arithmetic", {"type": "openenv", "url": stack.arithmetic.url, "group_size": GROUP,
                                                   "concurrency": GROUP, "max_tokens": 16, "max_groups": 2, "seed": 3,
                                                   "max_batches_offpolicy": 0})

    async def all_entries() -> list[EpisodeStats]:
        return await asyncio.gather(*(run(stack.args(name), spec) for name, spec in specs.items()))

    stats = dict(zip(specs, asyncio.run(all_entries())))
    groups = stack.drain()
    by_name = {name: [g for g in groups if g["group_overrides"]["env_name"] == name] for name in specs}
    assert {name: len(g) for name, g in by_name.items()} == {name: spec.max_groups for name, spec in specs.items()}
    for name, parse in PARSERS.items():
        for group in by_name[name]:
            check_guess_group(group, tokenizer, stack.gateway, parse)
    for group in by_name["arithmetic"]:
        check_arithmetic_group(group, tokenizer)
    # Turns past the first were played (every text is a guess), refused guesses and unparseable answers
    # penalized and counted (the parse rate measured on the test model: no number in ~90% of its answers).
    assert max(len(sampled_runs(m)) for g in by_name["guess_any"] for m in g["masks"]) == 3
    assert stats["guess_refused"].total["action_rejected"] == stats["guess_refused"].total["episodes"] >= GROUP
    assert all(score == PENALTY for g in by_name["guess_refused"] for score in g["scores"])
    assert stats["guess_parse"].total["parse_failures"] >= 1
    assert sum(s.total["failures"] for s in stats.values()) == 0


def _driver_started_server() -> psutil.Process:
    """The guess server the driver started (the stack's own has no GUESS_FAULTS)."""
    for child in psutil.Process().children(recursive=True):
        if "openenv_guess_env" in " ".join(child.cmdline()) and "GUESS_FAULTS" in child.environ():
            return child
    raise AssertionError("the driver started no guess server")


@pytest.mark.timeout(300)
def test_server_errors_stalls_capacity_and_a_killed_server_cost_episodes_and_the_run_goes_on(stack, caplog):
    """The server the driver starts (command) raises at its 6th step and every 6th after, stalls 3 s at every
    9th (the step budget is 1 s), has 3 session slots for 4 episodes at once, and is killed once two groups
    are in. Every answer is played (guess_any), so the 8 episodes of those groups took >= 8 steps, plus the
    one that failed at step 6: the error and the stall come before the kill."""
    entry = {**GUESS_ENTRY, "command": openenv_server_argv(GUESS_APP), "max_groups": 5, "step_timeout_s": 1.0,
             "max_turns": 2, "action_function": "recipe.atropos.tests.openenv_guess_actions:guess_any",
             "command_env": {"GUESS_FAULTS": "error_every=6,stall_every=9,stall_s=3", "OPENENV_MAX_SESSIONS": "3"},
             "reconnect_max_wait_s": 120, "max_attempts_factor": 4}
    spec = load_spec("faulty", entry)
    stats = EpisodeStats()

    async def play_and_kill() -> None:
        driver = asyncio.create_task(run(stack.args("faulty"), spec, stats))
        while stats.total["pushed_groups"] < 2:
            assert not driver.done(), driver.exception()
            await asyncio.sleep(0.05)
        _driver_started_server().send_signal(signal.SIGKILL)
        await driver

    with caplog.at_level(logging.INFO, logger="verl.recipe.atropos"):
        asyncio.run(asyncio.wait_for(play_and_kill(), 240))
    stack.drain()
    logged = caplog.text
    assert stats.total["pushed_groups"] == 5
    # Every fault cost episodes, each logged with what the server said or did.
    assert re.search(r"EXECUTION_ERROR: injected fault at step \d+", logged)
    assert "did not answer step" in logged and stats.total["failures/timeout"] >= 1
    assert "closed the connection (code 1006" in logged
    assert stats.total["failures/server"] >= 2  # the injected error and the kill
    assert stats.total["capacity_waits"] >= 1 and "is full (Server at capacity: 3/3 sessions active" in logged
    assert "the OpenEnv server exited with code -9" in logged and "is back at" in logged
    # The driver stopped the server it started.
    with pytest.raises(AssertionError, match="no guess server"):
        _driver_started_server()


@pytest.mark.timeout(180)
def test_a_driver_stops_starting_groups_while_run_api_holds_enough_batches(stack):
    """max_batches_offpolicy=1 with batches of one group: the driver's two groups in flight may land, then it
    waits until the trainer takes a batch (here: the test), and completes once batches are taken."""
    spec = load_spec("bounded", {**GUESS_ENTRY, "url": stack.guess.url, "max_groups": 4, "max_batches_offpolicy": 1,
                                 "action_function": "recipe.atropos.tests.openenv_guess_actions:guess_any"})
    stats, queued = EpisodeStats(), []

    async def play_and_take() -> None:
        driver = asyncio.create_task(run(stack.args("bounded"), spec, stats))
        taken = 0
        while not driver.done():
            await asyncio.sleep(0.2)
            queued.append(stack.client.status().queue_size)
            if queued[-1] >= 1 and len(queued) >= 10 and queued[-10:] == [queued[-1]] * 10:
                assert stack.client.get_batch() is not None  # it is waiting: take a batch, as a trainer would
                taken += 1
        await driver
        assert taken >= 2

    asyncio.run(asyncio.wait_for(play_and_take(), 150))
    assert max(queued) <= 2 and stats.total["pushed_groups"] == 4
    stack.drain()


def test_a_session_speaks_openenvs_protocol(stack):
    async def session() -> None:
        env = await OpenEnvSession.open(stack.guess.url)
        first = await env.reset({"seed": 5})
        assert first.reward is None and not first.done and first.observation["prompt"].startswith("Game 5:")
        with pytest.raises(ActionRejected, match="less than or equal to 16"):
            await env.step({"guess": HIGHEST + 1})
        wrong = await env.step({"guess": secret_of(5) % HIGHEST + 1})  # the session survives a refused action
        assert wrong.reward == step_reward(secret_of(5) % HIGHEST + 1, secret_of(5)) and not wrong.done
        right = await env.step({"guess": secret_of(5)})
        assert (right.reward, right.done, right.observation["prompt"]) == (1.0, True, "Correct!")
        assert (await env.state())["step_count"] == 2
        await env.close()

    asyncio.run(session())


def test_an_entry_the_driver_cannot_play_stops_it_with_the_fix(stack):
    # The guess action is an integer: the answer's text cannot fill it without a parser.
    no_parser = {k: v for k, v in GUESS_ENTRY.items() if k != "action_function"}
    with pytest.raises(EpisodeSpecError, match=r"requires \{'guess': 'integer'\}.*action_function"):
        asyncio.run(run(stack.args("guess"), load_spec("guess", {**no_parser, "url": stack.guess.url})))
    with pytest.raises(EpisodeSpecError, match=r"prompt_template names \['question'\].*\['metadata', 'prompt'\]"):
        asyncio.run(run(stack.args("guess"), load_spec("guess", {**GUESS_ENTRY, "url": stack.guess.url,
                                                                  "prompt_template": "{question}"})))
    # Through the runner's command line: the spec's error names the key, exit code 2.
    both = json.dumps({**GUESS_ENTRY, "url": stack.guess.url, "command": ["x", "{port}"]})
    result = subprocess.run([PYTHON, "-m", "recipe.atropos.openenv", "--name", "guess", "--spec-json", both,
                             "--policy-url", stack.gateway.base_url, "--run-api", stack.api.url,
                             "--tokenizer", str(stack.model_dir)],
                            cwd=REPO_ROOT, env=repo_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "trainer.atropos.environments.guess" in result.stderr and "exactly one of url" in result.stderr


def test_a_single_step_environment_judges_verls_answers_in_evaluate_mode(stack):
    """Evaluate mode: verl's dataset rows come from the server's resets (prepare_data), and the adapter
    service scores each response by one step of the episode its ground truth resets."""
    table = asyncio.run(rows(stack.arithmetic.url, [0, 1, 2], "train", "openenv/arithmetic", ObservationPrompt()))
    prompts = [row["prompt"][0]["content"] for row in table]
    assert [json.loads(row["reward_model"]["ground_truth"]) for row in table] == [{"seed": s} for s in (0, 1, 2)]
    responses = [text for p in prompts for text in (f"So #### {arithmetic_answer(p)}", f"#### {arithmetic_answer(p) + 1}", "")]
    body = {"prompts": [p for p in prompts for _ in range(3)], "responses": responses,
            "ground_truths": [row["reward_model"]["ground_truth"] for row in table for _ in range(3)]}
    answer = requests.post(f"{stack.service.url}/evaluate_and_compute_advantages", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    scores = [1.0, 0.0, 0.0] * 3
    assert answer.json()["scores"] == scores
    expected = compute_grpo_outcome_advantages_np(scores, [0, 0, 0, 1, 1, 1, 2, 2, 2])
    assert answer.json()["advantages"] == pytest.approx(expected.tolist(), abs=1e-6)
    refused = requests.post(f"{stack.service.url}/evaluate_and_compute_advantages",
                            json={**body, "ground_truths": ["twelve"] * 9}, timeout=60)
    assert refused.status_code == 422 and "ground_truths[0]" in refused.text


_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=_TEXT, answer=_TEXT, second=_TEXT, stopped=st.booleans(), system=st.none() | _TEXT)
def test_turns_appended_without_retokenizing_read_as_the_chat_template_renders_them(
        tokenizer, first, answer, second, stopped, system):
    """Prompt + sampled answer + the next turn's appended tokens decode to what the chat template renders
    for the whole conversation, whether the answer ended with the stop token or was cut off."""
    renderer = ChatRenderer(tokenizer, system or None)
    prompt = renderer.first_turn({"role": "user", "content": first})
    sampled = tokenizer(answer, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if stopped else [])
    completion = Completion(tuple(sampled), (0.0,) * len(sampled), "stop" if stopped else "length")
    appended = renderer.next_turn({"role": "user", "content": second}, completion)
    messages = [*([{"role": "system", "content": system}] if system else []), {"role": "user", "content": first},
                {"role": "assistant", "content": answer}, {"role": "user", "content": second}]
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # Compared as the tokenizer reads text (it normalizes Unicode to NFC).
    assert tokenizer.decode(prompt + sampled + appended) == tokenizer.decode(tokenizer(expected, add_special_tokens=False)["input_ids"])


def test_the_openenv_demo_config_runs_its_driver_within_the_trainers_limits():
    """config/openenv_trajectory_cpu.yaml (make demo ARGS="--config openenv_trajectory_cpu"; the demo runs it
    through verl): the launcher starts the OpenEnv driver with the entry, and the entry's episodes fit what
    the trainer takes."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from recipe.atropos.config import AtroposTrainerConfig
    from recipe.atropos.launcher.config import load_launcher_config
    from recipe.atropos.launcher.plan import build_plan

    config_file = REPO_ROOT / "recipe/atropos/config/openenv_trajectory_cpu.yaml"
    with initialize_config_dir(config_dir=str(config_file.parent), version_base=None):
        config = compose(config_name=config_file.stem)
    atropos = AtroposTrainerConfig.from_config(config.trainer.atropos)
    entry = OmegaConf.to_container(config.trainer.atropos.environments.arithmetic)
    spec = load_spec("arithmetic", entry)
    assert atropos.mode == "trajectory" and spec.group_size == config.actor_rollout_ref.rollout.n
    assert spec.max_tokens <= config.data.max_response_length
    assert spec.max_token_length <= config.data.max_prompt_length + config.data.max_response_length
    plan = build_plan(load_launcher_config(config_file, []), config_file, [], run_dir=REPO_ROOT / "outputs" / "unused")
    (runner,) = plan.environments
    argv = list(runner.argv)
    assert argv[argv.index("-m") + 1] == "recipe.atropos.openenv"
    assert load_spec("arithmetic", json.loads(argv[argv.index("--spec-json") + 1])) == spec
    assert spec.command[0] == "{openenv_python}"  # the repo's .venv-openenv, wherever the launcher runs
