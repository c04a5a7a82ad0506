"""math-verify in worker processes: every answer judged under a deadline that the pool enforces.

math-verify bounds its work with ``signal.alarm`` (``math_verify.utils.timeout``), once per parse
and once per comparison, so one answer can cost several timeouts; the alarm only works in a main
thread, and a service judging on one thread makes every request wait behind the slowest answer.
Here each (answer, reference) pair is judged in a pebble worker process, under one deadline for
the whole answer (``timeout_s`` from its start): the worker's own alarm ends the judging there
(the worker stays, warm), and if that cannot interrupt it (one long C-level operation) the pool
kills the worker ``KILL_GRACE_S`` later and starts another. Either way the answer counts as timed
out and wrong. A request also has a budget: when it runs out, the answers still being judged are
cancelled (their workers killed) and those not started are judged wrong unseen.

Fairness: a request keeps at most ``workers - 1`` pairs in the pool at once (one when there is one
worker), so with a spare worker another request's answer starts at once instead of waiting behind
a slow request's answers; give the pool one worker more than the cores for that.
"""

from __future__ import annotations

import concurrent.futures
import enum
import functools
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger("verl.recipe.atropos.math_judge")

MAX_DEFAULT_WORKERS = 8
KILL_GRACE_S = 0.5  # the pool kills a worker this long after its answer's deadline


class Verdict(enum.Enum):
    CORRECT = "correct"
    WRONG = "wrong"
    TIMED_OUT = "timed_out"  # its judging passed timeout_s: killed, judged wrong
    OVER_BUDGET = "over_budget"  # the request's budget ran out before it was judged: judged wrong

    @property
    def correct(self) -> bool:
        return self is Verdict.CORRECT


def parse_boxed(text: str, timeout: int | None) -> Any:
    """math-verify's parse of ``\\boxed{text}`` ([] when it cannot be read)."""
    from math_verify import parse

    try:
        return parse("\\boxed{" + text + "}", parsing_timeout=timeout)
    except Exception:  # math-verify and sympy raise many types on odd input; odd input is wrong
        return []


def verify_parsed(reference_parsed: Any, answer: str, timeout: int | None) -> bool:
    """math-verify's verdict on ``answer`` against an already parsed reference."""
    from math_verify import verify

    answer_parsed = parse_boxed(answer, timeout)
    if not reference_parsed or not answer_parsed:
        return False
    try:
        return bool(verify(reference_parsed, answer_parsed, timeout_seconds=timeout))
    except Exception:
        return False


