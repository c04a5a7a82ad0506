"""The recipe's GPU config, run script, example entry point and GSM8K preparation script."""

from __future__ import annotations

import dataclasses
import json
import subprocess

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from recipe.atropos.config import AtroposTrainerConfig
from recipe.atropos.prepare_gsm8k import extract_final_answer
from recipe.atropos.demo.tiny_assets import make_problems

from .conftest import PYTHON, REPO_ROOT, repo_env

CONFIG_DIR = REPO_ROOT / "recipe/atropos/config"


def compose_recipe(name: str = "gsm8k_grpo_example", overrides: list[str] | None = None):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name=name, overrides=overrides or [])


def test_gpu_config_composes_and_passes_verls_validation():
    from verl.trainer.main_ppo import load_trainer_cls
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    config = compose_recipe()
    OmegaConf.resolve(config)
    assert config.algorithm.adv_estimator == "grpo"
    assert config.actor_rollout_ref.model.path == "Qwen/Qwen2.5-3B-Instruct"
    assert config.actor_rollout_ref.rollout.name == "vllm" and config.trainer.n_gpus_per_node == 8
    assert config.trainer.use_v1 is False
    validate_config(config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    assert load_trainer_cls(config.trainer_cls).__name__ == "RayGRPOAtroposTrainer"
    atropos = AtroposTrainerConfig.from_config(config.trainer.atropos)
    assert atropos == AtroposTrainerConfig()  # the yaml defaults are the dataclass's


def test_gpu_trajectory_example_composes_and_its_environment_matches_the_trainer():
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    from recipe.atropos.launcher.config import load_launcher_config
    from recipe.atropos.launcher.plan import build_plan

    config = compose_recipe("gsm8k_trajectory_example")
    evaluate = compose_recipe()
    # The shared GPU part is the same in both examples.
    for key in ("actor_rollout_ref.model", "actor_rollout_ref.actor.optim", "actor_rollout_ref.rollout.name",
                "actor_rollout_ref.rollout.n", "trainer.n_gpus_per_node"):
        assert OmegaConf.select(config, key) == OmegaConf.select(evaluate, key), key
    validate_config(config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    atropos = AtroposTrainerConfig.from_config(config.trainer.atropos)
    assert atropos.mode == "trajectory" and atropos.policy_gateway_port == 8001
    config_file = CONFIG_DIR / "gsm8k_trajectory_example.yaml"
    plan = build_plan(load_launcher_config(config_file, []), config_file, [], run_dir=REPO_ROOT / "outputs" / "unused")
    (env,) = plan.environments
    command = list(env.argv)
    # The environment generates through the gateway, in groups of rollout.n, answers as long as
    # the trainer accepts.
    assert command[command.index("--openai.base_url") + 1] == "http://127.0.0.1:8001/v1"
    assert int(command[command.index("--env.group_size") + 1]) == config.actor_rollout_ref.rollout.n
    assert int(command[command.index("--env.max_response_tokens") + 1]) == config.data.max_response_length


def test_generated_defaults_yaml_and_readme_table_match_the_definition():
    from recipe.atropos import config

    assert config.stale_files() == [], "run: python -m recipe.atropos.config --write"
    # Every key is documented where it is defined, in one of the mode groups.
    for spec in dataclasses.fields(AtroposTrainerConfig):
        assert spec.metadata["group"] in config.GROUPS and len(spec.metadata["doc"]) > 20, spec.name


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"api_ur": "x"}, r"trainer.atropos has unknown keys \['api_ur'\]; known: \[.*'api_url'"),
        ({"retry_attempts": "many"}, r"trainer.atropos.retry_attempts must be int, got 'many'"),
        ({"timeout": True}, r"trainer.atropos.timeout must be float, got True"),
        ({"send_token_ids": "maybe"}, r"trainer.atropos.send_token_ids must be bool, got 'maybe'"),
        ({"api_url": None}, r"trainer.atropos.api_url must be str, got None"),
        ({"retry_attempts": 0}, r"trainer.atropos.retry_attempts must be >= 1, got 0"),
        ({"policy_gateway_port": 70000}, r"trainer.atropos.policy_gateway_port must be in 0..65535, got 70000"),
        ({"policy_drain_timeout_s": -1}, r"trainer.atropos.policy_drain_timeout_s must be >= 0, got -1.0"),
        ({"mode": "judge"}, r"trainer.atropos.mode must be one of \('evaluate', 'trajectory'\), got 'judge'"),
    ],
)
def test_bad_trainer_atropos_settings_name_the_key_the_value_and_what_it_must_be(settings, message):
    with pytest.raises(ValueError, match=message):
        AtroposTrainerConfig.from_config(settings)


