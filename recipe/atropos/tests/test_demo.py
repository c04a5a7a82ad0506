"""The demo's learning check, shortened: the reward of the last 5 steps beats that of the first 5."""

from __future__ import annotations

import json
import subprocess

import psutil
import pytest

from recipe.atropos.demo.run_report import read_steps, summarize

from .conftest import PYTHON, REPO_ROOT, repo_env


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_demo_learns_and_cleans_up(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        [PYTHON, "-m", "recipe.atropos.demo", "--check", "--out", str(out), "trainer.total_training_steps=20"],
        cwd=REPO_ROOT, env=repo_env(), capture_output=True, text=True, timeout=560,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    steps = read_steps(out / "metrics.jsonl")
    assert [s["step"] for s in steps] == list(range(1, 21))
    summary = summarize(steps)
    assert summary.reward_last > summary.reward_first + 0.05, summary.lines()
    assert summary.fallback_steps == 0 and all(s["atropos/override_fraction"] == 1.0 for s in steps)
    assert (out / "reward.png").read_bytes()[:4] == b"\x89PNG"
    # What a user sees: a line per step, the summary with the timing breakdown.
    assert "step  20/20 | reward" in result.stdout and "=== summary ===" in result.stdout
    for name in ("generation", "old log-prob", "actor update", "environment call"):
        assert name in result.stdout
    # Nothing left running: every process the launcher started (it records them) is gone.
    services = json.loads((out / "launch" / "services.json").read_text())["services"]
    pids = [service["pid"] for service in services.values()]
    assert set(services) == {"environment", "trainer"}
    assert not [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
