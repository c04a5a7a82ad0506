"""One retry policy for every HTTP call to a service (the environment service, Atropos' run-api).

Services are separate processes that restart, stall and get overloaded, so every call goes through
:meth:`RetryingClient._request`: exponential backoff with jitter, ``Retry-After`` honoured, bounded
both by a number of attempts and by a total time that includes the waits and the requests
themselves. What cannot succeed by retrying (a 4xx, a 200 whose body breaks the contract) is
raised at once, as an exception of :mod:`recipe.atropos.errors` that says what was wrong. The
clients of each service subclass :class:`RetryingClient`.
"""

from __future__ import annotations

import email.utils
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, TypeVar

import requests
import tenacity

from recipe.atropos import wire
from recipe.atropos.datatypes import ClientStats
from recipe.atropos.errors import AtroposAPIError, AtroposProtocolError, AtroposRequestError, AtroposUnavailableError

logger = logging.getLogger("verl.recipe.atropos")

# Statuses that say "try again later" rather than "your request is wrong".
_RETRYABLE_4XX = frozenset({408, 429})
_ERROR_TEXT_LIMIT = 500


class _RetryableFailure(Exception):
    """One failed attempt worth retrying (connection error, timeout, 5xx, 408, 429). Internal."""

    def __init__(self, cause: str, *, status: int | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(cause)
        self.cause = cause
        self.status = status
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Answer:
    """What a call's ``parse`` gets: the HTTP status and the decoded body."""

    status: int
    body: Any  # decoded; None for an error status the caller accepts


@dataclass
class _CallProgress:
    attempts: int = 0


_Parsed = TypeVar("_Parsed")


def _keep_answer(answer: Answer) -> Any:  # the default ``parse``: the caller reads the answer
    return answer


# --------------------------------------------------------------------------------------------
# Retry policy pieces (tenacity)
# --------------------------------------------------------------------------------------------


def _exponential_jitter_wait(initial_s: float) -> tenacity.wait.wait_base:
    """``initial * 2**n + U(0, initial)``; tenacity renamed ``initial`` to ``multiplier`` in 9.x."""
    try:
        return tenacity.wait_exponential_jitter(multiplier=initial_s, jitter=initial_s)
    except TypeError:  # tenacity < 9
        return tenacity.wait_exponential_jitter(initial=initial_s, jitter=initial_s)


class _WaitWithinBudget(tenacity.wait.wait_base):
    """Backoff, stretched to a ``Retry-After`` the service sent, never past the deadline."""

    def __init__(self, backoff: tenacity.wait.wait_base, deadline: float) -> None:
        self.backoff = backoff
        self.deadline = deadline

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        wait_s = self.backoff(retry_state)
        failure = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(failure, _RetryableFailure) and failure.retry_after_s is not None:
            wait_s = max(wait_s, failure.retry_after_s)
        return max(0.0, min(wait_s, self.deadline - time.monotonic()))


class _StopWhenBudgetSpent(tenacity.stop.stop_base):
    """Stop when the next attempt could only start at or after the deadline.

    The wait is already cut to the time left, so a ``Retry-After`` longer than that ends the call
    now instead of sleeping to the deadline only to give up there.
    """

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        return time.monotonic() + retry_state.upcoming_sleep >= self.deadline


def _parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header: delta-seconds (fractions accepted) or an HTTP date."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - datetime.now(timezone.utc)).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def _decode_response(response: requests.Response, exact_integers: bool) -> Any:
    """Decode a body by its Content-Type (requests already undid any gzip)."""
    content_type = wire.media_type(response.headers.get("Content-Type"))
    if exact_integers and content_type == wire.JSON:
        try:
            return json.loads(response.content)
        except ValueError as exc:
            raise wire.WireError(f"body is not valid JSON: {exc}") from exc
    return wire.decode(response.content, content_type)


def _service_error(response: requests.Response) -> tuple[str | None, str]:
    """``(code, message)`` from an error answer: the protocol's shape, FastAPI's, or the raw text."""
    try:
        body = wire.decode(response.content, wire.media_type(response.headers.get("Content-Type")))
    except wire.WireError:
        body = None
    if isinstance(body, Mapping):
        error = body.get("error")
        if isinstance(error, Mapping):
            return (str(error["code"]) if error.get("code") is not None else None), str(error.get("message", error))
        if "detail" in body:
            return None, str(body["detail"])[:_ERROR_TEXT_LIMIT]
        if "message" in body:
            return None, str(body["message"])[:_ERROR_TEXT_LIMIT]
    text = response.content[:_ERROR_TEXT_LIMIT].decode("utf-8", "replace").strip()
    return None, text or (response.reason or "no body")


def _encoded_request(
    method: str, url: str, payload: Mapping[str, Any] | None, content_type: str, accept: str
) -> tuple[bytes | None, dict[str, str]]:
    """Body and headers of a call, encoded once, before the clock starts: a payload that cannot be
    encoded is never sent."""
    headers = {"Accept": accept}
    if wire.MSGPACK in accept:
        headers["Accept-Encoding"] = "identity"  # gzip of float arrays costs more than it saves
    if payload is None:
        return None, headers
    try:
        body = wire.encode(payload, content_type)
    except (TypeError, ValueError) as exc:
        raise AtroposRequestError(
            f"{method} {url}: cannot encode the request as {content_type}: {exc}",
            status=None,
            code="unencodable",
            method=method,
            url=url,
        ) from exc
    headers["Content-Type"] = content_type
    return body, headers


def _answer(method: str, url: str, response: requests.Response, exact_integers: bool) -> Answer:
    """The decoded answer; an error status the caller accepts (404 = not supported) has no body."""
    if response.status_code >= 400:
        return Answer(response.status_code, None)
    try:
        return Answer(response.status_code, _decode_response(response, exact_integers))
    except wire.WireError as exc:
        raise AtroposProtocolError(
            f"{method} {url} answered {response.status_code} with an undecodable body "
            f"({len(response.content)} bytes): {exc}",
            field="body",
            method=method,
            url=url,
        ) from exc


class RetryingClient:
    """HTTP client of one service, every call under the retry policy (see the module docstring).

    Args:
        api_url: base URL, e.g. ``http://127.0.0.1:8100``.
        timeout: seconds allowed for one HTTP request (connect and each read); cut to what is left
            of ``max_wait_time``.
        retry_attempts: most tries per call, the first included.
        retry_delay: first backoff in seconds; doubles per retry, plus up to as much jitter.
        max_wait_time: most seconds one call may take, requests and waits included.
        api_key: sent as ``Authorization: Bearer <key>``.
    """

    def __init__(
        self,
        api_url: str,
        timeout: float = 30.0,
        retry_attempts: int = 5,
        retry_delay: float = 1.0,
        max_wait_time: float = 120.0,
        api_key: str | None = None,
    ) -> None:
        if not api_url.startswith(("http://", "https://")):
            raise ValueError(f"api_url must start with http:// or https://, got {api_url!r}")
        if timeout <= 0 or max_wait_time <= 0:
            raise ValueError(f"timeout and max_wait_time must be > 0, got {timeout} and {max_wait_time}")
        if retry_attempts < 1:
            raise ValueError(f"retry_attempts counts tries and must be >= 1, got {retry_attempts}")
        if retry_delay < 0:
            raise ValueError(f"retry_delay must be >= 0, got {retry_delay}")
        self.api_url = api_url.rstrip("/")
        self.timeout = float(timeout)
        self.retry_attempts = int(retry_attempts)
        self.retry_delay = float(retry_delay)
        self.max_wait_time = float(max_wait_time)
        # One session: keep-alive connections are reused across calls and retries.
        self._session = requests.Session()
        self._session.headers["User-Agent"] = "verl-recipe-atropos-client"
        if api_key:
            self._session.headers["Authorization"] = f"Bearer {api_key}"
        self._stats_lock = threading.Lock()
        self._requests = 0
        self._retries = 0
        self._failures = 0
        self._successes = 0
        self._last_latency_s = 0.0
        self._total_latency_s = 0.0

    # ---- lifecycle ----------------------------------------------------------------------

    def close(self) -> None:
        """Close the pooled connections."""
        self._session.close()

    def __enter__(self) -> RetryingClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---- counters -----------------------------------------------------------------------

    @property
    def stats(self) -> ClientStats:
        """A snapshot of the counters."""
        with self._stats_lock:
            mean = self._total_latency_s / self._successes if self._successes else 0.0
            return ClientStats(self._requests, self._retries, self._failures, self._last_latency_s, mean)

    def metrics(self, prefix: str = "atropos/client/") -> dict[str, float]:
        """The counters as a flat dict for the trainer's logger."""
        stats = self.stats
        return {
            f"{prefix}requests": float(stats.requests),
            f"{prefix}retries": float(stats.retries),
            f"{prefix}failures": float(stats.failures),
            f"{prefix}last_latency_s": stats.last_latency_s,
            f"{prefix}mean_latency_s": stats.mean_latency_s,
        }

    def _count_call(self, *, retries: int, latency_s: float | None) -> None:
        with self._stats_lock:
            self._requests += 1
            self._retries += retries
            if latency_s is None:
                self._failures += 1
            else:
                self._successes += 1
                self._last_latency_s = latency_s
                self._total_latency_s += latency_s

    # ---- the one retry loop -------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        *,
        payload: Mapping[str, Any] | None = None,
        content_type: str = wire.JSON,
        accept: str = wire.JSON,
        max_attempts: int | None = None,
        max_wait_s: float | None = None,
        accept_statuses: frozenset[int] | set[int] = frozenset(),
        exact_integers: bool = False,
        parse: Callable[[Answer], _Parsed] = _keep_answer,  # type: ignore[assignment]
    ) -> _Parsed:
        """Send one call with the retry policy and ``parse`` its answer; every method goes through here.

        Retried: connection errors, timeouts, 5xx, 408, 429 (waiting at least ``Retry-After``).
        Raised at once: other 4xx (unless listed in ``accept_statuses``, which are returned with
        a None body), and a 2xx body that cannot be decoded or that ``parse`` rejects. The call
        ends after ``max_attempts`` tries or when ``max_wait_time`` is spent, whichever comes
        first; each try's timeout is cut to the time left. Counted once in the stats, as a
        success only when ``parse`` accepted the answer.
        """
        url = f"{self.api_url}{path}"
        body, headers = _encoded_request(method, url, payload, content_type, accept)
        started = time.monotonic()
        progress = _CallProgress()
        try:
            response = self._send_with_retries(
                method, url, body, headers, max_attempts or self.retry_attempts, accept_statuses, started, progress,
                max_wait_s or self.max_wait_time,
            )
            parsed = parse(_answer(method, url, response, exact_integers))
        except AtroposAPIError:
            self._count_call(retries=max(progress.attempts - 1, 0), latency_s=None)
            raise
        self._count_call(retries=progress.attempts - 1, latency_s=time.monotonic() - started)
        return parsed

    def _send_with_retries(
        self,
        method: str,
        url: str,
        body: bytes | None,
        headers: Mapping[str, str],
        max_attempts: int,
        accept_statuses: frozenset[int] | set[int],
        started: float,
        progress: _CallProgress,
        max_wait_s: float,
    ) -> requests.Response:
        """The retry loop (tenacity) around :meth:`_attempt`; raises AtroposUnavailableError on give-up."""
        deadline = started + max_wait_s
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(max_attempts) | _StopWhenBudgetSpent(deadline),
            wait=_WaitWithinBudget(_exponential_jitter_wait(self.retry_delay), deadline),
            retry=tenacity.retry_if_exception_type(_RetryableFailure),
            before_sleep=self._log_retry,
            sleep=time.sleep,
        )
        try:
            for attempt in retrying:
                with attempt:
                    progress.attempts = attempt.retry_state.attempt_number
                    response = self._attempt(
                        method, url, body, headers, deadline, progress.attempts, max_attempts, accept_statuses
                    )
        except tenacity.RetryError as retry_error:
            failure = retry_error.last_attempt.exception()
            assert isinstance(failure, _RetryableFailure)
            raise self._give_up(method, url, progress.attempts, max_attempts, started, deadline, failure) from (
                failure.__cause__
            )
        return response

    def _attempt(
        self,
        method: str,
        url: str,
        body: bytes | None,
        headers: Mapping[str, str],
        deadline: float,
        attempt_number: int,
        max_attempts: int,
        accept_statuses: frozenset[int] | set[int],
    ) -> requests.Response:
        """One HTTP try: a response to keep, a :class:`_RetryableFailure`, or a request error."""
        timeout_s = max(min(self.timeout, deadline - time.monotonic()), 1e-3)
        logger.debug("%s %s: attempt %d/%d (timeout %.3g s)", method, url, attempt_number, max_attempts, timeout_s)
        try:
            response = self._session.request(method, url, data=body, headers=headers, timeout=timeout_s)
        except requests.Timeout as exc:
            cause = f"no answer within {timeout_s:.3g} s ({type(exc).__name__}: {exc})"
            logger.debug("%s %s: attempt %d failed: %s", method, url, attempt_number, cause)
            raise _RetryableFailure(cause) from exc
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
            cause = f"connection failed ({type(exc).__name__}: {exc})"
            logger.debug("%s %s: attempt %d failed: %s", method, url, attempt_number, cause)
            raise _RetryableFailure(cause) from exc
        except requests.RequestException as exc:  # bad gzip, redirects, headers: a broken answer, retried
            cause = f"request failed ({type(exc).__name__}: {exc})"
            logger.debug("%s %s: attempt %d failed: %s", method, url, attempt_number, cause)
            raise _RetryableFailure(cause) from exc

        status = response.status_code
        if status < 400 or status in accept_statuses:
            logger.debug("%s %s: attempt %d answered %d", method, url, attempt_number, status)
            return response
        code, message = _service_error(response)
        described = f"HTTP {status}" + (f" {code}" if code else "") + f": {message}"
        if status >= 500 or status in _RETRYABLE_4XX:
            retry_after_s = _parse_retry_after(response.headers.get("Retry-After"))
            if retry_after_s is not None:
                described += f" (Retry-After {retry_after_s:.3g} s)"
            logger.debug("%s %s: attempt %d failed: %s", method, url, attempt_number, described)
            raise _RetryableFailure(described, status=status, retry_after_s=retry_after_s)
        logger.debug("%s %s: attempt %d rejected, not retried: %s", method, url, attempt_number, described)
        raise AtroposRequestError(
            f"{method} {url}: {described}",
            status=status,
            code=code,
            service_message=message,
            method=method,
            url=url,
        )

    @staticmethod
    def _log_retry(retry_state: tenacity.RetryCallState) -> None:
        logger.debug(
            "retrying in %.3g s after attempt %d: %s",
            retry_state.upcoming_sleep,
            retry_state.attempt_number,
            retry_state.outcome.exception() if retry_state.outcome else "?",
        )

    def _give_up(
        self,
        method: str,
        url: str,
        attempts: int,
        max_attempts: int,
        started: float,
        deadline: float,
        failure: _RetryableFailure,
    ) -> AtroposUnavailableError:
        elapsed_s = time.monotonic() - started
        left_s = max(0.0, deadline - time.monotonic())
        if attempts >= max_attempts:
            reason = f"retry_attempts={max_attempts} reached"
        elif failure.retry_after_s is not None and failure.retry_after_s >= left_s:
            reason = (
                f"the service asked to wait {failure.retry_after_s:.3g} s (Retry-After), more than the "
                f"{left_s:.3g} s left of max_wait_time={self.max_wait_time:g} s"
            )
        else:
            reason = f"max_wait_time={self.max_wait_time:g} s spent"
        message = (
            f"{method} {url}: gave up after {attempts} attempt{'s' if attempts != 1 else ''} in {elapsed_s:.2f} s "
            f"({reason}); last cause: {failure.cause}"
        )
        logger.info("%s", message)
        return AtroposUnavailableError(
            message,
            method=method,
            url=url,
            attempts=attempts,
            elapsed_s=elapsed_s,
            last_cause=failure.cause,
            last_status=failure.status,
            reason=reason,
        )

    # ---- request building -----------------------------------------------------------------
