"""Atropos environments as they are: unchanged environments train, and a stuck run says why.

The environment under test (``chat_env_tokenize.py``) is written the way Atropos writes its own:
a ``BaseEnv`` with ``config_init`` and ``cli()``, two chat turns through ``server.chat_completion``
(``server_type: openai``) and atroposlib's ``tokenize_for_trainer``. It is started by the launcher
(``launcher.environments[i].command``), generating through the trainer's policy gateway in front of
the CPU rollout's ``/v1/chat/completions``. Run under ``../shared/bin/loopback-only``.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import requests

from recipe.atropos.demo.run_report import read_jsonl, read_steps
from recipe.atropos.tests.chat_env_tokenize import ramp
from recipe.atropos.tests.conftest import PYTHON, REPO_ROOT, repo_env
from recipe.atropos.tests.servers import find_free_loopback_port, start_cpu_policy_server
from recipe.atropos.trajectory.rollout import TrajectoryGroupSizeError, _check_normalizable, check_group_size

CONFIG = REPO_ROOT / "recipe" / "atropos" / "config" / "gsm8k_trajectory_cpu.yaml"
LAUNCHER = REPO_ROOT / "recipe" / "atropos" / "launch_atropos_verl_services.py"
CHAT_ENV = REPO_ROOT / "recipe" / "atropos" / "tests" / "chat_env_tokenize.py"
RUNNER = "recipe.atropos.environments.run_env"


def write_problems(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "problems.jsonl", "w") as f:
        for a in range(1, 9):
            f.write(json.dumps({"question": f"What is {a} + 2?", "answer": a + 2}) + "\n")
    return folder


def chat_environment(workdir: Path, *extra: str) -> str:
    """Override: the unchanged chat environment, run from `workdir` (where its problems.jsonl is)."""
    words = [
        "python", f"'{CHAT_ENV}'", "serve", "--slurm", "'false'", "--openai.base_url", "'{policy_base_url}'",
        "--openai.model_name", "'{model}'", "--openai.api_key", "x", "--openai.server_type", "openai",
        "--env.tokenizer_name", "'{tokenizer}'", "--env.rollout_server_url", "'{trajectory_api_url}'",
        "--env.group_size", "'4'", "--env.use_wandb", "'false'", "--env.max_num_workers", "'2'",
        "--env.max_turn_tokens", "'6'", *extra,
    ]
    return (
        f"launcher.environments=[{{name:chat,workdir:'{workdir}',command:[{','.join(words)}],"
        "env:{WANDB_MODE:disabled},max_restarts:0}]"
    )


# --------------------------------------------------------------------------------------------
# The compatibility module: what breaks without it
# --------------------------------------------------------------------------------------------

TOKENIZE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from transformers import AutoTokenizer
    from atroposlib.utils.tokenize_for_trainer import tokenize_for_trainer
    tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
    chat = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"},
            {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "yes 5"}]
    out = tokenize_for_trainer(tokenizer, chat, train_on_all_assistant_turns=True)
    print(json.dumps({"tokens": out["tokens"], "masks": out["masks"],
                      "ids": tokenizer.apply_chat_template(chat, tokenize=False)}))
    """
)


