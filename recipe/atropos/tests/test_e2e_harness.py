"""The end-to-end harness (e2e_harness.py) on small processes: what it starts, it stops, even after a crash."""

from __future__ import annotations

import sys
import time

import psutil
import pytest

from .e2e_harness import Launched, descendants, gone, logged_steps

# A parent that starts a child (in its own process, as Ray's raylet starts workers), says so, and waits.
PARENT = [sys.executable, "-c", (
    "import subprocess, sys, time\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
    "print('child', child.pid, flush=True)\n"
    "time.sleep(600)\n"
)]


def _child_pid(launched: Launched) -> int:
    line = launched.wait_until(lambda: next((l for l in launched.log().splitlines() if l.startswith("child")), None),
                               "the child", timeout_s=30, every_s=0.05)
    return int(line.split()[1])


def test_a_crash_kills_the_process_alone_and_what_it_left_is_killed_after_the_grace(tmp_path):
    with Launched(PARENT, tmp_path / "parent.log") as parent:
        child = psutil.Process(_child_pid(parent))
        left = parent.crash(grace_s=0.5)
        assert parent.returncode == -9
        assert len(left) == 1 and "time.sleep(600)" in left[0]  # the orphan outlived the grace ...
        assert gone([child])  # ... and was killed


def test_run_to_end_fails_at_its_deadline_and_leaves_nothing(tmp_path):
    with Launched(PARENT, tmp_path / "parent.log") as parent:
        tree = [psutil.Process(parent.popen.pid), psutil.Process(_child_pid(parent))]
        with pytest.raises(AssertionError, match="still running after 0.5 s"):
            parent.run_to_end(timeout_s=0.5)
        assert gone(tree)


def test_wait_until_fails_with_the_log_when_the_process_exits_first(tmp_path):
    with Launched([sys.executable, "-c", "print('config error: x'); raise SystemExit(3)"], tmp_path / "t.log") as t:
        with pytest.raises(AssertionError, match=r"exited \(3\) before the gateway:\n.*config error: x"):
            t.wait_until(lambda: False, "the gateway", timeout_s=30)
        with pytest.raises(AssertionError, match="exit 3, expected 0"):
            t.assert_exit(0)
    assert descendants(t.popen.pid) == []


def test_logged_steps_keeps_repeats_and_skips_a_line_being_written(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert logged_steps(path) == []
    path.write_text('{"step": 1, "data": {"timing_s/step": 1.0}}\n{"step": 0, "data": {"val-core/x": 0.5}}\n'
                    '{"step": 1, "data": {"timing_s/step": 2.0}}\n{"step": 2, "data": {"timing_')
    assert logged_steps(path) == [1, 1]


def test_stop_ends_the_whole_process_group(tmp_path):
    parent = Launched(PARENT, tmp_path / "parent.log")
    child = psutil.Process(_child_pid(parent))
    start = time.monotonic()
    parent.stop(grace_s=5)
    assert gone([child]) and parent.returncode is not None and time.monotonic() - start < 5
