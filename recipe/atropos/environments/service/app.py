"""The environment service: one FastAPI app hosting one :class:`Environment` (see PROTOCOL.md).

Endpoints: ``GET /health``, ``POST /evaluate_and_compute_advantages``,
``POST /register_inference_endpoint`` (plus ``/docs`` and ``/openapi.json``). Every error is
``{"error": {"code", "message"}}`` with the protocol's statuses: 400 malformed body, 422 contract
breach (field and sizes named), 401 bad or missing API key, 413 body over the limit, 503 while the
environment is starting or the service has ``max_pending`` evaluations already.

Encodings: bodies arrive as JSON or msgpack (by ``Content-Type``; anything not msgpack is read as
JSON, so ``curl -d`` works), optionally gzip (``Content-Encoding``). Answers are msgpack when
``Accept`` lists it (token arrays as raw float32 bytes, see :mod:`recipe.atropos.wire`), JSON
otherwise, gzip-compressed only when JSON, large, and asked for by ``Accept-Encoding``.

Speed: the hot path never walks per-token numbers in Python. Small fields (strings, group ids,
lengths) are validated by a strict pydantic model; token ids become numpy arrays whose dtype,
shape and range are checked at C speed; the pydantic models of the whole request and answer only
document the schema (OpenAPI).

Threads: evaluations run on a runner, off the event loop, so ``/health`` stays responsive; up to
the environment's ``max_concurrent_evaluations`` at once (GSM8K: 4, its math-verify judging in a
process pool), so an unrelated request need not wait behind a slow one. An evaluation whose client
disconnects (it timed out, and will retry) before its turn comes is dropped, not run: retries do
not pile up behind a slow environment; one that disconnects while sending its body is counted the
same way (``requests_abandoned``), never as a 500. Environments that run one evaluation at a time
run them, under ``serve``, on the main thread (uvicorn runs in a second thread), where signal-based
timeouts work.
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import gzip
import ipaddress
import logging
import os
import queue
import signal
import threading
import time
import typing
import zlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from recipe.atropos import wire
from recipe.atropos.http_auth import CHALLENGE_HEADERS, authorization_header, bearer_refusal
from recipe.atropos.environments.base import (
    ContractError,
    Environment,
    EvaluationRequest,
    InferenceEndpoint,
)

logger = logging.getLogger("verl.recipe.atropos.service")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9001
API_KEY_ENV = "ATROPOS_ENV_API_KEY"
DEFAULT_MAX_BODY_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_PENDING = 64
DEFAULT_MAX_TOTAL_TOKENS = 32 * 1024 * 1024
# Below this a gzip'ed JSON answer saves less than it costs; msgpack float arrays never shrink enough.
GZIP_MIN_BYTES = 64 * 1024
_RETRY_AFTER_S = "1"
_CLIENT_GONE_STATUS = 499  # nginx's "client closed request": an answer nobody reads


@dataclasses.dataclass(frozen=True)
class ServiceSettings:
    """Options of the service itself (not of the environment)."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_pending: int = DEFAULT_MAX_PENDING
    max_total_tokens: int = DEFAULT_MAX_TOTAL_TOKENS
    slurm: bool = False
    log_level: str = "info"


