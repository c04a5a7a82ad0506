"""HTTP client of the environment service (see PROTOCOL.md) and of Atropos' trajectory API.

The trainer asks a service to judge a batch of responses and to compute advantages. Services are
separate processes that restart, stall and get overloaded, so every call goes through one retry
policy (:meth:`AtroposEnvironmentClient._request`): exponential backoff with jitter, ``Retry-After``
honoured, bounded both by a number of attempts and by a total time that includes the waits and
the requests themselves. What cannot succeed by retrying (a 4xx, a 200 whose body breaks the
contract) is raised at once, as an exception that says what was wrong.

The same client speaks the pull-based Atropos trajectory API (``run-api`` of atroposlib:
``/register``, ``/batch``, ``/status``, ``/info``) with the same rules.
"""

from __future__ import annotations

import email.utils
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal, TypeVar

import numpy as np
import requests
import tenacity

from recipe.atropos import wire

__all__ = [
    "AtroposAPIError",
    "AtroposEnvironmentClient",
    "AtroposProtocolError",
    "AtroposRequestError",
    "AtroposUnavailableError",
    "ClientStats",
    "EvaluationResult",
    "InvalidSample",
    "TrajectoryInfo",
    "TrajectoryStatus",
]

logger = logging.getLogger("verl.recipe.atropos")

Encoding = Literal["auto", "json", "msgpack"]

# Statuses that say "try again later" rather than "your request is wrong".
_RETRYABLE_4XX = frozenset({408, 429})
# Preferred answer encoding: msgpack carries per-token arrays as raw bytes; JSON always works.
_ACCEPT_COMPACT = f"{wire.MSGPACK}, {wire.JSON};q=0.5"
_ERROR_TEXT_LIMIT = 500


# --------------------------------------------------------------------------------------------
# Exceptions
# --------------------------------------------------------------------------------------------


class AtroposAPIError(Exception):
    """Base of every error this client raises about a service call."""


class AtroposUnavailableError(AtroposAPIError):
    """The service could not be reached or kept failing: the client gave up retrying.

    ``attempts`` and ``elapsed_s`` say how hard it tried, ``last_cause`` what went wrong last
    (``last_status`` is its HTTP status, None for connection errors and timeouts) and ``reason``
    which bound ended it.
    """

    def __init__(
        self,
        message: str,
        *,
        method: str,
        url: str,
        attempts: int,
        elapsed_s: float,
        last_cause: str,
        last_status: int | None,
        reason: str,
    ) -> None:
        super().__init__(message)
        self.method = method
        self.url = url
        self.attempts = attempts
        self.elapsed_s = elapsed_s
        self.last_cause = last_cause
        self.last_status = last_status
        self.reason = reason


