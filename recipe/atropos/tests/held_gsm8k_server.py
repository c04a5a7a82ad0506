"""The GSM8K environment service, holding one training step's answer back, for resume tests.

The real service and environment (environments/gsm8k.py), except that the first request of
training step ``--env.hold_step`` (the trainer sends its step in the request's metadata) waits
``--env.hold_s`` seconds before it is scored. A trainer is then still at that step, whatever the
timing, while a test kills it (the service logs ``holding the first request of step N``); the
next request of that step (the restarted trainer's) is answered at once.

    python recipe/atropos/tests/held_gsm8k_server.py serve --slurm false --port P --env.hold_step 4 --env.hold_s 20
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file path: put the repo root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from pydantic import Field  # noqa: E402

from recipe.atropos.environments.gsm8k import GSM8KConfig, GSM8KEnvironment  # noqa: E402
from recipe.atropos.environments.service import main  # noqa: E402


class HeldGSM8KConfig(GSM8KConfig):
    hold_step: int = Field(-1, description="the training step whose first request is held; -1: none")
    hold_s: float = Field(0.0, ge=0, description="seconds that request waits before it is scored")


class HeldGSM8KEnvironment(GSM8KEnvironment):
    Config = HeldGSM8KConfig
    config: HeldGSM8KConfig

    def __init__(self, config: HeldGSM8KConfig | None = None) -> None:
        super().__init__(config)
        self._held_once = threading.Event()

    def score(self, request):
        step = request.metadata.get("step")
        if step == self.config.hold_step and not self._held_once.is_set():
            self._held_once.set()
            logging.getLogger(__name__).warning("holding the first request of step %d for %g s", step, self.config.hold_s)
            time.sleep(self.config.hold_s)
        return super().score(request)


if __name__ == "__main__":
    sys.exit(main(HeldGSM8KEnvironment, prog="held_gsm8k_server.py"))
