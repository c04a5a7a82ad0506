"""Several environments in evaluate mode (trainer.atropos.environments): routing by data_source to
two real services over loopback (GSM8K and reasoning-gym), one killed mid-run, the weighted
sampler, and the errors. Run under ``loopback-only``.

Each sample's expected advantage is what its own service answers when asked directly for that
environment's rows, and each service's /health counts what it scored: a sample sent to the wrong
service would be refused there (neither service can judge the other's ground truths).
"""

from __future__ import annotations

import math
import sys
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import requests
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import PreTrainedTokenizerFast

from recipe.atropos import protocol
from recipe.atropos.config import AtroposTrainerConfig
from recipe.atropos.environments.reasoning_gym_env import rl_rows
from recipe.atropos.evaluate.environments import UnknownDataSourceError, parse_environment_specs
from recipe.atropos.evaluate.feedback import EnvironmentServiceError
from recipe.atropos.evaluate.mixing import WeightedDataSourceSampler, weighted_train_sampler
from recipe.atropos.evaluate.mode import EvaluateMode
from recipe.atropos.evaluate.multi import ENV_METRICS, MultiEnvironmentFeedback, split_by_environment
from recipe.atropos.grpo_computer import AtroposGRPOComputer
from recipe.atropos.tests.servers import LOOPBACK_HOST, ServerProcess, find_free_loopback_port
from verl import DataProto
from verl.trainer.ppo import core_algos

pytestmark = pytest.mark.timeout(120)

GSM8K, RG = "openai/gsm8k", "reasoning_gym/basic_arithmetic"


def start(server_file: str, *options: str) -> ServerProcess:
    port = find_free_loopback_port()
    argv = [sys.executable, f"recipe/atropos/environments/{server_file}", "serve", "--slurm", "false",
            "--host", LOOPBACK_HOST, "--port", str(port), *options]
    return ServerProcess(argv, port=port).start(startup_timeout_s=90)


def start_rg() -> ServerProcess:
    return start("reasoning_gym_server.py", "--env.tasks", "basic_arithmetic")


@pytest.fixture(scope="module")
def gsm8k_service():
    with start("gsm8k_server.py") as service:
        yield service


@pytest.fixture(scope="module")
def rg_service():
    with start_rg() as service:
        yield service


@pytest.fixture(scope="module")
def tokenizer(tiny_assets):
    return PreTrainedTokenizerFast.from_pretrained(tiny_assets.model_dir)


def rows() -> list[dict]:
    """8 samples in 4 GRPO groups of 2 (one right, one wrong answer), the two environments' rows
    interleaved so that routing has to pick rows out of the middle of the batch."""
    rg = rl_rows("basic_arithmetic", 3, 10, range(2), "train")
    out = []
    for g, truth in enumerate((7, 12)):
        gt = f"Some steps <<3+4=7>>\n#### {truth}"
        out += [dict(prompt=f"Tom has {truth} apples.", response=f"So \\boxed{{{truth}}}", uid=f"gsm{g}", gt=gt, source=GSM8K, reward=1.0),
                dict(prompt=f"Tom has {truth} apples.", response=f"#### {truth + 1}", uid=f"gsm{g}", gt=gt, source=GSM8K, reward=0.0)]
        row = rg[g]
        answer, gt = row["extra_info"]["answer"], row["reward_model"]["ground_truth"]
        question = row["extra_info"]["question"]
        out += [dict(prompt=question, response=f"<answer>{answer}</answer>", uid=f"rg{g}", gt=gt, source=RG, reward=1.0),
                dict(prompt=question, response=f"<answer>{int(answer) + 7}</answer>", uid=f"rg{g}", gt=gt, source=RG, reward=0.0)]
    order = [0, 2, 1, 3, 6, 4, 7, 5]  # interleaved, groups not adjacent
    return [out[i] for i in order]


def make_batch(tokenizer, samples: list[dict]) -> DataProto:
    """A verl batch as the trainer has it at old-log-prob: texts tokenised and padded, verl's own
    GRPO advantages already computed from `reward`."""
    pad, P, T = tokenizer.pad_token_id, 48, 24
    prompt_rows, response_rows = [], []
    for s in samples:
        p_ids, r_ids = tokenizer(s["prompt"]).input_ids[-P:], tokenizer(s["response"]).input_ids[:T]
        prompt_rows.append([pad] * (P - len(p_ids)) + p_ids)
        response_rows.append(r_ids + [pad] * (T - len(r_ids)))
    prompts_BP, responses_BT = torch.tensor(prompt_rows), torch.tensor(response_rows)
    mask_BT = (responses_BT != pad).long()
    rewards_BT = torch.zeros(responses_BT.shape)
    rewards_BT[torch.arange(len(samples)), mask_BT.sum(-1) - 1] = torch.tensor([s["reward"] for s in samples])
    uids = np.array([s["uid"] for s in samples], dtype=object)
    advantages_BT, _ = core_algos.compute_grpo_outcome_advantage(rewards_BT, mask_BT, uids)
    return DataProto.from_dict(
        tensors={"prompts": prompts_BP, "responses": responses_BT, "response_mask": mask_BT,
                 "attention_mask": torch.cat([(prompts_BP != pad).long(), mask_BT], dim=-1),
                 "token_level_rewards": rewards_BT, "advantages": advantages_BT, "returns": advantages_BT},
        non_tensors={"uid": uids, "data_source": np.array([s["source"] for s in samples], dtype=object),
                     "reward_model": np.array([{"ground_truth": s["gt"]} for s in samples], dtype=object)},
    )


