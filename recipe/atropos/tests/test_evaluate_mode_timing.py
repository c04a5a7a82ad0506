"""Evaluate mode reports what its hooks cost on the trainer's thread (atropos/timing_s/{submit,apply}),
the recipe's share of verl's old-log-prob and update phases (benchmarks/bench_step_overhead.py)."""

from __future__ import annotations

import time

from recipe.atropos.config import AtroposTrainerConfig
from recipe.atropos.evaluate.mode import EvaluateMode
from recipe.atropos.grpo_computer import AtroposGRPOComputer


class _SlowFeedback:
    """Stands in for EnvironmentFeedback: each call takes a known time."""

    SUBMIT_S, APPLY_S = 0.05, 0.1

    def submit(self, batch, step):
        time.sleep(self.SUBMIT_S)

    def apply(self, batch, step):
        time.sleep(self.APPLY_S)
        return {"atropos/wait_s": self.APPLY_S}


def test_each_step_reports_the_time_of_its_own_hooks():
    mode = EvaluateMode(AtroposTrainerConfig.parse({"api_url": "http://127.0.0.1:9"}), None, AtroposGRPOComputer(), None)
    mode.feedback = _SlowFeedback()
    mode.before_old_log_prob(None, step=1)
    metrics = mode.before_update(None, step=1)
    # time.sleep sleeps at least as long as asked; the upper bounds leave a loaded machine 1 s.
    assert _SlowFeedback.SUBMIT_S <= metrics["atropos/timing_s/submit"] < _SlowFeedback.SUBMIT_S + 1
    assert _SlowFeedback.APPLY_S <= metrics["atropos/timing_s/apply"] < _SlowFeedback.APPLY_S + 1
    assert metrics["atropos/wait_s"] == _SlowFeedback.APPLY_S
    # A step whose old log-probs verl skipped (no submit): nothing of the last step's is carried over.
    assert mode.before_update(None, step=2)["atropos/timing_s/submit"] == 0.0