class _AnswerTimeout(BaseException):
    """Raised by the worker's alarm; a BaseException, so that math-verify's ``except Exception``
    handlers (which turn its own timeouts into a silent False) let it through."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise _AnswerTimeout


@functools.lru_cache(maxsize=4096)
def _worker_reference(reference: str) -> Any:
    return parse_boxed(reference, None)


def judge_in_worker(answer: str, reference: str, timeout_s: float) -> bool | None:
    """Runs in a pool worker's main thread: True/False, or None when ``timeout_s`` passed first.

    The worker's own alarm ends Python-level work at the deadline and keeps the worker (no
    restart); the pool's kill, a little later, bounds what an alarm cannot interrupt (one long
    C-level operation). math-verify's own alarms are off: one alarm covers the whole answer.
    """
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        return verify_parsed(_worker_reference(reference), answer, None)
    except _AnswerTimeout:
        return None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def _warm_worker() -> None:
    # pebble's workers exit on SIGTERM through a Python handler, which cannot run while sympy is
    # inside one C big-int operation: the pool would wait its 3 s grace, then SIGKILL, with its
    # manager blocked meanwhile. Nothing here needs cleaning up (the pool takes its channel's lock
    # before stopping a worker), so SIGTERM ends the worker at once.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # math-verify warns once per process that its timeout is off: here the pool enforces one.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    parse_boxed("\\frac{1}{2}", None)  # sympy's LaTeX grammar loads on first use (about 0.1 s)


def default_workers() -> int:
    """One worker per CPU this process may use, at most 8."""
    return max(1, min(MAX_DEFAULT_WORKERS, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


class JudgePool:
    """A pool of math-verify worker processes; :meth:`judge_all` may be called from many threads.

    Counters (cumulative, for ``/health``): ``answers_judged``, ``answers_timed_out``,
    ``answers_over_budget``, ``workers_replaced`` (killed at a deadline or a cancel, or crashed).
    """

    def __init__(self, workers: int, timeout_s: float) -> None:
        import pebble

        # forkserver: workers (and their replacements) fork from a small server that has already
        # imported math-verify and the main module (which a new worker would otherwise import
        # again: seconds for a service), never from this multi-threaded service process.
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["__main__", "math_verify", __name__])
        self.workers = int(workers)
        self.per_request = max(1, self.workers - 1)
        self.timeout_s = float(timeout_s)
        self.kill_after_s = self.timeout_s + KILL_GRACE_S
        self._pool = pebble.ProcessPool(max_workers=self.workers, initializer=_warm_worker, context=context)
        self._lock = threading.Lock()
        self.answers_judged = 0
        self.answers_timed_out = 0
        self.answers_over_budget = 0
        self.workers_replaced = 0

    def judge_all(self, pairs: Sequence[tuple[str, str]], budget_s: float) -> list[Verdict]:
        """The verdict of each (answer, reference) pair, all within ``budget_s`` seconds from now."""
        deadline = time.monotonic() + budget_s
        verdicts = [Verdict.OVER_BUDGET] * len(pairs)
        waiting = iter(range(len(pairs)))
        in_flight: dict[concurrent.futures.Future, int] = {}
        while True:
            while len(in_flight) < self.per_request and (index := next(waiting, None)) is not None:
                answer, reference = pairs[index]
                future = self._pool.schedule(judge_in_worker, (answer, reference, self.timeout_s), timeout=self.kill_after_s)
                in_flight[future] = index
            remaining = deadline - time.monotonic()
            if not in_flight or remaining <= 0:
                break
            done, _ = concurrent.futures.wait(in_flight, timeout=remaining, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                verdicts[in_flight.pop(future)] = self._verdict(future)
        for future in in_flight:  # the budget ran out: stop their work (pebble kills a running task's worker)
            was_running = future.running()
            if future.cancel() and was_running:
                self._count(replaced=1)
        self._count(over_budget=verdicts.count(Verdict.OVER_BUDGET))
        return verdicts

    def _verdict(self, future: concurrent.futures.Future) -> Verdict:
        """The verdict of a finished future, counted as it arrives (so /health shows progress)."""
        try:
            result = future.result()
        except concurrent.futures.TimeoutError:  # the pool killed the worker: the alarm could not stop it
            self._count(timed_out=1, replaced=1)
            return Verdict.TIMED_OUT
        except Exception as exc:  # noqa: BLE001 - a crashed worker (e.g. out of memory): the answer is wrong
            logger.warning("a math-verify worker failed (%s: %s); the answer is judged wrong", type(exc).__name__, exc)
            self._count(judged=1, replaced=1)
            return Verdict.WRONG
        if result is None:
            self._count(timed_out=1)
            return Verdict.TIMED_OUT
        self._count(judged=1)
        return Verdict.CORRECT if result else Verdict.WRONG

    def _count(self, judged: int = 0, timed_out: int = 0, over_budget: int = 0, replaced: int = 0) -> None:
        with self._lock:
            self.answers_judged += judged
            self.answers_timed_out += timed_out
            self.answers_over_budget += over_budget
            self.workers_replaced += replaced

    def warm_up(self, timeout_s: float = 120.0) -> None:
        """Start every worker now (each imports sympy's parsers), not on the first request; not counted."""
        futures = [self._pool.schedule(judge_in_worker, ("1", "1", timeout_s)) for _ in range(self.workers)]
        concurrent.futures.wait(futures, timeout=timeout_s)

    def describe(self) -> dict[str, Any]:
        with self._lock:
            return {
                "workers": self.workers,
                "workers_per_request": self.per_request,
                "answer_timeout_s": self.timeout_s,
                "answers_judged": self.answers_judged,
                "answers_timed_out": self.answers_timed_out,
                "answers_over_budget": self.answers_over_budget,
                "workers_replaced": self.workers_replaced,
            }

    def close(self) -> None:
        """Stop the workers now (an answer being judged is abandoned)."""
        self._pool.stop()
        self._pool.join(timeout=10)
