"""Reading verl's metrics JSONL for the demo: steps, summary, plot."""

from __future__ import annotations

import json

import pytest

from recipe.atropos.demo.run_report import (
    MIN_HELDOUT_GAIN,
    StepFollower,
    format_step,
    plot_reward,
    read_jsonl,
    read_steps,
    read_validation,
    summarize,
)


def _write(path, records):
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def _step(n, reward, fallback=0.0):
    return {"step": n, "data": {"critic/score/mean": reward, "atropos/env/accuracy": reward, "atropos/fallback": fallback,
                                "timing_s/step": 2.0 if n == 1 else 1.0, "timing_s/gen": 0.5, "atropos/api_latency_s": 0.1}}


def _validation(step, score, source="openai/gsm8k"):
    """A record as verl logs its validation (step 0: before training, alone)."""
    return {"step": step, "data": {f"val-core/{source}/acc/mean@1": score, f"val-aux/{source}/reward/mean@1": 0.9}}


def test_summary_compares_first_and_last_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, [_validation(0, 0.5)] + [_step(n, n / 10, fallback=float(n == 3)) for n in range(1, 11)])
    steps = read_steps(path)
    assert [s["step"] for s in steps] == list(range(1, 11))
    summary = summarize(steps, window=5)
    assert summary.reward_first == pytest.approx(0.3) and summary.reward_last == pytest.approx(0.8)
    assert summary.fallback_steps == 1
    assert summary.timing_s["step"] == 1.0  # the first (warm-up) step is left out
    # Without a validation at the last step the held-out gain is unmeasured: never "learned".
    assert not summary.improved and "held-out accuracy: not measured" in "\n".join(summary.lines())
    assert "fallback GRPO" in format_step(steps[2]) and "env advantages" in format_step(steps[0])
    png = plot_reward(steps, tmp_path / "reward.png", {0: 0.5, 10: 0.7})
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_learned_is_a_held_out_gain_of_at_least_the_threshold(tmp_path):
    path = tmp_path / "metrics.jsonl"
    steps = [_step(n, 0.5) for n in range(1, 11)]
    steps[-1]["data"].update(_validation(10, 0.5 + MIN_HELDOUT_GAIN)["data"])
    _write(path, [_validation(0, 0.5)] + steps)
    validation = read_validation(path)
    assert validation == {0: 0.5, 10: 0.5 + MIN_HELDOUT_GAIN}  # val-core only, not val-aux
    summary = summarize(read_steps(path), validation=validation)
    assert summary.heldout_gain == pytest.approx(MIN_HELDOUT_GAIN) and summary.improved
    assert "(+" in summary.lines()[1] and "learned" in summary.lines()[1]
    # A run with learning rate 0: greedy validation gives the same score before and after.
    unchanged = summarize(read_steps(path), validation={0: 0.5, 10: 0.5})
    assert unchanged.heldout_gain == 0 and not unchanged.improved and "did not learn" in unchanged.lines()[1]


def test_after_training_is_the_mean_of_the_second_halfs_validations():
    steps = [_step(n, 0.5)["data"] | {"step": n} for n in range(1, 31)]
    # Validated before training and at steps 10, 20 and 30: "after" averages 20 and 30 (steps >= 15).
    summary = summarize(steps, validation={0: 0.5, 10: 0.9, 20: 0.5, 30: 0.5 + 2 * MIN_HELDOUT_GAIN})
    assert summary.heldout_after_steps == (20, 30) and summary.heldout_gain == pytest.approx(MIN_HELDOUT_GAIN)
    assert "after (steps 20, 30)" in summary.lines()[1]
    # Not validated at the last step: not measured, never "learned".
    unmeasured = summarize(steps, validation={0: 0.5, 20: 0.9})
    assert unmeasured.heldout_after_steps == () and not unmeasured.improved


def test_held_out_score_of_several_data_sources_is_their_mean(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, [{"step": 0, "data": {**_validation(0, 0.2)["data"], **_validation(0, 0.6, "reasoning_gym/x")["data"]}}])
    assert read_validation(path) == {0: pytest.approx(0.4)}


def test_follower_shows_the_validation_before_training_when_asked(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, [_validation(0, 0.578125), _step(1, 0.1)])
    assert [s["step"] for s in StepFollower(path).new_steps()] == [1]
    first, second = StepFollower(path, validation=True).new_steps()
    assert format_step(first, 30) == "step   0/30 | held-out accuracy 0.578 (greedy, before training)"
    assert "held-out" not in format_step(second)


def test_follower_yields_only_complete_new_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    follower = StepFollower(path)
    assert list(follower.new_steps()) == []
    _write(path, [_step(1, 0.1)])
    with open(path, "a") as f:
        f.write('{"step": 2, "data": {"critic/sc')  # a line still being written
    assert [s["step"] for s in follower.new_steps()] == [1]
    with open(path, "a") as f:
        f.write('ore/mean": 0.2}}\n')
    assert [s["step"] for s in follower.new_steps()] == [2]
    assert list(follower.new_steps()) == []


def test_summary_of_nothing_is_an_error():
    with pytest.raises(ValueError, match="no training step"):
        summarize([])


def test_jsonl_lines_end_at_newline_only(tmp_path):
    """A rollout dump holds the policy's text as written by json.dumps(ensure_ascii=False): a U+2028
    or U+0085 inside it is no line end (CI once failed on one from the tiny model)."""
    text = "a\u2028b\x85c\u2029d"
    path = tmp_path / "1.jsonl"
    path.write_text(json.dumps({"output": text}, ensure_ascii=False) + "\n\n" + json.dumps({"n": 2}) + "\n", encoding="utf-8")
    assert read_jsonl(path) == [{"output": text}, {"n": 2}]
