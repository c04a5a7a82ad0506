"""Where evaluations run: off the event loop, so that ``/health`` stays responsive.

:class:`ThreadRunner` runs up to the environment's ``max_concurrent_evaluations`` at once (GSM8K:
4, its math-verify judging in a process pool), so an unrelated request need not wait behind a
slow one. :class:`MainThreadRunner` runs one at a time on the thread that calls
:meth:`~Runner.run_forever` (the main thread under ``serve``; uvicorn runs in a second thread),
where signal-based timeouts work.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from recipe.atropos.environments.service.bodies import ServiceError, shutting_down


class Runner(abc.ABC):
    """Executes evaluation jobs off the event loop."""

    @abc.abstractmethod
    async def run(self, fn: Callable[..., Any], *args: Any) -> Any: ...

    def run_forever(self, keep_running: Callable[[], bool], poll_s: float = 0.1) -> None:
        """Block the calling thread until ``keep_running()`` is false, then close."""
        try:
            while keep_running():
                time.sleep(poll_s)
        finally:
            self.close()

    def close(self) -> None:  # noqa: B027 - optional hook
        """Stop accepting jobs."""


class ThreadRunner(Runner):
    """``workers`` threads (signal-based timeouts, such as math-verify's own, do not work there)."""

    def __init__(self, workers: int = 1) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="env-eval")

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            future = self._executor.submit(fn, *args)
        except RuntimeError as exc:  # submitted after close()
            raise shutting_down() from exc
        return await asyncio.wrap_future(future)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class MainThreadRunner(Runner):
    """Runs jobs on the thread that calls :meth:`run_forever` (the main thread under ``serve``)."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = threading.Event()

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._closed.is_set():
            raise shutting_down()
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((future, fn, args))
        return await asyncio.wrap_future(future)

    def run_forever(self, keep_running: Callable[[], bool], poll_s: float = 0.1) -> None:
        try:
            while keep_running():
                try:
                    job = self._jobs.get(timeout=poll_s)
                except queue.Empty:
                    continue
                self._run_job(*job)
        finally:
            self.close()

    def close(self) -> None:
        self._closed.set()
        while True:  # jobs nobody will run: answer them 503 instead of leaving them waiting
            try:
                future, _, _ = self._jobs.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                future.set_exception(ServiceError(503, "shutting_down", "the service is shutting down"))

    @staticmethod
    def _run_job(future: concurrent.futures.Future, fn: Callable[..., Any], args: tuple) -> None:
        if not future.set_running_or_notify_cancel():  # the client went away
            return
        try:
            result = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting request
            future.set_exception(exc if isinstance(exc, Exception) else ServiceError(503, "shutting_down", repr(exc)))
            if not isinstance(exc, Exception):
                raise
        else:
            future.set_result(result)