class AtroposRequestError(AtroposAPIError):
    """The request itself is wrong; retrying it cannot help.

    ``status`` is the HTTP status the service answered (a 4xx), or None when the client refused
    to send the request because it breaks the contract (lists of different lengths, wrong types).
    ``code`` and ``service_message`` come from the service's ``{"error": {...}}`` body.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None,
        code: str | None = None,
        service_message: str | None = None,
        method: str | None = None,
        url: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.service_message = service_message
        self.method = method
        self.url = url


class AtroposProtocolError(AtroposAPIError):
    """A successful answer whose body breaks the contract (undecodable, wrong types or sizes).

    ``field`` names the offending field (``"advantages"``, ``"scores"``, ``"metrics.accuracy"``,
    ``"body"``), ``sample_index`` the sample when one is at fault, ``expected`` and ``actual`` the
    sizes when sizes disagree. Not retried: a service that answers nonsense once will again.
    """

    def __init__(
        self,
        message: str,
        *,
        field: str,
        sample_index: int | None = None,
        expected: Any = None,
        actual: Any = None,
        method: str | None = None,
        url: str | None = None,
    ) -> None:
        super().__init__(message)
        self.field = field
        self.sample_index = sample_index
        self.expected = expected
        self.actual = actual
        self.method = method
        self.url = url


class _RetryableFailure(Exception):
    """One failed attempt worth retrying (connection error, timeout, 5xx, 408, 429). Internal."""

    def __init__(self, cause: str, *, status: int | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(cause)
        self.cause = cause
        self.status = status
        self.retry_after_s = retry_after_s


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InvalidSample:
    """One sample's part of an answer that breaks the contract, kept in place of the value.

    A bad sample must cost that sample only, so the client does not reject the whole answer for
    it: the caller decides (fall back for that sample, or stop when fallback is off). ``reason``
    is a short key for metrics (``malformed``, ``non_finite``, ``out_of_range``, ...),
    ``message`` says which field and value.
    """

    reason: str
    message: str


@dataclass(frozen=True)
class EvaluationResult:
    """The validated answer of ``/evaluate_and_compute_advantages`` for a batch of B samples.

    ``advantages[i]`` is a float32 array with one value per response token, a float (a sequence
    level advantage to broadcast), None (compute standard GRPO for that sample) or an
    :class:`InvalidSample`. Whether a token array's length matches the sample's response is checked
    by the caller, which can fall back per sample. ``scores`` is a float64 array of shape (B,), NaN
    where ``invalid_scores`` holds why the score was unusable. ``metrics`` the environment's
    numeric metrics (``ignored_metrics`` names those that were not numbers), ``raw`` the decoded
    answer as received.
    """

    advantages: list[np.ndarray | float | None | InvalidSample]
    scores: np.ndarray
    metrics: dict[str, float]
    raw: dict[str, Any]
    invalid_scores: dict[int, InvalidSample] = field(default_factory=dict)
    ignored_metrics: tuple[str, ...] = ()


@dataclass(frozen=True)
class TrajectoryStatus:
    """``GET /status`` of the trajectory API: the trainer step it counts and groups queued."""

    current_step: int
    queue_size: int


@dataclass(frozen=True)
class TrajectoryInfo:
    """``GET /info`` of the trajectory API; both are -1 until a trainer registered."""

    batch_size: int
    max_token_len: int


@dataclass(frozen=True)
class ClientStats:
    """Counters since the client was created, for the trainer's metrics.

    ``requests`` counts calls (however many attempts each took), ``retries`` the attempts after
    the first, ``failures`` the calls that raised (or a health check that found the service
    down). Latencies are of successful calls, retries and waits included.
    """

    requests: int = 0
    retries: int = 0
    failures: int = 0
    last_latency_s: float = 0.0
    mean_latency_s: float = 0.0


@dataclass(frozen=True)
class _Answer:
    status: int
    body: Any  # decoded; None for an error status the caller accepts


@dataclass
class _CallProgress:
    attempts: int = 0


_Parsed = TypeVar("_Parsed")


def _keep_answer(answer: _Answer) -> Any:
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


# --------------------------------------------------------------------------------------------
# Small validators
# --------------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, np.ndarray):
        return f"array of {value.dtype} with shape {value.shape}"
    return type(value).__name__


def _is_list_like(value: Any) -> bool:
    return isinstance(value, (list, tuple, np.ndarray))


# --------------------------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------------------------


class AtroposEnvironmentClient:
    """Client of one environment service (or of one Atropos trajectory API).

    Args:
        api_url: base URL, e.g. ``http://127.0.0.1:8100``.
        timeout: seconds allowed for one HTTP request (connect and each read); cut to what is left
            of ``max_wait_time``.
        retry_attempts: most tries per call, the first included.
        retry_delay: first backoff in seconds; doubles per retry, plus up to as much jitter.
        max_wait_time: most seconds one call may take, requests and waits included.
        api_key: sent as ``Authorization: Bearer <key>``.
        encoding: request bodies in ``"json"``, ``"msgpack"``, or ``"auto"``: msgpack once a health
            check saw the service advertise it and the request carries token arrays, JSON
            otherwise. Answers are decoded in whatever encoding the service chose.
    """

    def __init__(
        self,
        api_url: str,
        timeout: float = 30.0,
        retry_attempts: int = 5,
        retry_delay: float = 1.0,
        max_wait_time: float = 120.0,
        api_key: str | None = None,
        *,
        encoding: Encoding = "auto",
    ) -> None:
        if not api_url.startswith(("http://", "https://")):
            raise ValueError(f"api_url must start with http:// or https://, got {api_url!r}")
        if timeout <= 0 or max_wait_time <= 0:
            raise ValueError(f"timeout and max_wait_time must be > 0, got {timeout} and {max_wait_time}")
        if retry_attempts < 1:
            raise ValueError(f"retry_attempts counts tries and must be >= 1, got {retry_attempts}")
        if retry_delay < 0:
            raise ValueError(f"retry_delay must be >= 0, got {retry_delay}")
        if encoding not in ("auto", "json", "msgpack"):
            raise ValueError(f"encoding must be 'auto', 'json' or 'msgpack', got {encoding!r}")
        self.api_url = api_url.rstrip("/")
        self.timeout = float(timeout)
        self.retry_attempts = int(retry_attempts)
        self.retry_delay = float(retry_delay)
        self.max_wait_time = float(max_wait_time)
        self.encoding: Encoding = encoding
        # What the last healthy /health said: its body and the encodings it advertised.
        self.service_info: dict[str, Any] = {}
        self.service_encodings: tuple[str, ...] = ()
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

    def __enter__(self) -> AtroposEnvironmentClient:
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

    # ---- environment service ------------------------------------------------------------

    def health_check(self, timeout_s: float | None = None) -> bool:
        """True when ``GET /health`` answers 200 with ``"status": "ok"``; one attempt, never raises.

        ``timeout_s`` caps this probe below ``timeout`` (a quick check during an outage). Also
        records the encodings the service advertises, which ``encoding="auto"`` relies on.
        """

        def healthy(answer: _Answer) -> dict[str, Any]:
            body = answer.body
            if not isinstance(body, Mapping) or body.get("status") != "ok":
                raise AtroposProtocolError(f"GET {self.api_url}/health: not ok: {body!r:.200}", field="status")
            return dict(body)

        try:
            body = self._request(
                "GET", "/health", accept=self._accept_header(), max_attempts=1, max_wait_s=timeout_s, parse=healthy
            )
        except AtroposAPIError as exc:
            logger.debug("health check of %s failed: %s", self.api_url, exc)
            return False
        self.service_info = body
        encodings = body.get("encodings")
        if isinstance(encodings, Sequence) and not isinstance(encodings, str):
            self.service_encodings = tuple(str(e).lower() for e in encodings)
        else:
            self.service_encodings = (wire.JSON,)
        return True

    def evaluate_and_compute_advantages(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        metadata: Mapping[str, Any] | None = None,
        *,
        group_ids: Sequence[str | int] | None = None,
        ground_truths: Sequence[str | None] | None = None,
        response_token_ids: Sequence[Sequence[int] | np.ndarray] | None = None,
        response_lengths: Sequence[int] | None = None,
    ) -> EvaluationResult:
        """Score B responses and get their advantages (``POST /evaluate_and_compute_advantages``).

        The request is checked before it is sent (every list has B items of the right type), so a
        caller's mistake is an :class:`AtroposRequestError` naming the field, not a round trip.
        Token ids travel as int32 arrays (raw bytes in msgpack).
        """
        payload = self._evaluation_payload(
            prompts, responses, metadata, group_ids, ground_truths, response_token_ids, response_lengths
        )
        batch_size = len(payload["prompts"])
        path = "/evaluate_and_compute_advantages"
        where = f"POST {self.api_url}{path}"
        return self._request(
            "POST",
            path,
            payload=payload,
            content_type=self._request_content_type(carries_arrays="response_token_ids" in payload),
            accept=self._accept_header(),
            parse=lambda answer: _parse_evaluation(answer.body, batch_size, where),
        )

    def register_inference_endpoint(self, base_url: str, model: str, api_key: str | None = None) -> bool:
        """Tell the service where an OpenAI-compatible server is; False when it does not support it (404)."""
        payload = {"base_url": base_url, "model": model, "api_key": api_key}
        answer = self._request(
            "POST", "/register_inference_endpoint", payload=payload, accept=self._accept_header(), accept_statuses={404}
        )
        if answer.status == 404:
            logger.info("%s does not support /register_inference_endpoint (404)", self.api_url)
            return False
        body = answer.body
        return bool(body.get("registered", True)) if isinstance(body, Mapping) else True

    # ---- Atropos trajectory API (atroposlib run-api) ------------------------------------

    def register_trainer(
        self,
        *,
        batch_size: int,
        max_token_len: int,
        num_steps: int,
        wandb_group: str = "",
        wandb_project: str = "",
        checkpoint_dir: str = "",
        save_checkpoint_interval: int = -1,
        starting_step: int = 0,
    ) -> int:
        """``POST /register``: announce the trainer to the trajectory API; returns its uuid.

        Environments wait for this before they send scored groups. ``save_checkpoint_interval``
        -1 tells them the trainer does not checkpoint on their schedule.
        """
        payload = {
            "wandb_group": wandb_group,
            "wandb_project": wandb_project,
            "batch_size": int(batch_size),
            "max_token_len": int(max_token_len),
            "checkpoint_dir": checkpoint_dir,
            "save_checkpoint_interval": int(save_checkpoint_interval),
            "starting_step": int(starting_step),
            "num_steps": int(num_steps),
        }
        where = f"POST {self.api_url}/register"

        def trainer_uuid(answer: _Answer) -> int:
            uuid = answer.body.get("uuid") if isinstance(answer.body, Mapping) else None
            if not isinstance(uuid, int) or isinstance(uuid, bool):
                raise AtroposProtocolError(
                    f"{where}: expected {{'uuid': <int>}}, got {answer.body!r:.200}", field="uuid"
                )
            return uuid

        # The uuid is a 128-bit integer: decoded with the stdlib, which keeps it exact.
        return self._request(
            "POST", "/register", payload=payload, accept=wire.JSON, exact_integers=True, parse=trainer_uuid
        )

    def get_batch(self) -> list[dict[str, Any]] | None:
        """``GET /batch``: the next training batch (a list of scored groups), or None if not ready.

        Each group has ``tokens``, ``masks`` (-100 = not trained) and ``scores``, one item per
        sequence, plus optional ``advantages``, ``overrides``, ... as the environment sent them.
        A trainer that has not registered gets an :class:`AtroposRequestError` (code
        ``not_registered``): the API answers that with a 200.
        """
        url = f"{self.api_url}/batch"
        where = f"GET {url}"

        def scored_groups(answer: _Answer) -> list[dict[str, Any]] | None:
            body = answer.body
            if not isinstance(body, Mapping):
                raise AtroposProtocolError(f"{where}: expected a JSON object, got {_type_name(body)}", field="body")
            if body.get("status") == "error":
                message = str(body.get("message", "no message"))
                raise AtroposRequestError(
                    f"{where}: the trajectory API refused: {message}",
                    status=answer.status,
                    code="not_registered" if "register" in message.lower() else "error",
                    service_message=message,
                    method="GET",
                    url=url,
                )
            if "batch" not in body:
                raise AtroposProtocolError(f"{where}: answer has no 'batch' field: {body!r:.200}", field="batch")
            batch = body["batch"]
            if batch is None:
                return None
            if not isinstance(batch, list):
                raise AtroposProtocolError(
                    f"{where}: batch: expected a list of groups, got {_type_name(batch)}", field="batch"
                )
            for group_index, group in enumerate(batch):
                _check_scored_group(group, group_index, where)
            return batch

        return self._request("GET", "/batch", accept=wire.JSON, parse=scored_groups)

    def status(self) -> TrajectoryStatus:
        """``GET /status``: the step the trajectory API counts and how many groups it has queued."""
        where = f"GET {self.api_url}/status"
        return self._request(
            "GET",
            "/status",
            accept=wire.JSON,
            parse=lambda answer: TrajectoryStatus(**_int_fields(answer.body, ("current_step", "queue_size"), where)),
        )

    def info(self) -> TrajectoryInfo:
        """``GET /info``: the registered batch size and token budget (-1 before registration)."""
        where = f"GET {self.api_url}/info"
        return self._request(
            "GET",
            "/info",
            accept=wire.JSON,
            parse=lambda answer: TrajectoryInfo(**_int_fields(answer.body, ("batch_size", "max_token_len"), where)),
        )

    # ---- encoding choice ----------------------------------------------------------------

    def _accept_header(self) -> str:
        return wire.JSON if self.encoding == "json" else _ACCEPT_COMPACT

    def _request_content_type(self, *, carries_arrays: bool) -> str:
        """msgpack when chosen, or (auto) when the service advertised it and there are arrays to carry."""
        if self.encoding == "msgpack":
            return wire.MSGPACK
        if self.encoding == "auto" and carries_arrays and wire.MSGPACK in self.service_encodings:
            return wire.MSGPACK
        return wire.JSON

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
        parse: Callable[[_Answer], _Parsed] = _keep_answer,  # type: ignore[assignment]
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
        # Encoded once, before the clock starts: a payload that cannot be encoded is never sent.
        headers = {"Accept": accept}
        if wire.MSGPACK in accept:
            headers["Accept-Encoding"] = "identity"  # gzip of float arrays costs more than it saves
        body: bytes | None = None
        if payload is not None:
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

        started = time.monotonic()
        progress = _CallProgress()
        try:
            response = self._send_with_retries(
                method, url, body, headers, max_attempts or self.retry_attempts, accept_statuses, started, progress,
                max_wait_s or self.max_wait_time,
            )
            if response.status_code >= 400:  # a status the caller accepts (404 = not supported)
                answer = _Answer(response.status_code, None)
            else:
                try:
                    answer = _Answer(response.status_code, _decode_response(response, exact_integers))
                except wire.WireError as exc:
                    raise AtroposProtocolError(
                        f"{method} {url} answered {response.status_code} with an undecodable body "
                        f"({len(response.content)} bytes): {exc}",
                        field="body",
                        method=method,
                        url=url,
                    ) from exc
            parsed = parse(answer)
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

    @staticmethod
    def _evaluation_payload(
        prompts: Sequence[str],
        responses: Sequence[str],
        metadata: Mapping[str, Any] | None,
        group_ids: Sequence[str | int] | None,
        ground_truths: Sequence[str | None] | None,
        response_token_ids: Sequence[Sequence[int] | np.ndarray] | None,
        response_lengths: Sequence[int] | None,
    ) -> dict[str, Any]:
        """Check the request against the contract and build its payload."""

        def reject(message: str, field: str) -> AtroposRequestError:
            return AtroposRequestError(f"invalid request, not sent: {field}: {message}", status=None, code="invalid")

        def check_list(values: Any, field: str, allowed: tuple[type, ...], allowed_name: str) -> list[Any]:
            if not _is_list_like(values):
                raise reject(f"expected a list of {allowed_name}, got {_type_name(values)}", field)
            values = list(values)
            if len(values) != batch_size:
                raise reject(f"has {len(values)} items, prompts has {batch_size}", field)
            for index, value in enumerate(values):
                if not isinstance(value, allowed) or isinstance(value, bool):
                    raise reject(f"item {index} is {_type_name(value)}, expected {allowed_name}", field)
            return values

        if not _is_list_like(prompts):
            raise reject(f"expected a list of str, got {_type_name(prompts)}", "prompts")
        batch_size = len(prompts)
        if batch_size == 0:
            raise reject("is empty; a batch needs at least one sample", "prompts")
        payload: dict[str, Any] = {
            "prompts": check_list(prompts, "prompts", (str,), "str"),
            "responses": check_list(responses, "responses", (str,), "str"),
        }
        if metadata is not None:
            if not isinstance(metadata, Mapping):
                raise reject(f"expected an object, got {_type_name(metadata)}", "metadata")
            payload["metadata"] = dict(metadata)
        if group_ids is not None:
            payload["group_ids"] = check_list(group_ids, "group_ids", (str, int, np.integer), "str or int")
            payload["group_ids"] = [g.item() if isinstance(g, np.integer) else g for g in payload["group_ids"]]
        if ground_truths is not None:
            payload["ground_truths"] = check_list(ground_truths, "ground_truths", (str, type(None)), "str or null")
        if response_token_ids is not None:
            if not _is_list_like(response_token_ids):
                raise reject(
                    f"expected a list of token lists, got {_type_name(response_token_ids)}", "response_token_ids"
                )
            if len(response_token_ids) != batch_size:
                raise reject(f"has {len(response_token_ids)} items, prompts has {batch_size}", "response_token_ids")
            payload["response_token_ids"] = [
                _token_array(ids, index, reject) for index, ids in enumerate(response_token_ids)
            ]
        if response_lengths is not None:
            lengths = check_list(response_lengths, "response_lengths", (int, np.integer), "int")
            for index, length in enumerate(lengths):
                if length < 0:
                    raise reject(f"item {index} is {length}, expected >= 0", "response_lengths")
                if "response_token_ids" in payload and len(payload["response_token_ids"][index]) != length:
                    raise reject(
                        f"item {index} is {length} but response_token_ids[{index}] has "
                        f"{len(payload['response_token_ids'][index])} tokens",
                        "response_lengths",
                    )
            payload["response_lengths"] = [int(length) for length in lengths]
        return payload


def _token_array(ids: Any, index: int, reject: Any) -> np.ndarray:
    """One sample's token ids as a 1-D int32 array (what goes on the wire)."""
    try:
        return wire.token_id_array(ids)
    except ValueError as exc:
        raise reject(str(exc), f"response_token_ids[{index}]") from exc