@pytest.mark.timeout(120)
def test_tokenize_for_trainer_sends_token_ids_only_through_the_runner(tiny_assets, tmp_path):
    script = tmp_path / "tokenize_env.py"
    script.write_text(TOKENIZE_SCRIPT)
    plain = subprocess.run([PYTHON, str(script), str(tiny_assets.model_dir)], capture_output=True, text=True,
                           env=repo_env(), timeout=100)
    # atroposlib 0.4.0 under transformers 5: the group cannot be sent (what environments log).
    assert plain.returncode != 0 and "not JSON serializable" in plain.stderr, plain.stderr[-2000:]

    wrapped = subprocess.run([PYTHON, "-m", RUNNER, str(script), str(tiny_assets.model_dir)], capture_output=True,
                             text=True, env=repo_env(), timeout=100, cwd=tmp_path)
    assert wrapped.returncode == 0, wrapped.stderr[-2000:]
    out = json.loads(wrapped.stdout)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_assets.model_dir))
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"},
         {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "yes 5"}], tokenize=False)
    assert out["tokens"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(out["masks"]) == len(out["tokens"])
    trained = [t for t, m in zip(out["tokens"], out["masks"]) if m != -100]
    # Both assistant turns are trained, the user's follow-up is not.
    assert tokenizer.decode(trained).count("5") == 2 and "Sure" not in tokenizer.decode(trained)
    assert out["masks"][0] == -100 and out["masks"][-1] != -100


@pytest.mark.timeout(60)
def test_runner_runs_modules_and_reports_a_missing_file(tmp_path):
    (tmp_path / "pkg_mod.py").write_text("import sys; print('ARGS', sys.argv[1:])")
    ran = subprocess.run([PYTHON, "-m", RUNNER, "-m", "pkg_mod", "serve", "--x", "1"], capture_output=True, text=True,
                         env=repo_env(PYTHONPATH=f"{REPO_ROOT}:{tmp_path}"), timeout=50)
    assert ran.returncode == 0 and "ARGS ['serve', '--x', '1']" in ran.stdout, ran.stderr
    missing = subprocess.run([PYTHON, "-m", RUNNER, "nope.py", "serve"], capture_output=True, text=True,
                             env=repo_env(), timeout=50, cwd=tmp_path)
    assert missing.returncode != 0 and "'nope.py' is not a file" in missing.stderr


# --------------------------------------------------------------------------------------------
# Chat on the CPU policy server
# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_cpu_server_chats_with_the_chat_template_logprobs_and_token_ids(tiny_assets):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_assets.model_dir))
    server = start_cpu_policy_server(tiny_assets.model_dir, served_model_name="policy")
    try:
        messages = [{"role": "system", "content": "Answer with one number."}, {"role": "user", "content": "What is 2 + 3?"}]
        answer = requests.post(f"{server.url}/v1/chat/completions", json={
            "model": "anything", "messages": messages, "max_tokens": 6, "n": 3, "logprobs": True, "top_logprobs": 2,
            "return_token_ids": True, "seed": 1,
        }, timeout=60).json()
        prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert answer["prompt_token_ids"] == tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        assert answer["object"] == "chat.completion" and len(answer["choices"]) == 3
        for choice in answer["choices"]:
            ids, content = choice["token_ids"], choice["logprobs"]["content"]
            assert 1 <= len(ids) <= 6 and len(content) == len(ids)
            assert choice["message"] == {"role": "assistant", "tool_calls": [],
                                         "content": tokenizer.decode(ids, skip_special_tokens=True)}
            assert all(entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 2 for entry in content)
            assert choice["finish_reason"] in ("stop", "length")
        as_ids = requests.post(f"{server.url}/v1/chat/completions", json={
            "messages": messages, "max_tokens": 3, "logprobs": True, "return_tokens_as_token_ids": True,
            "return_token_ids": True}, timeout=60).json()["choices"][0]
        assert [e["token"] for e in as_ids["logprobs"]["content"]] == [f"token_id:{t}" for t in as_ids["token_ids"]]

        # atroposlib's own OpenAI client path (server_type: openai), as environments call it.
        from atroposlib.envs.server_handling.openai_server import OpenAIServer
        from atroposlib.envs.server_handling.server_baseline import APIServerConfig

        client = OpenAIServer(APIServerConfig(model_name="policy", base_url=f"{server.url}/v1", api_key="x",
                                              server_type="openai", health_check=False))
        completion = asyncio.run(client.chat_completion(messages=messages, n=2, max_tokens=4))
        assert len(completion.choices) == 2 and all(isinstance(c.message.content, str) for c in completion.choices)
        bad = requests.post(f"{server.url}/v1/chat/completions", json={"messages": [], "max_tokens": 2}, timeout=30)
        assert bad.status_code == 422
    finally:
        server.stop()


# --------------------------------------------------------------------------------------------
# Group sizes
# --------------------------------------------------------------------------------------------


def test_group_sizes_that_divide_the_batch_are_trained_others_are_refused_naming_the_fix():
    for size in (1, 2, 4, 8):
        check_group_size(size, 8)  # each group is its own GRPO group, whatever rollout.n is
    with pytest.raises(TrajectoryGroupSizeError, match=r"groups of 3 sequences.*batches of 8.*one of \[2, 4, 8\]"):
        check_group_size(3, 8, env_id=0)
    with pytest.raises(TrajectoryGroupSizeError, match="groups of 16"):
        check_group_size(16, 8)
    one = {"tokens": [[1, 2]], "masks": [[-100, 2]], "scores": [1.0]}
    with pytest.raises(TrajectoryGroupSizeError, match="one sequence and no advantages: GRPO needs at least 2"):
        _check_normalizable([one])
    _check_normalizable([{**one, "advantages": [[0.0, 0.5]]}])  # its own advantages: nothing to normalize


# --------------------------------------------------------------------------------------------
# The launcher's plan: the runner, workdir, a config outside the repo
# --------------------------------------------------------------------------------------------


def _dry_run(tmp_path: Path, config: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, str(LAUNCHER), "--config", str(config), "--dry-run", *overrides],
                          capture_output=True, text=True, cwd=REPO_ROOT, env=repo_env(), timeout=60)


