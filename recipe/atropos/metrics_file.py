"""verl's metrics file (``trainer.logger`` with ``file``, at ``$VERL_FILE_LOGGER_PATH``) across a resume.

verl's ``FileLogger`` opens its file for writing as ``fit()`` starts, before the checkpoint is
loaded: a run started again with the same command (``trainer.resume_mode=auto``) emptied the file,
losing every step before the checkpoint. Missing seam: verl has no option to append, and ``fit()``
builds its ``Tracking`` before it knows the step it resumes from. So, only while
``RayGRPOAtroposTrainer.fit()`` runs, verl's ``FileLogger`` is this subclass, which puts back what
the file held and appends (:func:`file_logger_keeping_history`); once the checkpoint is loaded,
:func:`keep_steps_up_to` keeps the lines of the steps up to the checkpoint's and drops the ones a
killed run logged after it, which the resumed run logs again. The file then holds every step
once, in order. A fresh start (no checkpoint loaded) empties it, as verl does.

Only ``$VERL_FILE_LOGGER_PATH`` is kept (the recipe's configs, demo and launcher set it); verl's
default location (``$VERL_FILE_LOGGER_ROOT/<project>/<experiment>.jsonl``) behaves as upstream.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

PATH_ENV = "VERL_FILE_LOGGER_PATH"


def metrics_path(logger_backends) -> Path | None:
    """The file verl's file logger writes, when ``trainer.logger`` has ``file`` and the path is set."""
    backends = [logger_backends] if isinstance(logger_backends, str) else list(logger_backends or [])
    path = os.environ.get(PATH_ENV)
    return Path(path) if path and "file" in backends else None


@contextlib.contextmanager
def file_logger_keeping_history() -> Iterator[None]:
    """verl's FileLogger, while this runs, keeps what its file held and appends."""
    from verl.utils import tracking

    upstream = tracking.FileLogger

    class KeepingFileLogger(upstream):
        def __init__(self, project_name: str, experiment_name: str):
            path = os.environ.get(PATH_ENV)
            held = Path(path).read_bytes() if path and os.path.isfile(path) else b""
            super().__init__(project_name, experiment_name)  # opens the file for writing: empty
            self.fp.close()
            # O_APPEND: every line lands at the end, also after keep_steps_up_to shortened the file.
            self.fp = open(self.filepath, "ab", buffering=0)
            self.fp.write(held)

    tracking.FileLogger = KeepingFileLogger
    try:
        yield
    finally:
        tracking.FileLogger = upstream


def keep_steps_up_to(path: Path, step: int) -> int:
    """Keep the lines of ``path`` whose ``step`` is at most ``step`` (none when ``step`` is 0: a fresh
    start), in place (the logger's open file stays the same); returns how many lines were dropped."""
    if not path.is_file():
        return 0
    lines = [line for line in path.read_bytes().split(b"\n") if line.strip()]  # lines end at "\n" only
    kept = [line for line in lines if step > 0 and _step_of(line) is not None and _step_of(line) <= step]
    with open(path, "r+b") as f:
        f.write(b"".join(line + b"\n" for line in kept))
        f.truncate()
    return len(lines) - len(kept)


def _step_of(line: bytes) -> int | None:
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return None  # a line cut short by the kill: dropped
    return step if isinstance(step, int) else None
