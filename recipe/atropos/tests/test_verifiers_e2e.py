"""A verifiers environment trained end to end on CPU: the launcher runs atroposlib's run-api, verl's
trainer (tiny offline model, its policy gateway) and the runner process of the `type: verifiers` entry of
config/verifiers_trajectory_cpu.yaml, here tests/vf_test_envs.py's single-turn environment whose tasks
score with `@vf.reward`, which assigns its own per-token advantages (`ramp`) to the episodes of half its
tasks and leaves the others to GRPO over their rewards.

The environment records the episodes it played (sampled tokens, reward, its own advantages). What a
user checks: the trainer trained on exactly the sampled tokens, with the environment's credit to 1e-6
(its own advantages, or GRPO over its rewards), every trained sample matched the gateway's behaviour
records, the entry's metrics are under its name, and nothing is left running.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict

import numpy as np
import psutil
import pytest

from recipe.atropos.demo.run_report import read_jsonl, read_steps

from .conftest import REPO_ROOT, repo_env
from .servers import find_free_loopback_port
from .vf_test_envs import ramp

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CONFIG = REPO_ROOT / "recipe/atropos/config/verifiers_trajectory_cpu.yaml"
STEPS = 3


ENTRY = ("{type:verifiers,env:'recipe.atropos.tests.vf_test_envs:own_credit',"
         "env_args:{record_to:'%s',even_tasks_only:true},group_size:4,concurrency:4,max_tokens:16}")


def _recorded(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def _grpo(scores: list[float]) -> np.ndarray:
    r = np.asarray(scores, dtype=np.float64)
    return (r - r.mean()) / (r.std(ddof=1) + 1e-6)


def _check_trained(dumps, played_file) -> dict[str, int]:
    """Each trained sample (verl's rollout dump) is an episode the environment played: same tokens, its
    credit. Two episodes may sample the same tokens, from tasks credited either way: a group is checked
    against what fits. Returns how many groups were credited each way."""
    played = defaultdict(list)
    for episode in _recorded(played_file):
        played[tuple(episode["sampled"])].append(episode)
    credited = defaultdict(int)
    for step in range(1, STEPS + 1):
        groups = defaultdict(list)
        for sample in read_jsonl(dumps / f"{step}.jsonl"):
            groups[sample["uid"]].append(sample)
        for group in groups.values():  # a group is four episodes of one task
            assert len(group) == 4
            tokens = [tuple(sample["trained_token_ids"]) for sample in group]
            assert all(t in played for t in tokens), f"step {step}: trained tokens that were never sampled"
            own = [[e for e in played[t] if e["advantages"] is not None] for t in tokens]
            grpo = [[e for e in played[t] if e["advantages"] is None] for t in tokens]
            if all(own) and all(s["advantages"] == pytest.approx(ramp(len(t)), abs=1e-6) for s, t in zip(group, tokens)):
                credited["own"] += 1  # the environment's own advantages, unchanged
                continue
            assert all(grpo), f"step {step}: a group of the environment's own credit trained on other advantages"
            credited["grpo"] += 1  # GRPO over the environment's own rewards
            expected = _grpo([episodes[0]["reward"] for episodes in grpo])
            for sample, a in zip(group, expected):
                assert sample["advantages"] == pytest.approx([a] * len(sample["advantages"]), abs=1e-6)
    return credited


@pytest.mark.timeout(480)
def test_a_verifiers_environment_trains_on_its_exact_tokens_and_credit(tiny_assets, tmp_path):
    metrics, dumps, run_dir = tmp_path / "metrics.jsonl", tmp_path / "rollouts", tmp_path / "run"
    played_file = tmp_path / "played.jsonl"
    env = repo_env(VERL_PLATFORM="cpu", VERL_USE_EXTERNAL_MODULES="recipe.atropos.cpu", VERL_FILE_LOGGER_PATH=str(metrics),
                   VERL_CPU_MODEL_PATH=str(tiny_assets.model_dir), VERL_CPU_TRAIN_FILES=str(tiny_assets.train_file),
                   VERL_CPU_VAL_FILES=str(tiny_assets.test_file), WANDB_MODE="disabled")
    launcher = subprocess.run(
        [sys.executable, str(REPO_ROOT / "recipe/atropos/launch_atropos_verl_services.py"), "--config", str(CONFIG),
         "--run-dir", str(run_dir), f"trainer.total_training_steps={STEPS}", f"trainer.rollout_data_dir={dumps}",
         # Two groups of four a step (the demo's config trains eight of eight).
         "data.train_batch_size=2", "actor_rollout_ref.rollout.n=4", "actor_rollout_ref.actor.ppo_mini_batch_size=2",
         "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8",
         "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8",
         "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=8",
         f"launcher.trajectory_api.port={find_free_loopback_port()}",
         f"trainer.atropos.policy_gateway_port={find_free_loopback_port()}",
         "~trainer.atropos.environments.arithmetic", f"+trainer.atropos.environments.digits={ENTRY % played_file}",
         "+ray_kwargs.ray_init.include_dashboard=false", "++ray_kwargs.ray_init.address=local"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=450,
    )
    logs = "".join(f"\n--- {p.name}\n{p.read_text(errors='replace')[-2500:]}" for p in sorted(run_dir.glob("*.log")))
    assert launcher.returncode == 0, launcher.stderr[-3000:] + logs

    steps = read_steps(metrics)
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1)), logs
    for step in steps:
        assert step["atropos/behavior_matched_fraction"] == 1.0  # every trained run is one the gateway sampled
        assert step["atropos/behavior_in_context_fraction"] == 1.0  # after exactly the tokens it was sampled after
        assert step["atropos/batch_groups"] == 2
    # The entry's metrics under its name.
    assert all(step["atropos/env/digits/samples"] == 8 for step in steps)
    assert sum(step["atropos/env/digits/episodes"] for step in steps) > 0

    credited = _check_trained(dumps, played_file)
    # Six groups of six different tasks, four tasks of each kind: both kinds were trained.
    assert credited["own"] > 0 and credited["grpo"] > 0, dict(credited)

    # Nothing of the run is left: the runner was stopped with it.
    assert not [p for p in psutil.process_iter(["cmdline"])
                if "recipe.atropos.verifiers" in " ".join(p.info["cmdline"] or []) and str(tmp_path) in " ".join(p.info["cmdline"] or [])]
