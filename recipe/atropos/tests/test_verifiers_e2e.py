"""verifiers environments trained end to end on CPU: the launcher runs atroposlib's run-api, verl's trainer
(tiny offline model, its policy gateway) and one runner process per `type: verifiers` entry of
config/verifiers_trajectory_cpu.yaml, here two entries of tests/vf_test_envs.py in one run:

- `digits`: single-turn, the task's `@vf.reward` scores each episode; GRPO credits the group;
- `credit`: single-turn, the environment assigns its own per-token advantages (`ramp`).

Each environment records the episodes it played (sampled tokens, reward, its own advantages). What a
user checks: the trainer trained on exactly the sampled tokens, with the environment's credit to 1e-6
(its own advantages, or GRPO over its rewards), every trained sample matched the gateway's behaviour
records, each entry's metrics are under its name, and nothing is left running.
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


def _entry(factory: str, record_to, weight: float) -> str:
    return (f"{{type:verifiers,env:'recipe.atropos.tests.vf_test_envs:{factory}',env_args:{{record_to:'{record_to}'}},"
            f"group_size:4,concurrency:4,max_tokens:16,weight:{weight}}}")


def _recorded(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def _grpo(scores: list[float]) -> np.ndarray:
    r = np.asarray(scores, dtype=np.float64)
    return (r - r.mean()) / (r.std(ddof=1) + 1e-6)


@pytest.mark.timeout(480)
def test_two_verifiers_environments_train_on_their_exact_tokens_and_credit(tiny_assets, tmp_path):
    metrics, dumps, run_dir = tmp_path / "metrics.jsonl", tmp_path / "rollouts", tmp_path / "run"
    digits, credit = tmp_path / "digits.jsonl", tmp_path / "credit.jsonl"
    env = repo_env(VERL_PLATFORM="cpu", VERL_USE_EXTERNAL_MODULES="recipe.atropos.cpu", VERL_FILE_LOGGER_PATH=str(metrics),
                   VERL_CPU_MODEL_PATH=str(tiny_assets.model_dir), VERL_CPU_TRAIN_FILES=str(tiny_assets.train_file),
                   VERL_CPU_VAL_FILES=str(tiny_assets.test_file), WANDB_MODE="disabled")
    launcher = subprocess.run(
        [sys.executable, str(REPO_ROOT / "recipe/atropos/launch_atropos_verl_services.py"), "--config", str(CONFIG),
         "--run-dir", str(run_dir), f"trainer.total_training_steps={STEPS}", f"trainer.rollout_data_dir={dumps}",
         f"launcher.trajectory_api.port={find_free_loopback_port()}",
         f"trainer.atropos.policy_gateway_port={find_free_loopback_port()}",
         "~trainer.atropos.environments.arithmetic",
         f"+trainer.atropos.environments.digits={_entry('single_turn', digits, 1.0)}",
         f"+trainer.atropos.environments.credit={_entry('own_credit', credit, 1.0)}",
         "+ray_kwargs.ray_init.include_dashboard=false", "++ray_kwargs.ray_init.address=local"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=450,
    )
    logs = "".join(f"\n--- {p.name}\n{p.read_text(errors='replace')[-2500:]}" for p in sorted(run_dir.glob("*.log")))
    assert launcher.returncode == 0, launcher.stderr[-3000:] + logs

    steps = read_steps(metrics)
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1)), logs
    for step in steps:
        assert step["atropos/behavior_matched_fraction"] == 1.0  # every trained run is one the gateway sampled
        assert step["atropos/batch_groups"] == 2
    seen = {name for s in steps for name in ("digits", "credit") if f"atropos/env/{name}/episodes" in s}
    assert seen == {"digits", "credit"}, sorted(k for s in steps for k in s if k.startswith("atropos/env/"))

    # Each trained sample is an episode an environment played: same tokens, its credit.
    played = {"digits": _recorded(digits), "credit": _recorded(credit)}
    by_tokens = {(name, tuple(e["sampled"])): e for name, episodes in played.items() for e in episodes}
    trained_from = defaultdict(int)
    for step in range(1, STEPS + 1):
        groups = defaultdict(list)
        for sample in read_jsonl(dumps / f"{step}.jsonl"):
            groups[sample["uid"]].append(sample)
        for group in groups.values():  # a group is four episodes of one environment
            assert len(group) == 4
            tokens = [tuple(sample["trained_token_ids"]) for sample in group]
            owners = [name for name in played if all((name, t) in by_tokens for t in tokens)]
            assert owners, f"step {step}: trained tokens {tokens[0][:12]}... were never sampled"
            name = owners[0]
            trained_from[name] += len(group)
            for sample, t in zip(group, tokens):
                if name == "credit":  # the environment's own advantages, unchanged
                    assert sample["advantages"] == pytest.approx(ramp(len(t)), abs=1e-6)
                    assert by_tokens[(name, t)]["advantages"] == pytest.approx(ramp(len(t)), abs=1e-6)
            if name == "digits":  # GRPO over the environment's own rewards
                expected = _grpo([by_tokens[(name, t)]["reward"] for t in tokens])
                for sample, a in zip(group, expected):
                    assert sample["advantages"] == pytest.approx([a] * len(sample["advantages"]), abs=1e-6)
    assert trained_from["digits"] > 0 and trained_from["credit"] > 0, dict(trained_from)

    # Nothing of the run is left: the runners were stopped with it.
    assert not [p for p in psutil.process_iter(["cmdline"])
                if "recipe.atropos.verifiers" in " ".join(p.info["cmdline"] or []) and str(tmp_path) in " ".join(p.info["cmdline"] or [])]