def test_launcher_reads_trainer_atropos_through_the_trainers_definition(monkeypatch):
    from recipe.atropos.launcher.config import LauncherConfigError, load_launcher_config

    config_file = CONFIG_DIR / "gsm8k_trajectory_example.yaml"
    monkeypatch.delenv("ATROPOS_POLICY_API_KEY", raising=False)
    launcher = load_launcher_config(config_file, ["trainer.atropos.policy_gateway_host=localhost"])
    assert launcher.mode == "trajectory" and launcher.policy_gateway_host == "localhost"
    # What the trainer refuses, the launcher refuses before it starts anything, in the same words.
    for override, message in (("+trainer.atropos.api_ur=x", "unknown keys ['api_ur']"),
                              ("trainer.atropos.policy_gateway_port=http", "policy_gateway_port must be int, got 'http'")):
        with pytest.raises(LauncherConfigError, match="trainer.atropos") as refused:
            load_launcher_config(config_file, [override])
        assert message in str(refused.value)


def _cfg_job(argv: list[str]) -> str:
    result = subprocess.run(argv, cwd=REPO_ROOT, env=repo_env(PYTHON=PYTHON), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_run_script_example_and_main_ppo_compose_the_same_config():
    override = "trainer.atropos.api_url=http://localhost:9555"
    via_script = _cfg_job(["bash", "recipe/atropos/run_qwen2_5-3b_atropos_grpo.sh", override, "--cfg", "job"])
    via_example = _cfg_job([PYTHON, "recipe/atropos/example_gsm8k_grpo.py", "--config-name", "gsm8k_grpo_example", override, "--cfg", "job"])
    via_main_ppo = _cfg_job([PYTHON, "-m", "verl.trainer.main_ppo", "--config-path", "recipe/atropos/config",
                             "--config-name", "gsm8k_grpo_example", override, "--cfg", "job"])
    assert "api_url: http://localhost:9555" in via_script
    assert via_script == via_example == via_main_ppo


@pytest.mark.parametrize(
    ("solution", "answer"),
    [("so 3+4=7\n#### 7", "7"), ("#### 1,000", "1000"), ("#### -12", "-12"), ("#### $5", "5"), ("#### 2.5", "2.5")],
)
def test_final_answer_extraction(solution, answer):
    assert extract_final_answer(solution) == answer


def test_preparation_on_a_local_file_gives_what_rlhf_dataset_loads(tmp_path, tiny_assets):
    from transformers import AutoTokenizer

    from verl.utils.dataset.rl_dataset import RLHFDataset

    problems = make_problems(12, seed=3)
    for split in ("train", "test"):
        with open(tmp_path / f"{split}.jsonl", "w") as f:
            for p in problems:
                f.write(json.dumps({"question": p.question, "answer": p.solution}) + "\n")
    out = tmp_path / "gsm8k"
    result = subprocess.run(
        [PYTHON, "recipe/atropos/prepare_gsm8k.py", "--out", str(out),
         "--train-file", str(tmp_path / "train.jsonl"), "--test-file", str(tmp_path / "test.jsonl")],
        cwd=REPO_ROOT, env=repo_env(), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    frame = pd.read_parquet(out / "train.parquet")
    assert list(frame.columns) == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
    assert frame.reward_model[0]["ground_truth"] == problems[0].answer
    assert "\\boxed{}" in frame.prompt[0][0]["content"]

    data_config = compose_recipe(overrides=["data.max_prompt_length=256"]).data
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets.model_dir)
    dataset = RLHFDataset(data_files=[str(out / "train.parquet")], tokenizer=tokenizer, config=data_config)
    assert len(dataset) == 12
    item = dataset[0]
    assert item["reward_model"]["ground_truth"] == problems[0].answer
    assert item["data_source"] == "openai/gsm8k"
