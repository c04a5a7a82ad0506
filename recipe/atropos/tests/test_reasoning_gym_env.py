"""reasoning-gym: the service as a real process over loopback, the parquet script, the shared judge
and the atroposlib environment's scoring. Run under ``loopback-only``.

Problems come from reasoning-gym itself (generated locally); right answers are the entries' own
answers, wrong ones are changed answers, so every expectation follows from the task's verifier.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

import pandas as pd
import pyarrow.parquet as pq
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recipe.atropos import protocol
from recipe.atropos.environments.reasoning_gym_env import (
    DATA_SOURCE_PREFIX,
    EntryRef,
    ReasoningGymConfig,
    ReasoningGymJudge,
    ScoringTimeout,
    build_dataset,
    rl_rows,
)
from recipe.atropos.tests.servers import LOOPBACK_HOST, ServerProcess, find_free_loopback_port

pytestmark = pytest.mark.timeout(120)

SERVER_FILE = "recipe/atropos/environments/reasoning_gym_server.py"
SERVED_TASKS = ("basic_arithmetic", "leg_counting")
# Tasks with one oracle answer that generate in milliseconds (a sweep of all 105 tasks found every
# single-answer task scoring its own answer 1.0; these keep the property test fast).
CHEAP_TASKS = ("basic_arithmetic", "leg_counting", "chain_sum", "letter_counting", "spell_backward", "word_sorting", "gcd")


def tagged(answer: str) -> str:
    return f"<think>working it out</think>\n<answer>{answer}</answer>"


def wrong_number(answer: str) -> str:
    return str(int(answer) + 7)


@pytest.fixture(scope="module")
def service():
    port = find_free_loopback_port()
    argv = [sys.executable, SERVER_FILE, "serve", "--slurm", "false", "--host", LOOPBACK_HOST, "--port", str(port),
            "--env.tasks", ",".join(SERVED_TASKS)]
    with ServerProcess(argv, port=port, env=dict(os.environ, HF_HUB_OFFLINE="1")).start(startup_timeout_s=90) as server:
        yield server


def evaluate(service: ServerProcess, payload: dict) -> requests.Response:
    return requests.post(service.url + protocol.EVALUATE_PATH, json=payload, timeout=60)


def test_service_scores_right_answers_1_and_wrong_ones_lower(service):
    rows = [row for task in SERVED_TASKS for row in rl_rows(task, 3, 10, range(2), "train")]
    prompts, responses, ground_truths, expected_right = [], [], [], []
    for row in rows:
        answer = row["extra_info"]["answer"]
        for response, right in ((tagged(answer), True), (tagged(wrong_number(answer)), False), (answer, False)):
            prompts.append(row["prompt"][-1]["content"])  # one group per problem
            responses.append(response)
            ground_truths.append(row["reward_model"]["ground_truth"])
            expected_right.append(right)

    reply = evaluate(service, {"prompts": prompts, "responses": responses, "ground_truths": ground_truths})

    assert reply.status_code == 200, reply.text
    body = reply.json()
    scores, advantages = body["scores"], body["advantages"]
    for score, advantage, right in zip(scores, advantages, expected_right):
        assert (score == 1.0) if right else (score < 1.0)
        assert (advantage > 0) if right else (advantage < 0)  # each group: one right, two wrong
    metrics = body["metrics"]
    assert metrics["accuracy"] == pytest.approx(1 / 3)
    assert metrics["answer_found_rate"] == pytest.approx(2 / 3)  # the bare answer has no <answer> tag
    assert metrics["num_groups"] == len(rows)
    for task in SERVED_TASKS:
        assert metrics[f"mean_reward/{task}"] == pytest.approx(1 / 3)
    health = requests.get(service.url + protocol.HEALTH_PATH, timeout=10).json()
    assert health["status"] == "ok" and health["env"] == "reasoning_gym"


@pytest.mark.parametrize(
    ("ground_truth", "fragment"),
    [
        (EntryRef("chain_sum", 3, 10, 0, "1").to_ground_truth(), "not served here"),  # a task not in --env.tasks
        (EntryRef("basic_arithmetic", 3, 10, 0, "not its answer").to_ground_truth(), "another reasoning-gym version"),
        (EntryRef("basic_arithmetic", 3, 10, 10, "1").to_ground_truth(), "outside the dataset's size"),
        ("42", "not a reasoning-gym ground truth"),  # a GSM8K-style plain answer
    ],
)
def test_service_refuses_ground_truths_it_cannot_judge_with_422(service, ground_truth, fragment):
    valid = rl_rows("basic_arithmetic", 3, 10, range(1), "train")[0]["reward_model"]["ground_truth"]
    reply = evaluate(
        service, {"prompts": ["p", "p"], "responses": ["<answer>1</answer>"] * 2, "ground_truths": [valid, ground_truth]}
    )
    assert reply.status_code == 422, reply.text
    message = reply.json()["error"]["message"]
    assert "ground_truths[1]" in message and fragment in message


def test_prepare_writes_verl_rl_parquet_with_disjoint_splits(tmp_path):
    from recipe.atropos.prepare_reasoning_gym import main

    main(["--tasks", "basic_arithmetic,leg_counting", "--out", str(tmp_path), "--train-size", "6", "--test-size", "3",
          "--seed", "11"])

    judge = ReasoningGymJudge(SERVED_TASKS)
    seen = {}
    for split, per_task in (("train", 6), ("test", 3)):
        table = pq.read_table(tmp_path / f"{split}.parquet")
        assert table.column_names == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
        frame = pd.read_parquet(tmp_path / f"{split}.parquet")
        assert len(frame) == 2 * per_task
        assert sorted(set(frame["data_source"])) == [DATA_SOURCE_PREFIX + t for t in SERVED_TASKS]
        for _, row in frame.iterrows():
            roles = [message["role"] for message in row["prompt"]]
            assert roles == ["system", "user"] and "<answer>" in row["prompt"][0]["content"]
            assert row["reward_model"]["style"] == "rule"
            ref = EntryRef.from_ground_truth(row["reward_model"]["ground_truth"])
            assert (ref.task, ref.seed, ref.size) == (row["extra_info"]["task"], 11, 9)
            assert row["data_source"] == DATA_SOURCE_PREFIX + ref.task and row["extra_info"]["split"] == split
            assert judge.score(tagged(row["extra_info"]["answer"]), row["reward_model"]["ground_truth"]) == 1.0
            json.loads(row["extra_info"]["metadata"])
            seen.setdefault(split, set()).add((ref.task, ref.index))
    assert not seen["train"] & seen["test"]


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(task=st.sampled_from(CHEAP_TASKS), seed=st.integers(0, 2**31), index=st.integers(0, 49))
def test_every_entry_scores_its_own_answer_1(task, seed, index):
    row = rl_rows(task, seed, 50, range(index, index + 1), "train")[0]
    judge = ReasoningGymJudge((task,))
    assert judge.score(tagged(row["extra_info"]["answer"]), row["reward_model"]["ground_truth"]) == 1.0
    assert judge.score("no tags at all", row["reward_model"]["ground_truth"]) == 0.0


def test_a_verifier_past_its_time_limit_scores_0():
    """polynomial_multiplication's verifier hands the answer to sympy: expanding this takes seconds."""
    ground_truth = rl_rows("polynomial_multiplication", 1, 4, range(1), "train")[0]["reward_model"]["ground_truth"]
    _, judgement = ReasoningGymJudge(score_timeout_s=0.3).judge(tagged("expand((x+y+1)**300)"), ground_truth)
    assert (judgement.score, judgement.status) == (0.0, "timeout")