class ServiceError(Exception):
    """An error answer: HTTP status, short code, message (what was wrong, with field and sizes)."""

    def __init__(self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


def error_response(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> Response:
    """The protocol's error shape, always JSON."""
    body = wire.encode({"error": {"code": code, "message": message}})
    return Response(body, status_code=status, media_type=wire.JSON, headers=dict(headers or {}))


# --------------------------------------------------------------------------------------------
# Schema (pydantic): documentation of the wire format, and validation of the small fields
# --------------------------------------------------------------------------------------------


# Integers travel as 64-bit on the wire (orjson, msgpack); token ids and lengths as int32. The
# bounds are exact as floats too (FastAPI's OpenAPI writes them as floats: 2**63 - 1 would round up).
GroupIdInt = Annotated[int, Field(ge=-(2**63), lt=2**63)]
TokenId = Annotated[int, Field(ge=0, le=wire.MAX_TOKEN_ID)]
_PER_SAMPLE = "one per prompt (JSON Schema cannot say: a list of another length gets 422 naming the field)"


class EvaluateRequest(BaseModel):
    """``POST /evaluate_and_compute_advantages`` body (B = number of samples).

    The rules a schema cannot carry: every per-sample list has B items; ``response_lengths``, when
    sent with ``response_token_ids``, equals their lengths; the lengths sum to at most the
    service's ``max_total_tokens`` (``/health`` ``limits``). Breaking one gets 422 naming the field.
    """

    prompts: list[str] = Field(min_length=1, description="the prompt text of each sample (B items, B >= 1)")
    responses: list[str] = Field(description=f"the generated response text of each sample, {_PER_SAMPLE}")
    metadata: dict[str, Any] | None = Field(None, description="free-form, request level")
    group_ids: list[StrictStr | GroupIdInt] | None = Field(
        None, description=f"samples with equal values form one GRPO group, {_PER_SAMPLE}; default: identical prompt text"
    )
    ground_truths: list[str | None] | None = Field(None, description=f"reference answers, {_PER_SAMPLE}")
    response_token_ids: list[list[TokenId]] | None = Field(
        None,
        description=f"the exact response tokens the trainer trains on (msgpack: int arrays), {_PER_SAMPLE}",
    )
    response_lengths: list[TokenId] | None = Field(
        None, description=f"number of response tokens, when ids are not sent, {_PER_SAMPLE}"
    )


# What a field becomes when the environment needs it (Environment.required_request_fields).
_REQUIRED_FORMS: dict[str, Any] = {
    "ground_truths": (list[str], Field(description=f"reference answers (this environment needs them), {_PER_SAMPLE}")),
    "response_token_ids": (
        list[list[TokenId]],
        Field(description=f"the exact response tokens (this environment needs them), {_PER_SAMPLE}"),
    ),
}


def evaluate_request_model(required: frozenset[str] = frozenset()) -> type[BaseModel]:
    """The request schema of a service whose environment needs ``required`` (non-null, every sample)."""
    unknown = set(required) - set(_REQUIRED_FORMS)
    if unknown:
        raise ValueError(f"required_request_fields: {sorted(unknown)} cannot be required; supported: {sorted(_REQUIRED_FORMS)}")
    if not required:
        return EvaluateRequest
    return create_model(
        "EvaluateRequest", __base__=EvaluateRequest, __doc__=EvaluateRequest.__doc__,
        **{name: _REQUIRED_FORMS[name] for name in sorted(required)},
    )


class EvaluateResponse(BaseModel):
    """200 answer of ``POST /evaluate_and_compute_advantages``."""

    advantages: list[list[float] | float | None] = Field(
        description="per sample: one value per response token, one float (broadcast), or null (no override)"
    )
    scores: list[float] = Field(description="the reward of each sample")
    metrics: dict[str, float] = Field(description="environment metrics, e.g. mean_reward, accuracy")


class RegisterInferenceEndpointRequest(BaseModel):
    """``POST /register_inference_endpoint`` body."""

    model_config = ConfigDict(strict=True)

    base_url: str = Field(
        pattern=r"^https?://", description="OpenAI-compatible base URL (http or https), e.g. http://host:port/v1"
    )
    model: str = Field(min_length=1, description="served model name")
    api_key: str | None = Field(None, description="key for that server, if it needs one")


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    """Every error answer."""

    error: ErrorDetail


class _SmallFields(BaseModel):
    """Strict validation of everything but the token ids (which numpy checks)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    prompts: list[str] = Field(min_length=1)
    responses: list[str]
    metadata: dict[str, Any] | None = None
    group_ids: list[StrictStr | GroupIdInt] | None = None
    ground_truths: list[str | None] | None = None
    response_lengths: list[TokenId] | None = None


_PER_SAMPLE_FIELDS = ("responses", "group_ids", "ground_truths", "response_lengths")


def _validation_message(exc: ValidationError) -> tuple[str, str]:
    """(field, message) of a pydantic error: ``responses[3]: Input should be a valid string (got int)``."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    location = [str(part) for part in first["loc"]]
    field = location[0] if location else "body"
    where = field + "".join(f"[{part}]" if part.isdigit() else f".{part}" for part in location[1:])
    message = f"{where}: {first['msg']} (got {type(first.get('input')).__name__})"
    if len(errors) > 1:
        message += f"; and {len(errors) - 1} more error(s)"
    return field, message


def _token_array(item: Any, index: int) -> np.ndarray:
    """One sample's token ids as int32 [T], type and range checked without a Python loop."""
    try:
        return wire.token_id_array(item)
    except ValueError as exc:
        raise ContractError(f"response_token_ids[{index}]: {exc}", "response_token_ids") from exc


def parse_evaluation_request(body: Any, max_total_tokens: int = DEFAULT_MAX_TOTAL_TOKENS) -> EvaluationRequest:
    """A decoded body -> :class:`EvaluationRequest`, or :class:`ContractError` naming field and sizes."""
    if not isinstance(body, Mapping):
        raise ContractError(f"body: expected an object with prompts and responses, got {type(body).__name__}", "body")
    small = {key: body[key] for key in _SmallFields.model_fields if key in body}
    for key in ("group_ids", "response_lengths"):  # msgpack clients may send int arrays
        value = small.get(key)
        if isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind in "iu":
            small[key] = value.tolist()
    try:
        fields = _SmallFields.model_validate(small)
    except ValidationError as exc:
        field, message = _validation_message(exc)
        raise ContractError(message, field) from exc
    batch_size = len(fields.prompts)
    for name in _PER_SAMPLE_FIELDS:
        values = getattr(fields, name)
        if values is not None and len(values) != batch_size:
            raise ContractError(
                f"{name} has {len(values)} items but prompts has {batch_size} (one per sample)", name
            )

    token_ids = body.get("response_token_ids")
    lengths_B: np.ndarray | None = None
    ids_B: list[np.ndarray] | None = None
    if token_ids is not None:
        if not isinstance(token_ids, list):
            raise ContractError(
                f"response_token_ids: expected a list of {batch_size} lists of int, got {type(token_ids).__name__}",
                "response_token_ids",
            )
        if len(token_ids) != batch_size:
            raise ContractError(
                f"response_token_ids has {len(token_ids)} items but prompts has {batch_size} (one per sample)",
                "response_token_ids",
            )
        ids_B = [_token_array(item, index) for index, item in enumerate(token_ids)]
        lengths_B = np.fromiter((ids.size for ids in ids_B), dtype=np.int64, count=batch_size)
        if fields.response_lengths is not None:
            sent_B = np.asarray(fields.response_lengths, dtype=np.int64)
            mismatch = np.flatnonzero(sent_B != lengths_B)
            if mismatch.size:
                index = int(mismatch[0])
                raise ContractError(
                    f"response_lengths[{index}] is {int(sent_B[index])} but response_token_ids[{index}] has "
                    f"{int(lengths_B[index])} tokens",
                    "response_lengths",
                )
    elif fields.response_lengths is not None:
        lengths_B = np.asarray(fields.response_lengths, dtype=np.int64)
    if lengths_B is not None and int(lengths_B.sum()) > max_total_tokens:
        raise ContractError(
            f"the responses have {int(lengths_B.sum())} tokens in all, over this service's limit of "
            f"{max_total_tokens} per request (send fewer samples per request)",
            "response_lengths" if token_ids is None else "response_token_ids",
        )
    return EvaluationRequest(
        prompts=fields.prompts,
        responses=fields.responses,
        group_ids=list(fields.group_ids) if fields.group_ids is not None else list(fields.prompts),
        ground_truths=list(fields.ground_truths) if fields.ground_truths is not None else [None] * batch_size,
        metadata=dict(fields.metadata or {}),
        response_token_ids=ids_B,
        response_lengths_B=lengths_B,
    )


# --------------------------------------------------------------------------------------------
# Bodies and encodings
# --------------------------------------------------------------------------------------------


def gunzip_limited(body: bytes, limit: int) -> bytes:
    """Decompress a gzip body, refusing (413) to inflate past ``limit`` bytes (a gzip bomb is tiny)."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise ServiceError(400, "malformed_body", f"body is not valid gzip: {exc}") from exc
    if len(data) > limit:
        raise ServiceError(413, "payload_too_large", f"body inflates past this service's limit of {limit} bytes")
    if not inflater.eof:
        raise ServiceError(400, "malformed_body", "body is not valid gzip: truncated stream")
    return data


def decode_body(body: bytes, content_type: str | None, content_encoding: str | None, limit: int) -> Any:
    """Bytes -> Python objects: msgpack when the Content-Type says so, JSON otherwise; gzip undone."""
    encoding = (content_encoding or "").strip().lower()
    if encoding == wire.GZIP:
        body = gunzip_limited(body, limit)
    elif encoding not in ("", "identity"):
        raise ServiceError(400, "malformed_body", f"unsupported Content-Encoding {encoding!r}; supported: gzip, identity")
    media = wire.MSGPACK if wire.media_type(content_type) == wire.MSGPACK else wire.JSON
    if not body:
        raise ServiceError(400, "malformed_body", f"empty body; expected {media}")
    try:
        return wire.decode(body, media)
    except wire.WireError as exc:
        raise ServiceError(400, "malformed_body", str(exc)) from exc
    except RecursionError as exc:  # absurdly nested arrays
        raise ServiceError(400, "malformed_body", "body is nested too deeply") from exc


def _accepts_gzip(accept_encoding: str | None) -> bool:
    return wire.header_lists(accept_encoding, "gzip")


@dataclasses.dataclass
class _Encoded:
    body: bytes
    media_type: str
    headers: dict[str, str]


def encode_answer(payload: Mapping[str, Any], accept: str | None, accept_encoding: str | None) -> _Encoded:
    """msgpack when Accept lists it; else JSON, gzip'ed when large and the client accepts gzip."""
    if wire.accepts_msgpack(accept):
        return _Encoded(wire.encode(payload, wire.MSGPACK), wire.MSGPACK, {"Vary": "Accept, Accept-Encoding"})
    body = wire.encode(payload, wire.JSON)
    headers = {"Vary": "Accept, Accept-Encoding"}
    if len(body) >= GZIP_MIN_BYTES and _accepts_gzip(accept_encoding):
        body = gzip.compress(body, compresslevel=1)  # level 1: most of the gain at a fraction of the time
        headers["Content-Encoding"] = wire.GZIP
    return _Encoded(body, wire.JSON, headers)


class _ClientGone(Exception):
    """The client disconnected before its answer was ready (while sending its body, or waiting)."""


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refused with 413 as soon as it (or its declared length) passes ``limit``."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ServiceError(
            413, "payload_too_large", f"body of {int(declared)} bytes is over this service's limit of {limit} bytes"
        )
    chunks = bytearray()
    try:
        async for chunk in request.stream():
            chunks += chunk
            if len(chunks) > limit:
                raise ServiceError(413, "payload_too_large", f"body is over this service's limit of {limit} bytes")
    except ClientDisconnect as exc:  # an ordinary client timeout mid-upload, not the service's failure
        raise _ClientGone from exc
    return bytes(chunks)


# --------------------------------------------------------------------------------------------
# Runners: where evaluations execute
# --------------------------------------------------------------------------------------------


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
            raise ServiceError(503, "shutting_down", "the service is shutting down", {"Retry-After": _RETRY_AFTER_S}) from exc
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
            raise ServiceError(503, "shutting_down", "the service is shutting down", {"Retry-After": _RETRY_AFTER_S})
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


# --------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------


class ServiceState:
    """Counters and readiness, read by /health. Only the event loop's thread writes the counters."""

    def __init__(self) -> None:
        self.started_at = time.monotonic()
        self.ready = False
        self.setup_error: str | None = None
        self.requests_served = 0
        self.requests_abandoned = 0
        self.samples_scored = 0
        self.pending = 0
        self.errors_by_status: Counter[int] = Counter()
        self.inference_endpoint: InferenceEndpoint | None = None

    def count_status(self, status: int) -> None:
        if status >= 400 and status != _CLIENT_GONE_STATUS:  # abandoned requests have their own counter
            self.errors_by_status[status] += 1


async def _unless_client_leaves(request: Request, job: asyncio.Future, poll_s: float = 0.2) -> Any:
    """The job's result; if the client disconnects first, the job is cancelled (one still queued
    never runs; one already running finishes unseen) and _ClientGone is raised."""
    while True:
        done, _ = await asyncio.wait({job}, timeout=poll_s)
        if done:
            return job.result()
        if await request.is_disconnected():
            job.cancel()
            raise _ClientGone


class _GuardMiddleware:
    """Pure ASGI: API-key check (all paths but /health) and error counting, without touching bodies."""

    def __init__(self, app: ASGIApp, state: ServiceState, api_key: str | None) -> None:
        self.app = app
        self.state = state
        self.api_key = api_key or None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            # /health answering 503 while starting is not a client's error
            if message["type"] == "http.response.start" and scope["path"] != "/health":
                self.state.count_status(message["status"])
            await send(message)

        if self.api_key is not None and scope["path"] != "/health":
            reason = bearer_refusal(authorization_header(scope), self.api_key)
            if reason is not None:
                response = error_response(
                    401,
                    "unauthorized",
                    f"this service needs 'Authorization: Bearer <key>'; the request's key is {reason}",
                    CHALLENGE_HEADERS,
                )
                await response(scope, receive, counting_send)
                return
        await self.app(scope, receive, counting_send)


def _error_for(exc: BaseException) -> Response:
    if isinstance(exc, ServiceError):
        return error_response(exc.status, exc.code, exc.message, exc.headers)
    if isinstance(exc, ContractError):
        return error_response(422, exc.code, exc.message)
    logger.exception("evaluation failed", exc_info=exc)
    return error_response(500, "internal_error", f"the environment failed: {type(exc).__name__}: {exc}")


def create_app(
    environment: Environment, settings: ServiceSettings | None = None, runner: Runner | None = None
) -> FastAPI:
    """The service app for one environment. ``environment.setup()`` runs on the runner at startup;
    until it returns, /health and evaluations answer 503."""
    settings = settings or ServiceSettings()
    runner = runner or ThreadRunner(environment.max_concurrent_evaluations)
    state = ServiceState()

    def run_setup() -> None:
        try:
            environment.setup()
        except Exception as exc:
            logger.exception("environment %r failed to set up", environment.name)
            state.setup_error = f"{type(exc).__name__}: {exc}"
            raise
        state.ready = True
        logger.info("environment %r ready", environment.name)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        async def setup_in_background() -> None:
            with contextlib.suppress(Exception):
                await runner.run(run_setup)

        task = asyncio.ensure_future(setup_in_background())
        yield
        task.cancel()
        runner.close()
        environment.close()

    app = FastAPI(
        title=f"{environment.name} environment service",
        description="Scores responses and computes GRPO advantages; see PROTOCOL.md.",
        lifespan=lifespan,
    )
    app.state.service = state
    app.state.environment = environment
    app.state.settings = settings
    app.add_middleware(_GuardMiddleware, state=state, api_key=settings.api_key)

    @app.exception_handler(RequestValidationError)
    async def _on_validation_error(request: Request, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
        where = ".".join(str(part) for part in first.get("loc", ()))
        return error_response(422, "invalid_request", f"{where}: {first.get('msg')}")

    @app.exception_handler(StarletteHTTPException)
    async def _on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
        codes = {404: "not_found", 405: "method_not_allowed"}
        return error_response(
            exc.status_code, codes.get(exc.status_code, "http_error"), f"{request.method} {request.url.path}: {exc.detail}",
            getattr(exc, "headers", None),
        )

    @app.exception_handler(_ClientGone)
    async def _on_client_gone(request: Request, exc: _ClientGone) -> Response:
        state.requests_abandoned += 1
        return Response(status_code=_CLIENT_GONE_STATUS)

    @app.exception_handler(ServiceError)
    async def _on_service_error(request: Request, exc: ServiceError) -> Response:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    error_responses: dict[int | str, dict[str, Any]] = {
        status: {"model": ErrorResponse, "description": description}
        for status, description in (
            (400, "malformed body"),
            (401, "missing or wrong API key"),
            (413, "body over the limit"),
            (422, "contract breach"),
            (503, "starting or overloaded"),
        )
    }

    def not_ready_error() -> ServiceError:
        if state.setup_error:
            return ServiceError(503, "setup_failed", f"environment {environment.name!r} failed to set up: {state.setup_error}")
        return ServiceError(503, "starting", f"environment {environment.name!r} is starting", {"Retry-After": _RETRY_AFTER_S})

    @app.get("/health", responses={503: {"model": ErrorResponse, "description": "starting"}})
    async def health(request: Request) -> Response:
        """200 with ``status: ok`` while the service can evaluate, with its counters and options."""
        info: dict[str, Any] = {
            "status": "ok" if state.ready else ("failed" if state.setup_error else "starting"),
            "env": environment.name,
            "encodings": list(wire.SUPPORTED_CONTENT_TYPES),
            "requests_served": state.requests_served,
            "requests_abandoned": state.requests_abandoned,
            "samples_scored": state.samples_scored,
            "errors": sum(state.errors_by_status.values()),
            "errors_by_status": {str(status): count for status, count in sorted(state.errors_by_status.items())},
            "pending": state.pending,
            "uptime_s": round(time.monotonic() - state.started_at, 3),
            "auth_required": settings.api_key is not None,
            "limits": {
                "max_body_bytes": settings.max_body_bytes,
                "max_pending": settings.max_pending,
                "max_total_tokens": settings.max_total_tokens,
            },
            "inference_endpoint": state.inference_endpoint.public() if state.inference_endpoint else None,
            **environment.describe(),
        }
        if settings.slurm:
            info["slurm"] = slurm_info()
        if not state.ready:
            error = not_ready_error()
            info["error"] = {"code": error.code, "message": error.message}
            return Response(wire.encode(info), status_code=503, media_type=wire.JSON, headers=error.headers)
        encoded = encode_answer(info, request.headers.get("accept"), None)
        return Response(encoded.body, media_type=encoded.media_type, headers=encoded.headers)

    request_schema = evaluate_request_model(environment.required_request_fields()).model_json_schema()

    def evaluate_job(body: bytes, headers: Mapping[str, str]) -> tuple[_Encoded, int]:
        decoded = decode_body(body, headers.get("content-type"), headers.get("content-encoding"), settings.max_body_bytes)
        evaluation = parse_evaluation_request(decoded, settings.max_total_tokens)
        result = environment.evaluate(evaluation)
        encoded = encode_answer(result.to_payload(), headers.get("accept"), headers.get("accept-encoding"))
        return encoded, evaluation.batch_size

    @app.post(
        "/evaluate_and_compute_advantages",
        response_class=Response,
        responses={200: {"model": EvaluateResponse, "content": {wire.MSGPACK: {}}}, **error_responses},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {media: {"schema": request_schema} for media in wire.SUPPORTED_CONTENT_TYPES},
            }
        },
    )
    async def evaluate_and_compute_advantages(request: Request) -> Response:
        """Score B responses and compute their advantages (see PROTOCOL.md)."""
        if not state.ready:
            raise not_ready_error()
        if state.pending >= settings.max_pending:
            raise ServiceError(
                503,
                "overloaded",
                f"{state.pending} evaluations are already waiting (max_pending={settings.max_pending}); retry later",
                {"Retry-After": _RETRY_AFTER_S},
            )
        state.pending += 1
        try:
            body = await read_body(request, settings.max_body_bytes)
            job = asyncio.ensure_future(runner.run(evaluate_job, body, dict(request.headers)))
            encoded, batch_size = await _unless_client_leaves(request, job)
        except _ClientGone:
            state.requests_abandoned += 1
            return Response(status_code=_CLIENT_GONE_STATUS)
        except Exception as exc:  # noqa: BLE001 - every failure becomes the protocol's error shape
            return _error_for(exc)
        finally:
            state.pending -= 1
        state.requests_served += 1
        state.samples_scored += batch_size
        return Response(encoded.body, media_type=encoded.media_type, headers=encoded.headers)

    @app.post(
        "/register_inference_endpoint",
        response_class=Response,
        responses=error_responses,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {wire.JSON: {"schema": RegisterInferenceEndpointRequest.model_json_schema()}},
            }
        },
    )
    async def register_inference_endpoint(request: Request) -> Response:
        """Store an OpenAI-compatible endpoint for the environment; /health reports it (never its key)."""
        body = await read_body(request, settings.max_body_bytes)
        decoded = decode_body(body, request.headers.get("content-type"), request.headers.get("content-encoding"), settings.max_body_bytes)
        if not isinstance(decoded, Mapping):
            raise ServiceError(422, "invalid_request", f"body: expected an object with base_url and model, got {type(decoded).__name__}")
        try:
            fields = RegisterInferenceEndpointRequest.model_validate(dict(decoded))
        except ValidationError as exc:
            _, message = _validation_message(exc)
            raise ServiceError(422, "invalid_request", message) from exc
        endpoint = InferenceEndpoint(fields.base_url, fields.model, fields.api_key)
        environment.set_inference_endpoint(endpoint)
        state.inference_endpoint = endpoint
        logger.info("inference endpoint registered: %s (%s)", endpoint.base_url, endpoint.model)
        encoded = encode_answer({"registered": True, **endpoint.public()}, request.headers.get("accept"), None)
        return Response(encoded.body, media_type=encoded.media_type, headers=encoded.headers)

    return app