# --------------------------------------------------------------------------------------------
# Answer decoding and validation
# --------------------------------------------------------------------------------------------


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


def _parse_evaluation(body: Any, batch_size: int, where: str) -> EvaluationResult:
    """Check an evaluation answer against the contract: types everywhere, B items per list.

    What cannot be pinned on one sample (not an object, a list missing or of the wrong length)
    rejects the answer. One sample's unusable advantage or score becomes an
    :class:`InvalidSample` in its place, and a metric that is not a number is left out, so that a
    bad sample costs that sample only.
    """

    def broken(message: str, field: str, **details: Any) -> AtroposProtocolError:
        return AtroposProtocolError(f"{where}: the answer breaks the contract: {message}", field=field, **details)

    if not isinstance(body, Mapping):
        raise broken(f"body: expected an object, got {_type_name(body)}", "body")

    def per_sample_list(field: str) -> Sequence[Any]:
        if field not in body:
            raise broken(f"{field}: missing (expected {batch_size} items, one per sample)", field)
        values = body[field]
        if not _is_list_like(values) or (isinstance(values, np.ndarray) and values.ndim != 1):
            raise broken(f"{field}: expected a list of {batch_size} items, got {_type_name(values)}", field)
        if len(values) != batch_size:
            raise broken(
                f"{field}: has {len(values)} items, expected {batch_size} (one per sample)",
                field,
                expected=batch_size,
                actual=len(values),
            )
        return values

    advantages = [_sample_advantage(item, index) for index, item in enumerate(per_sample_list("advantages"))]
    scores, invalid_scores = _scores(per_sample_list("scores"))

    metrics_raw = body.get("metrics", {})
    if metrics_raw is None:
        metrics_raw = {}
    if not isinstance(metrics_raw, Mapping):
        raise broken(f"metrics: expected an object of numbers, got {_type_name(metrics_raw)}", "metrics")
    metrics: dict[str, float] = {}
    ignored: list[str] = []
    for name, value in metrics_raw.items():
        number = _finite_or_none(value) if _is_number(value) else None
        if number is None:  # the environment's own metrics: logged when usable, never worth a step
            ignored.append(str(name))
        else:
            metrics[str(name)] = number
    if ignored:
        logger.warning("%s: metrics %s are not finite numbers; left out", where, ignored[:10])
    return EvaluationResult(
        advantages=advantages, scores=scores, metrics=metrics, raw=dict(body), invalid_scores=invalid_scores,
        ignored_metrics=tuple(ignored),
    )


