"""When the policy gateway was serving: the stretches of time with at least one request in flight.

The gate (gate.py) marks the start of a busy stretch when its first request is admitted and its end
when the last one finishes; the trainer asks how much of an interval (an actor update) was busy:
with `trainer.atropos.rollout_placement: separate` that is the generation the update overlapped
(`atropos/async/update_served_fraction`), with `colocated` it is 0 (the gate is closed while the
actor trains). Times are `time.monotonic()` seconds of the trainer's process, where the gateway
runs on a thread of its own.
"""

from __future__ import annotations

import threading
import time
from collections import deque


class ServingActivity:
    """Busy stretches (monotonic start, end), the last `keep` of them; thread-safe."""

    def __init__(self, keep: int = 4096):
        self._stretches: deque[tuple[float, float]] = deque(maxlen=keep)
        self._busy_since: float | None = None
        self._lock = threading.Lock()

    def busy(self, now: float | None = None) -> None:
        """The first request in flight was admitted."""
        with self._lock:
            if self._busy_since is None:
                self._busy_since = time.monotonic() if now is None else now

    def idle(self, now: float | None = None) -> None:
        """The last request in flight finished."""
        with self._lock:
            if self._busy_since is not None:
                self._stretches.append((self._busy_since, time.monotonic() if now is None else now))
                self._busy_since = None

    def busy_seconds(self, start: float, end: float, now: float | None = None) -> float:
        """Seconds of [start, end] during which a request was in flight (a stretch still open counts
        up to `now`)."""
        with self._lock:
            stretches = list(self._stretches)
            if self._busy_since is not None:
                stretches.append((self._busy_since, time.monotonic() if now is None else now))
        return sum(max(0.0, min(end, b) - max(start, a)) for a, b in stretches)

    def busy_fraction(self, start: float, end: float) -> float:
        """`busy_seconds` / (end - start); 0 for an empty interval."""
        return self.busy_seconds(start, end) / (end - start) if end > start else 0.0