def slurm_info() -> dict[str, str | None]:
    """Where this job runs, from SLURM's environment (for trainers on other nodes to find the service)."""
    return {
        "job_id": os.environ.get("SLURM_JOB_ID"),
        "node": os.environ.get("SLURMD_NODENAME"),
        "nodelist": os.environ.get("SLURM_JOB_NODELIST"),
    }


# --------------------------------------------------------------------------------------------
# Command line: `python <env>_server.py serve [--slurm false] [--host ...] [--env.<option> ...]`
# --------------------------------------------------------------------------------------------


def parse_bool(text: str | bool) -> bool:
    """``true/false``, ``1/0``, ``yes/no``, ``on/off`` (Atropos' CLI spells booleans this way)."""
    if isinstance(text, bool):
        return text
    value = text.strip().lower()
    if value in ("true", "1", "yes", "on", "t", "y"):
        return True
    if value in ("false", "0", "no", "off", "f", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port in [0, 65535], got {text!r}")
    return value


def _env_option_help(field: Any) -> tuple[str, dict[str, Any]]:
    """Help text and argparse options of one environment config field."""
    annotation = field.annotation
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    extra: dict[str, Any] = {}
    default = field.default
    if annotation is bool:
        extra["metavar"] = "{true,false}"
    elif origin is typing.Literal:
        extra["choices"] = [str(arg) for arg in args]
    elif annotation in (int, float):
        extra["metavar"] = annotation.__name__.upper()
    else:
        extra["metavar"] = "VALUE"
    default_text = "none" if default is None else (str(default).lower() if isinstance(default, bool) else str(default))
    return f"{field.description or ''} (default: {default_text})", extra


def build_parser(environment_cls: type[Environment], prog: str | None = None) -> argparse.ArgumentParser:
    """The CLI of an environment service: ``serve`` with the service options and ``--env.*``."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=f"Environment service for {environment_cls.name!r} (see PROTOCOL.md). "
        f"Commands follow Atropos' environment conventions: serve, --slurm, --env.*.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{serve}")
    serve_parser = commands.add_parser(
        "serve",
        help="serve /health, /evaluate_and_compute_advantages and /register_inference_endpoint over HTTP",
        description=f"Serve the {environment_cls.name!r} environment over HTTP.",
    )
    service = serve_parser.add_argument_group("service options")
    service.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help="address to bind (default: %(default)s, loopback only; binding another address exposes the service "
        "to the network: set an API key)",
    )
    service.add_argument("--port", type=_port, default=DEFAULT_PORT, help="TCP port (default: %(default)s)")
    service.add_argument(
        "--api-key",
        default=None,
        help=f"when set, every endpoint but /health needs 'Authorization: Bearer <key>' (default: ${API_KEY_ENV}, "
        "else none; prefer the environment variable, command lines are visible to other users)",
    )
    service.add_argument(
        "--max-body-bytes",
        type=_positive_int,
        default=DEFAULT_MAX_BODY_BYTES,
        help="largest request body accepted, before and after gzip; larger ones get 413 (default: %(default)s)",
    )
    service.add_argument(
        "--max-pending",
        type=_positive_int,
        default=DEFAULT_MAX_PENDING,
        help="evaluations waiting or running at once; more get 503 with Retry-After (default: %(default)s)",
    )
    service.add_argument(
        "--max-total-tokens",
        type=_positive_int,
        default=DEFAULT_MAX_TOTAL_TOKENS,
        help="most response tokens per request (sum of lengths); more get 422 (default: %(default)s)",
    )
    service.add_argument(
        "--slurm",
        type=parse_bool,
        nargs="?",
        const=True,
        default=False,
        metavar="{true,false}",
        help="running as a SLURM job: /health reports the job id and node (SLURM_JOB_ID, SLURMD_NODENAME); "
        "the bind address stays --host (default: false)",
    )
    service.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="log level; debug also logs every request (default: %(default)s)",
    )
    env_group = serve_parser.add_argument_group(
        f"environment options ({environment_cls.name})", "Atropos-style namespaced options: --env.<name> <value>"
    )
    for name, field in environment_cls.Config.model_fields.items():
        help_text, extra = _env_option_help(field)
        env_group.add_argument(f"--env.{name}", dest=f"env.{name}", default=argparse.SUPPRESS, help=help_text, **extra)
    parser.epilog = "serve options:\n" + serve_parser.format_help()
    parser.serve_parser = serve_parser  # type: ignore[attr-defined] - for errors in serve's own usage
    return parser


def parse_command_line(
    environment_cls: type[Environment], argv: Sequence[str] | None = None, prog: str | None = None
) -> tuple[ServiceSettings, Any]:
    """argv -> (service settings, environment config); exits with usage on bad options (as argparse does)."""
    parser = build_parser(environment_cls, prog)
    args = parser.parse_args(argv)
    env_values = {
        key.split(".", 1)[1]: (None if value.strip().lower() in ("none", "null") else value)
        for key, value in vars(args).items()
        if key.startswith("env.")
    }
    try:
        env_config = environment_cls.Config.model_validate(env_values)
    except ValidationError as exc:
        problems = "; ".join(
            f"--env.{'.'.join(str(p) for p in error['loc'])}: {error['msg']}" if error["loc"] else error["msg"]
            for error in exc.errors(include_url=False)
        )
        parser.serve_parser.error(problems)
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    settings = ServiceSettings(
        host=args.host,
        port=args.port,
        api_key=api_key,
        max_body_bytes=args.max_body_bytes,
        max_pending=args.max_pending,
        max_total_tokens=args.max_total_tokens,
        slurm=args.slurm,
        log_level=args.log_level,
    )
    return settings, env_config


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(environment: Environment, settings: ServiceSettings) -> int:
    """Run the service until SIGTERM/SIGINT: uvicorn in a thread, evaluations on this (main) thread.

    Returns the process exit code: 0 after a clean stop, 1 when the environment failed to set up
    or the server could not start (e.g. the port is taken).
    """
    if not _is_loopback(settings.host):
        logger.warning(
            "binding %s: the service is reachable from the network%s",
            settings.host,
            "" if settings.api_key else " and has no API key (set --api-key or $" + API_KEY_ENV + ")",
        )
    elif settings.slurm:
        logger.warning("--slurm true with --host %s: trainers on other nodes cannot reach this service", settings.host)
    import uvicorn

    concurrent_jobs = environment.max_concurrent_evaluations
    runner = MainThreadRunner() if concurrent_jobs == 1 else ThreadRunner(concurrent_jobs)
    app = create_app(environment, settings, runner)
    state: ServiceState = app.state.service
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.log_level == "debug",
        timeout_graceful_shutdown=10,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        if stop.is_set():  # second signal: stop now
            raise KeyboardInterrupt
        logger.info("signal %d: finishing the current evaluation, then stopping", signum)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    thread.start()
    try:
        runner.run_forever(lambda: not stop.is_set() and thread.is_alive() and state.setup_error is None)
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        environment.close()  # also when uvicorn never ran its shutdown (it did not start, or hung)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if state.setup_error is not None:
        logger.error("environment %r failed to set up: %s", environment.name, state.setup_error)
        return 1
    if not server.started:
        logger.error("the server did not start on %s:%d", settings.host, settings.port)
        return 1
    return 0


def main(environment_cls: type[Environment], argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """CLI entry point of an environment service (what ``<env>_server.py`` calls)."""
    settings, env_config = parse_command_line(environment_cls, argv, prog)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    environment = environment_cls(env_config)
    logger.info(
        "serving %r on http://%s:%d (options: %s)",
        environment.name,
        settings.host,
        settings.port,
        env_config.model_dump(mode="json"),
    )
    return serve(environment, settings)