def environments(gsm8k_url: str, rg_url: str) -> dict:
    return {"gsm8k": {"api_url": gsm8k_url, "data_sources": [GSM8K]},
            "rg": {"api_url": rg_url, "data_sources": [RG, "reasoning_gym/leg_counting"]}}


def make_feedback(envs: dict, **overrides) -> MultiEnvironmentFeedback:
    # A first evaluation can take a second or more (the judges warm up): a shorter timeout would
    # retry it, and the service would count both.
    config = AtroposTrainerConfig.from_config({"environments": envs, "retry_attempts": 2, "retry_delay": 0.01,
                                               "max_wait_time": 30.0, "timeout": 15.0, **overrides})
    specs = parse_environment_specs(config.environments)  # as the trainer parses it, once
    return MultiEnvironmentFeedback(config, None, AtroposGRPOComputer(allow_fallback=config.fallback_to_grpo), specs)


def samples_scored(service: ServerProcess) -> int:
    return requests.get(service.url + "/health", timeout=10).json()["samples_scored"]


def direct_advantages(service: ServerProcess, samples: list[dict]) -> list[float]:
    """What the service itself answers for these samples (texts as the trainer decodes them)."""
    body = {"prompts": [s["prompt"] for s in samples], "responses": [s["response"] for s in samples],
            "group_ids": [s["uid"] for s in samples], "ground_truths": [s["gt"] for s in samples]}
    answer = requests.post(service.url + protocol.EVALUATE_PATH, json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    return [float(np.mean(a)) for a in answer.json()["advantages"]]


def run_step(feedback, tokenizer, samples, step):
    batch = make_batch(tokenizer, samples)
    feedback.lanes["gsm8k"].tokenizer = feedback.lanes["rg"].tokenizer = tokenizer
    grpo_BT = batch.batch["advantages"].clone()
    feedback.submit(batch, step=step)
    return batch, grpo_BT, feedback.apply(batch, step=step)


def assert_rows(batch, row_ids, expected_B):
    mask = batch.batch["response_mask"].bool()
    for i, expected in zip(row_ids, expected_B):
        on_response = batch.batch["advantages"][i][mask[i]]
        assert torch.allclose(on_response, torch.full_like(on_response, float(expected)), atol=1e-5), (i, on_response, expected)


def test_each_sample_is_judged_by_the_environment_owning_its_data_source(gsm8k_service, rg_service, tokenizer):
    samples = rows()
    for s in samples:  # the texts the services get are the decoded tokens: they must survive the trip
        assert tokenizer.decode(tokenizer(s["response"]).input_ids, skip_special_tokens=True) == s["response"]
    feedback = make_feedback(environments(gsm8k_service.url, rg_service.url))
    assert feedback.check_health() == {"gsm8k": True, "rg": True}
    before = {name: samples_scored(service) for name, service in (("gsm8k", gsm8k_service), ("rg", rg_service))}
    batch, _, metrics = run_step(feedback, tokenizer, samples, step=1)
    # Each service's own record: it scored exactly its environment's rows (sent once each).
    assert metrics["atropos/retries"] == 0.0
    assert samples_scored(gsm8k_service) - before["gsm8k"] == 4 and samples_scored(rg_service) - before["rg"] == 4
    # Per sample: the advantage trained on is what the owning service answers for it.
    for service, source in ((gsm8k_service, GSM8K), (rg_service, RG)):
        row_ids = [i for i, s in enumerate(samples) if s["source"] == source]
        expected = direct_advantages(service, [samples[i] for i in row_ids])
        assert_rows(batch, row_ids, expected)
        assert all(abs(e) > 0.1 for e in expected)  # one right, one wrong per group: no zero advantages
    assert metrics["atropos/override_fraction"] == 1.0 and metrics["atropos/fallback"] == 0.0
    for name in ("gsm8k", "rg"):
        assert {f"atropos/env/{name}/{m}" for m in ENV_METRICS} <= set(metrics)
        assert metrics[f"atropos/env/{name}/batch_share"] == 0.5 and metrics[f"atropos/env/{name}/fallback"] == 0.0
        assert metrics[f"atropos/env/{name}/accuracy"] == 0.5 and metrics[f"atropos/env/{name}/mean_score"] == 0.5
        assert metrics[f"atropos/env/{name}/latency_s"] > 0
        env_rows = torch.tensor([i for i, s in enumerate(samples) if s["source"] == (GSM8K if name == "gsm8k" else RG)])
        on_response = batch.batch["advantages"][env_rows][batch.batch["response_mask"][env_rows].bool()]
        assert metrics[f"atropos/env/{name}/advantage_mean"] == pytest.approx(on_response.mean().item(), abs=1e-6)
        assert metrics[f"atropos/env/{name}/advantage_std"] == pytest.approx(on_response.std().item(), abs=1e-6)
    feedback.close()


def test_a_killed_environment_costs_its_own_samples_only(gsm8k_service, tokenizer, caplog):
    samples = rows()
    rg_only_here = start_rg()
    feedback = make_feedback(environments(gsm8k_service.url, rg_only_here.url))
    try:
        _, _, metrics = run_step(feedback, tokenizer, samples, step=1)
        assert metrics["atropos/env/rg/fallback"] == 0.0
        rg_only_here.stop()  # killed mid-run
        for step in (2, 3):
            batch, grpo_BT, metrics = run_step(feedback, tokenizer, samples, step=step)
            gsm_rows = [i for i, s in enumerate(samples) if s["source"] == GSM8K]
            rg_rows = [i for i, s in enumerate(samples) if s["source"] == RG]
            assert_rows(batch, gsm_rows, direct_advantages(gsm8k_service, [samples[i] for i in gsm_rows]))
            # The dead environment's samples train on verl's GRPO of their own reward.
            assert torch.allclose(batch.batch["advantages"][rg_rows], grpo_BT[rg_rows], atol=1e-6)
            assert metrics["atropos/env/rg/fallback"] == 1.0 and math.isnan(metrics["atropos/env/rg/latency_s"])
            assert metrics["atropos/env/gsm8k/fallback"] == 0.0 and metrics["atropos/env/gsm8k/latency_s"] > 0
            assert metrics["atropos/override_fraction"] == 0.5 and metrics["atropos/fallback"] == 0.0
            assert metrics["atropos/fallback_environments"] == 1.0 and "atropos/env/rg/mean_score" not in metrics
        assert sum("using standard GRPO until it answers again" in r.message for r in caplog.records) == 1
    finally:
        feedback.close()
        rg_only_here.stop()


def test_a_down_environment_stops_the_run_without_fallback(gsm8k_service, tokenizer):
    dead = f"http://{LOOPBACK_HOST}:{find_free_loopback_port()}"
    feedback = make_feedback(environments(gsm8k_service.url, dead), fallback_to_grpo=False)
    with pytest.raises(EnvironmentServiceError, match=rf"service 'rg' at {dead} does not answer /health.*environments.rg.api_url"):
        feedback.check_health()
    feedback.close()


def test_a_data_source_without_environment_is_a_clear_error(gsm8k_service, tokenizer):
    feedback = make_feedback({"gsm8k": {"api_url": gsm8k_service.url, "data_sources": [GSM8K]}})
    batch = make_batch(tokenizer, rows())
    with pytest.raises(UnknownDataSourceError, match=rf"\['{RG}'\] belongs to no environment .*'gsm8k': \['{GSM8K}'\].*add each"):
        feedback.submit(batch, step=1)
    # At start, from the training data, before any worker: EvaluateMode.before_workers.
    mode = EvaluateMode(feedback.config, tokenizer, feedback.computer, feedback.specs)
    trainer = SimpleNamespace(train_dataset=SimpleNamespace(dataframe=datasets.Dataset.from_dict({"data_source": [GSM8K, "other/x"]})))
    with pytest.raises(UnknownDataSourceError, match=r"\['other/x'\] belongs to no environment"):
        mode.before_workers(trainer)
    mode.close()
    feedback.close()


def test_a_group_spanning_two_environments_is_refused():
    specs = parse_environment_specs(environments("http://a", "http://b"))
    rows_by_env = split_by_environment(specs, np.array([GSM8K, RG, GSM8K, RG]), np.array(["u0", "u1", "u0", "u1"]))
    assert {k: v.tolist() for k, v in rows_by_env.items()} == {"gsm8k": [0, 2], "rg": [1, 3]}
    with pytest.raises(ValueError, match=r"uid='u0' has rows of environment 'gsm8k' and 'rg'"):
        split_by_environment(specs, np.array([GSM8K, RG]), np.array(["u0", "u0"]))


@pytest.mark.parametrize(("envs", "words"), [
    ({"g": {"api_url": "127.0.0.1:9001", "data_sources": ["a"]}}, ["environments.g.api_url", "'127.0.0.1:9001'", "http://"]),
    ({"g": {"api_url": "http://x", "data_sources": ["a"], "wieght": 1}}, ["environments.g", "['wieght']", "use only"]),
    ({"g": {"api_url": "http://x", "data_sources": ["a"], "weight": -1}}, ["environments.g.weight", "-1", "> 0"]),
    ({"g": {"api_url": "http://x", "data_sources": ["a"], "weight": 1}, "h": {"api_url": "http://y", "data_sources": ["b"]}},
     ["weight is set on ['g'] but not on ['h']", "every environment"]),
    ({"g": {"api_url": "http://x", "data_sources": ["a"]}, "h": {"api_url": "http://y", "data_sources": ["a"]}},
     ["environments.h.data_sources", "'a' is already owned by environment 'g'"]),
])
def test_bad_environments_are_named_at_parse(envs, words):
    with pytest.raises(ValueError) as error:
        AtroposTrainerConfig.parse({"environments": envs})
    for word in words:
        assert word in str(error.value)


def test_each_environment_key_comes_from_its_variable(gsm8k_service):
    envs = environments(gsm8k_service.url, gsm8k_service.url)
    envs["rg"]["api_key_env"] = "RG_KEY"
    config = AtroposTrainerConfig.from_config({"environments": envs}, environ={"ATROPOS_API_KEY": "shared"})
    with pytest.raises(ValueError, match=r"environments.rg.api_key_env: the environment variable RG_KEY is not set.*export RG_KEY"):
        MultiEnvironmentFeedback(config, None, AtroposGRPOComputer(), parse_environment_specs(envs), environ={})
    feedback = MultiEnvironmentFeedback(config, None, AtroposGRPOComputer(), parse_environment_specs(envs),
                                        environ={"RG_KEY": "rg-secret"})
    assert feedback.specs["rg"].api_key == "rg-secret" and feedback.specs["gsm8k"].api_key == "shared"
    assert feedback.lanes["rg"].client._session.headers["Authorization"] == "Bearer rg-secret"
    feedback.close()


# --------------------------------------------------------------------------------------------
# The weighted sampler
# --------------------------------------------------------------------------------------------


def binomial_ok(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1


@settings(max_examples=15, deadline=None)
@given(weight=st.floats(0.05, 0.95), rows_a=st.integers(1, 50), rows_b=st.integers(1, 2000), seed=st.integers(0, 2**16))
def test_the_sampler_draws_environments_by_weight_whatever_their_sizes(weight, rows_a, rows_b, seed):
    specs = parse_environment_specs({"a": {"api_url": "http://a", "data_sources": ["sa"], "weight": weight},
                                     "b": {"api_url": "http://b", "data_sources": ["sb1", "sb2"], "weight": 1 - weight}})
    sources = ["sa"] * rows_a + ["sb1", "sb2"] * (rows_b // 2) + ["sb1"] * (rows_b % 2)
    n = 4000
    drawn = list(WeightedDataSourceSampler(sources, specs, seed=seed, num_samples=n))
    from_a = sum(sources[i] == "sa" for i in drawn)
    assert len(drawn) == n and binomial_ok(from_a, n, weight), (from_a, n * weight)


def test_the_sampler_goes_into_verls_dataloader_and_resumes_where_it_stopped():
    specs = parse_environment_specs({"a": {"api_url": "http://a", "data_sources": ["sa"], "weight": 3},
                                     "b": {"api_url": "http://b", "data_sources": ["sb"], "weight": 1}})
    frame = datasets.Dataset.from_dict({"data_source": ["sa"] * 4 + ["sb"] * 396, "i": list(range(400))})
    dataset = SimpleNamespace(dataframe=frame)
    # As verl's RayPPOTrainer._create_dataloader builds it from its `train_sampler` argument.
    loader = StatefulDataLoader(list(range(400)), batch_size=20, drop_last=True,
                                sampler=weighted_train_sampler(specs, dataset, seed=7))
    assert len(loader) == 20  # verl's step count is unchanged
    batches = []
    for epoch in range(5):
        batches += [b.tolist() for b in loader]
    rows = [i for b in batches for i in b]
    assert binomial_ok(sum(i < 4 for i in rows), len(rows), 0.75)
    # A checkpoint mid-epoch: a new loader given its state draws the same continuation.
    iterator = iter(loader)
    seen = [next(iterator).tolist() for _ in range(3)]
    state = loader.state_dict()
    rest = [b.tolist() for b in iterator]
    resumed = StatefulDataLoader(list(range(400)), batch_size=20, drop_last=True,
                                 sampler=weighted_train_sampler(specs, dataset, seed=7))
    resumed.load_state_dict(state)
    assert [b.tolist() for b in resumed] == rest and len(seen) + len(rest) == 20