def test_a_lost_alarm_fires_again(monkeypatch):
    """A signal handler's exception raised while a gc callback runs is dropped (a CI run lost the
    alarm that way, inside hypothesis' callback): the alarm must fire again, not once."""
    row = rl_rows("basic_arithmetic", 3, 10, range(1), "train")[0]
    interrupted = []

    def loses_the_first_alarm(answer, entry) -> float:
        deadline = time.monotonic() + 5
        try:
            while time.monotonic() < deadline:
                pass
        except ScoringTimeout:  # dropped, as a gc callback's exception is
            interrupted.append("first")
        while time.monotonic() < deadline:
            pass
        interrupted.append("never")  # ran to its end: only the first alarm ever fired
        return 1.0

    monkeypatch.setattr(build_dataset("basic_arithmetic", 3, 10), "score_answer", loses_the_first_alarm)
    _, judgement = ReasoningGymJudge(score_timeout_s=0.2).judge(tagged(row["extra_info"]["answer"]),
                                                               row["reward_model"]["ground_truth"])
    assert (judgement.score, judgement.status, interrupted) == (0.0, "timeout", ["first"])


def test_tasks_option_takes_a_comma_list_and_names_unknown_tasks():
    assert ReasoningGymConfig.model_validate({"tasks": "basic_arithmetic, leg_counting"}).tasks == SERVED_TASKS
    with pytest.raises(ValueError, match="did you mean basic_arithmetic"):
        ReasoningGymConfig.model_validate({"tasks": "basic_arithmetc"})


# ---- the atroposlib environment (trajectory mode) --------------------------------------------


def save_word_tokenizer(directory) -> str:
    """The smallest tokenizer folder AutoTokenizer loads (BaseEnv loads one at construction)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "answer": 1}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(directory)
    return str(directory)


def test_atroposlib_env_serves_generated_problems_and_scores_with_the_shared_judge(tmp_path):
    from recipe.atropos.environments.atropos_reasoning_gym_env import AtroposReasoningGymEnv

    env_config, servers = AtroposReasoningGymEnv.config_init()
    assert env_config.use_wandb is False and servers[0].server_type == "vllm"
    env_config = env_config.model_copy(
        update={"tokenizer_name": save_word_tokenizer(tmp_path / "tok"), "tasks": ",".join(SERVED_TASKS), "size": 3}
    )
    env = AtroposReasoningGymEnv(env_config, servers, slurm=False, testing=True)  # atroposlib's own server harness
    asyncio.run(env.setup())
    items = [asyncio.run(env.get_next_item()) for _ in range(6)]

    assert {EntryRef.from_ground_truth(gt).task for _, gt in items} == set(SERVED_TASKS)
    for messages, ground_truth in items:
        assert messages[-1]["role"] == "user"
        answer = EntryRef.from_ground_truth(ground_truth).answer
        assert env.judge.score(tagged(answer), ground_truth) == 1.0
        assert env.judge.score(tagged(wrong_number(answer)), ground_truth) < 1.0


def test_atroposlib_env_needs_exactly_one_data_source(tmp_path):
    from recipe.atropos.environments.atropos_reasoning_gym_env import AtroposReasoningGymEnvConfig, load_items

    with pytest.raises(ValueError, match="exactly one of --env.data_path"):
        load_items(AtroposReasoningGymEnvConfig())
    with pytest.raises(ValueError, match="exactly one of --env.data_path"):
        load_items(AtroposReasoningGymEnvConfig(data_path="x.parquet", tasks="gcd"))
