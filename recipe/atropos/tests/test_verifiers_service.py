"""Evaluate mode with a verifiers environment: the real service process (recipe/atropos/verifiers/service.py)
scores responses verl generated with the task's own `@vf.reward`, from the rows prepare_data.py writes."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import requests

from recipe.atropos.episodes.spec import EpisodeSpecError
from recipe.atropos.verifiers.loading import load_env
from recipe.atropos.verifiers.prepare_data import rows
from recipe.atropos.verifiers.service import VerifiersScoringConfig, VerifiersScoringEnvironment
from recipe.atropos.verifiers.spec import VerifiersEnvSpec

from .servers import find_free_loopback_port, start_server_process
from .vf_test_envs import digit_share

pytestmark = pytest.mark.slow

ENV = "recipe.atropos.tests.vf_test_envs:single_turn_in"


@pytest.mark.timeout(240)
def test_the_service_scores_verl_responses_with_the_tasks_own_reward():
    tasks = list(load_env("t", VerifiersEnvSpec(env=ENV)).taskset)[:2]
    table = rows(tasks, "train", "verifiers/digits")
    port = find_free_loopback_port()
    service = start_server_process([sys.executable, "-m", "recipe.atropos.verifiers.service", "serve", "--slurm", "false",
                                    "--port", str(port), "--env.env", ENV], port=port, startup_timeout_s=180)
    try:
        responses = ["12 34", "no digits here", "7", "a1b2c3"]
        body = {"prompts": [r["prompt"][-1]["content"] for r in table for _ in range(2)], "responses": responses,
                "ground_truths": [r["reward_model"]["ground_truth"] for r in table for _ in range(2)]}
        answer = requests.post(f"{service.url}/evaluate_and_compute_advantages", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        result = answer.json()
        scores = [digit_share(r) for r in responses]
        assert result["scores"] == pytest.approx(scores, abs=1e-12)
        for group in (slice(0, 2), slice(2, 4)):
            s = np.asarray(scores[group])
            expected = (s - s.mean()) / (s.std(ddof=1) + 1e-6)
            assert result["advantages"][group] == pytest.approx(expected.tolist(), abs=1e-6)
        assert result["metrics"]["reward/digits"] == pytest.approx(np.mean(scores))
        bad = requests.post(f"{service.url}/evaluate_and_compute_advantages", json={**body, "ground_truths": ["7"] * 4},
                            timeout=60)
        assert bad.status_code == 422 and "ground_truths[0]" in bad.json()["error"]["message"]
    finally:
        service.stop()


@pytest.mark.parametrize("factory, why", [("multi_turn", "overrides run() or finalize()"),
                                          ("own_credit", "overrides run() or finalize()")])
def test_environments_a_single_response_cannot_replay_are_refused(factory, why):
    environment = VerifiersScoringEnvironment(
        VerifiersScoringConfig(env=f"recipe.atropos.tests.vf_test_envs:{factory}", env_args=json.dumps({})))
    with pytest.raises(EpisodeSpecError, match="trajectory mode") as refused:
        environment.setup()
    assert why in str(refused.value)