@pytest.mark.timeout(90)
def test_dry_run_starts_environments_through_the_runner_in_their_workdir(tmp_path):
    folder = write_problems(tmp_path / "envdir")
    result = _dry_run(tmp_path, CONFIG, chat_environment(folder))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    command = next(line for line in lines if "chat_env_tokenize.py" in line and "main_ppo" not in line)
    assert f"-m {RUNNER} {CHAT_ENV} serve" in command
    assert lines[lines.index(command) + 1].strip() == f"cwd:     {folder}"
    raw = _dry_run(tmp_path, CONFIG, chat_environment(folder).replace("max_restarts:0", "max_restarts:0,atroposlib_compat:false"))
    raw_command = next(line for line in raw.stdout.splitlines() if "chat_env_tokenize.py" in line and "main_ppo" not in line)
    assert RUNNER not in raw_command and f"python {CHAT_ENV} serve" in raw_command
    missing = _dry_run(tmp_path, CONFIG, chat_environment(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "launcher.environments[0].workdir" in missing.stderr


@pytest.mark.timeout(90)
def test_a_config_outside_the_repo_finds_the_recipe_configs_through_hydra_searchpath(tmp_path):
    """The README's example: a config kept elsewhere adds the recipe's config folder to its searchpath."""
    config = tmp_path / "my_run.yaml"
    config.write_text(textwrap.dedent(f"""\
        hydra:
          searchpath:
            - file://{REPO_ROOT}/recipe/atropos/config
            - pkg://verl.trainer.config
        defaults:
          - cpu_grpo
          - atropos_defaults@trainer.atropos
          - launcher_defaults@launcher
          - _self_
        trainer:
          atropos:
            mode: trajectory
        launcher:
          environments:
            - name: mine
              command: [python, my_env.py, serve]
        """))
    result = _dry_run(tmp_path, config)
    assert result.returncode == 0, result.stderr
    assert f"--config-path {tmp_path} --config-name my_run" in result.stdout
    assert f"-m {RUNNER} my_env.py serve" in result.stdout


# --------------------------------------------------------------------------------------------
# The real thing, on CPU, through the launcher
# --------------------------------------------------------------------------------------------


def _launch(tmp_path: Path, tiny_assets, *overrides: str, timeout_s: float) -> tuple[subprocess.CompletedProcess, float]:
    env = repo_env(
        VERL_PLATFORM="cpu", VERL_USE_EXTERNAL_MODULES="recipe.atropos.cpu", VERL_FILE_LOGGER_PATH=str(tmp_path / "m.jsonl"),
        VERL_CPU_MODEL_PATH=str(tiny_assets.model_dir), VERL_CPU_TRAIN_FILES=str(tiny_assets.train_file),
        VERL_CPU_VAL_FILES=str(tiny_assets.test_file),
    )
    start = time.monotonic()
    result = subprocess.run(
        [PYTHON, str(LAUNCHER), "--config", str(CONFIG), "--run-dir", str(tmp_path / "run"),
         f"launcher.trajectory_api.port={find_free_loopback_port()}",
         f"trainer.atropos.policy_gateway_port={find_free_loopback_port()}", "data.max_response_length=96",
         "+ray_kwargs.ray_init.include_dashboard=false", *overrides],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s,
    )
    return result, time.monotonic() - start


def _logs(run_dir: Path) -> str:
    return "".join(f"\n--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(run_dir.glob("*.log")))


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_unchanged_chat_environment_trains_three_steps_on_its_token_level_advantages(tmp_path, tiny_assets):
    folder = write_problems(tmp_path / "envdir")
    dump = tmp_path / "rollouts"
    result, _ = _launch(tmp_path, tiny_assets, chat_environment(folder), "trainer.total_training_steps=3",
                        f"trainer.rollout_data_dir={dump}", "trainer.atropos.batch_timeout_s=300", timeout_s=580)
    assert result.returncode == 0, result.stderr[-3000:] + _logs(tmp_path / "run")
    steps = read_steps(tmp_path / "m.jsonl")
    assert [s["step"] for s in steps] == [1, 2, 3]
    for step in steps:
        assert step["atropos/batch_groups"] == 2 and step["atropos/group_size/max"] == 4
        assert step["atropos/advantage_groups_fraction"] == 1.0 and step["atropos/override_fraction"] == 1.0
    for step in (1, 2, 3):
        samples = read_jsonl(dump / f"{step}.jsonl")  # the policy's text may hold U+2028
        assert len(samples) == 8
        for sample in samples:
            # Token by token the environment's ramp (GRPO would give one value per answer): its
            # tokenize_for_trainer masks, both assistant turns trained, reached the update.
            assert len(sample["advantages"]) == len(sample["trained_token_ids"]) > 0
            assert sample["advantages"] == pytest.approx(ramp(len(sample["advantages"])), abs=1e-6)
    env_log = (tmp_path / "run" / "env-chat.log").read_text(errors="replace")
    assert "BatchEncoding" not in env_log and "Error in" not in env_log, env_log[-3000:]


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_broken_environment_stops_the_run_with_its_own_error_on_the_console(tmp_path, tiny_assets):
    folder = write_problems(tmp_path / "envdir")
    message = "grader answer key missing: cannot score"
    timeout_s = 25
    result, _ = _launch(tmp_path, tiny_assets, chat_environment(folder, "--env.fail_with", f"'{message}'"),
                        "trainer.total_training_steps=2", f"trainer.atropos.batch_timeout_s={timeout_s}", timeout_s=580)
    console = result.stderr
    assert result.returncode != 0, console[-3000:]
    # The launcher's console names the environment's own error, not only the trainer's timeout.
    assert message in console, console[-4000:]
    assert "env-chat: running" in console and "collect_trajectories raised" in console, console[-4000:]
    trainer_log = (tmp_path / "run" / "trainer.log").read_text(errors="replace")
    # The trainer's error says the same, and it stopped after batch_timeout_s of waiting.
    assert "TrajectoryBatchTimeout" in trainer_log and message in trainer_log, trainer_log[-4000:]
    waited = [int(s) for s in re.findall(r"within (\d+) s \(trainer.atropos.batch_timeout_s", trainer_log)]
    assert waited and timeout_s <= waited[0] <= timeout_s + 5
    # Progress while waiting: a line every few seconds saying what the trainer waits for.
    progress = re.findall(r"waiting for a batch of 8 sequences from \S+: (\d+) s of", trainer_log)
    assert len(progress) >= 3, trainer_log[-4000:]
    assert "run-api: 1 environment registration(s)" in trainer_log
