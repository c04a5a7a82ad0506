"""Reading verl's metrics JSONL for the demo: steps, summary, plot."""

from __future__ import annotations

import json

import pytest

from recipe.atropos.demo.run_report import StepFollower, format_step, plot_reward, read_jsonl, read_steps, summarize


def _write(path, records):
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def _step(n, reward, fallback=0.0):
    return {"step": n, "data": {"critic/score/mean": reward, "atropos/env/accuracy": reward, "atropos/fallback": fallback,
                                "timing_s/step": 2.0 if n == 1 else 1.0, "timing_s/gen": 0.5, "atropos/api_latency_s": 0.1}}


def test_summary_compares_first_and_last_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, [{"step": 0, "data": {"val-core/acc": 0.1}}] + [_step(n, n / 10, fallback=float(n == 3)) for n in range(1, 11)])
    steps = read_steps(path)
    assert [s["step"] for s in steps] == list(range(1, 11))
    summary = summarize(steps, window=5)
    assert summary.reward_first == pytest.approx(0.3) and summary.reward_last == pytest.approx(0.8)
    assert summary.improved and summary.fallback_steps == 1
    assert summary.timing_s["step"] == 1.0  # the first (warm-up) step is left out
    assert "improved" in "\n".join(summary.lines())
    assert "fallback GRPO" in format_step(steps[2]) and "env advantages" in format_step(steps[0])
    png = plot_reward(steps, tmp_path / "reward.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