def _finite_or_none(value: Any) -> float | None:
    """float(value) when it is a finite float64, else None (ints beyond float64 overflow)."""
    try:
        number = float(value)
    except (OverflowError, ValueError, TypeError):
        return None
    return number if math.isfinite(number) else None


def _scores(values: Sequence[Any]) -> tuple[np.ndarray, dict[int, InvalidSample]]:
    """float64 [B] scores, NaN where a score is unusable, and why."""
    if isinstance(values, np.ndarray) and values.dtype.kind in "iuf":
        scores = values.astype(np.float64)
    else:
        scores = np.array([_finite_or_none(v) if _is_number(v) else None for v in values], dtype=np.float64)
    invalid: dict[int, InvalidSample] = {}
    for index in np.flatnonzero(~np.isfinite(scores)).tolist():
        value = values[index]
        reason = "non_finite" if _is_number(value) else "malformed"
        invalid[index] = InvalidSample(reason, f"scores[{index}]: {_describe(value)} is not a finite number")
        scores[index] = np.nan
    return scores, invalid


def _describe(value: Any) -> str:
    """A value for a message: short, whatever it is."""
    return _type_name(value) if _is_list_like(value) or isinstance(value, Mapping) else f"{value!r:.40}"


def _sample_advantage(item: Any, index: int) -> np.ndarray | float | None | InvalidSample:
    """One sample's advantage: a float32 token array, one float, None (no override) or why it is unusable."""
    field = f"advantages[{index}]"
    if item is None:
        return None
    if _is_number(item):
        try:
            value = float(item)
        except OverflowError:  # an int beyond float64
            return InvalidSample("out_of_range", f"{field}: an integer of {len(str(abs(int(item))))} digits is beyond float64")
        if not math.isfinite(value):
            return InvalidSample("non_finite", f"{field}: {value} is not finite")
        return value
    if not _is_list_like(item):
        return InvalidSample(
            "malformed", f"{field}: expected a list of numbers, a number or null, got {_type_name(item)}"
        )
    if isinstance(item, np.ndarray):
        if item.ndim != 1 or (item.size and item.dtype.kind not in "iuf"):
            return InvalidSample("malformed", f"{field}: expected a flat array of numbers, got {_type_name(item)}")
        array = item
    else:
        # numpy's type inference checks thousands of values at C speed; only a failure walks the list.
        try:
            array = np.asarray(item)
        except (ValueError, TypeError, OverflowError):  # ragged nesting
            array = None
        if array is None or array.ndim != 1 or (array.size and array.dtype.kind not in "iuf"):
            for position, value in enumerate(item):
                if not _is_number(value):
                    return InvalidSample(
                        "malformed", f"{field}[{position}]: expected a number, got {_type_name(value)}"
                    )
            try:  # only ints beyond int64 get here: numpy made them objects
                array = np.asarray(item, dtype=np.float64)
            except OverflowError:
                return InvalidSample("out_of_range", f"{field}: holds an integer beyond float64")
    wide = array.astype(np.float64, copy=False)
    if not np.isfinite(wide).all():
        position = int(np.flatnonzero(~np.isfinite(wide))[0])
        return InvalidSample("non_finite", f"{field}[{position}]: {wide[position]} is not finite")
    with np.errstate(over="ignore"):
        array = array.astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        position = int(np.flatnonzero(~np.isfinite(array))[0])
        return InvalidSample("out_of_range", f"{field}[{position}]: {wide[position]:.3g} is beyond float32")
    if not array.flags.writeable:  # msgpack arrays view the received bytes; callers may write
        array = array.copy()
    return array


def _check_scored_group(group: Any, group_index: int, where: str) -> None:
    """A trajectory-API group must be an object whose ``tokens`` is a list: the rows it counts for.

    The rest of its shape is checked by the conversion (trajectory.py), which can drop one bad
    sequence or group without losing the batch (run-api has already handed the batch out).
    """
    field = f"batch[{group_index}]"
    if not isinstance(group, Mapping):
        raise AtroposProtocolError(f"{where}: {field}: expected an object, got {_type_name(group)}", field="batch")
    if not isinstance(group.get("tokens"), list):
        raise AtroposProtocolError(
            f"{where}: {field}.tokens: expected a list, got {_type_name(group.get('tokens'))}", field="batch.tokens"
        )


def _int_fields(body: Any, names: tuple[str, ...], where: str) -> dict[str, int]:
    if not isinstance(body, Mapping):
        raise AtroposProtocolError(f"{where}: expected a JSON object, got {_type_name(body)}", field="body")
    fields: dict[str, int] = {}
    for name in names:
        value = body.get(name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise AtroposProtocolError(f"{where}: {name}: expected an int, got {_type_name(value)}", field=name)
        fields[name] = value
    return fields
