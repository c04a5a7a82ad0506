"""verl's metrics file across a resume (recipe/atropos/metrics_file.py), through verl's own Tracking."""

from __future__ import annotations

import json

from verl.utils import tracking

from recipe.atropos.metrics_file import file_logger_keeping_history, keep_steps_up_to, metrics_path


def _steps(path) -> list[tuple[int, float]]:
    return [(d["step"], d["data"]["x"]) for d in map(json.loads, path.read_text().splitlines())]


def _write(path, steps: list[tuple[int, float]], tail: bytes = b"") -> None:
    path.write_bytes(b"".join(json.dumps({"step": s, "data": {"x": x}}).encode() + b"\n" for s, x in steps) + tail)


def test_a_resumed_run_keeps_the_steps_up_to_its_checkpoint_and_logs_the_rest_once(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    monkeypatch.setenv("VERL_FILE_LOGGER_PATH", str(path))
    # A killed run: steps 1-3 logged, the checkpoint at 2, step 4's line cut short by the kill.
    _write(path, [(1, 1.0), (2, 2.0), (3, 3.0)], tail=b'{"step": 4, "da')
    killed_run = path.read_bytes()
    with file_logger_keeping_history():
        logger = tracking.Tracking("p", "e", default_backend=["console", "file"])  # as fit() builds it
        assert path.read_bytes() == killed_run  # verl's logger emptied nothing
        assert keep_steps_up_to(path, 2) == 2  # step 3 and the cut line: logged again by the resumed run
        for step in (3, 4):
            logger.log({"x": 10.0 * step}, step=step)
        logger.finish()
    assert _steps(path) == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


def test_a_fresh_start_empties_the_file_as_verl_does(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    monkeypatch.setenv("VERL_FILE_LOGGER_PATH", str(path))
    _write(path, [(1, 1.0), (2, 2.0)])
    with file_logger_keeping_history():
        logger = tracking.Tracking("p", "e", default_backend="file")
        keep_steps_up_to(path, 0)  # verl's _load_checkpoint found nothing: global_steps 0
        logger.log({"x": 5.0}, step=1)
        logger.finish()
    assert _steps(path) == [(1, 5.0)]


def test_outside_the_trainer_verl_s_file_logger_is_upstream_s(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    monkeypatch.setenv("VERL_FILE_LOGGER_PATH", str(path))
    upstream = tracking.FileLogger
    with file_logger_keeping_history():
        assert tracking.FileLogger is not upstream
    assert tracking.FileLogger is upstream
    _write(path, [(1, 1.0)])
    tracking.Tracking("p", "e", default_backend="file").finish()
    assert path.read_bytes() == b""


def test_the_path_is_the_file_logger_s_only_when_it_logs_to_a_file(monkeypatch, tmp_path):
    monkeypatch.setenv("VERL_FILE_LOGGER_PATH", str(tmp_path / "m.jsonl"))
    assert metrics_path(["console", "file"]) == tmp_path / "m.jsonl"
    assert metrics_path("file") == tmp_path / "m.jsonl"
    assert metrics_path(["console", "wandb"]) is None
    monkeypatch.delenv("VERL_FILE_LOGGER_PATH")
    assert metrics_path(["file"]) is None
