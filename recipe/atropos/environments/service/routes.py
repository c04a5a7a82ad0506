"""The service's endpoints, as module-level handlers over the one :class:`ServiceState` of the app.

An evaluation whose client disconnects (it timed out, and will retry) before its turn comes is
dropped, not run: retries do not pile up behind a slow environment; one that disconnects while
sending its body is counted the same way (``requests_abandoned``), never as a 500.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import ValidationError

from recipe.atropos import protocol, wire
from recipe.atropos.datatypes import InferenceEndpoint
from recipe.atropos.errors import ContractError
from recipe.atropos.environments.service.bodies import (
    CLIENT_GONE_STATUS,
    ClientGone,
    Encoded,
    ServiceError,
    decode_body,
    encode_answer,
    error_response,
    read_body,
)
from recipe.atropos.environments.service.state import ServiceState

logger = logging.getLogger("verl.recipe.atropos.service")

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": protocol.ErrorResponse, "description": description}
    for status, description in (
        (400, "malformed body"),
        (401, "missing or wrong API key"),
        (413, "body over the limit"),
        (422, "contract breach"),
        (503, "starting or overloaded"),
    )
}


def _state(request: Request) -> ServiceState:
    return request.app.state.service


async def health(request: Request) -> Response:
    """200 with ``status: ok`` while the service can evaluate, with its counters and options."""
    state = _state(request)
    info = state.health()
    if not state.ready:
        headers = state.not_ready_error().headers
        return Response(wire.encode(info), status_code=503, media_type=wire.JSON, headers=headers)
    return encode_answer(info, request.headers.get("accept"), None).response()


def _evaluate_job(state: ServiceState, body: bytes, headers: Mapping[str, str]) -> tuple[Encoded, int]:
    """On the runner: decode, check, evaluate, encode (the hot path, off the event loop)."""
    settings = state.settings
    decoded = decode_body(body, headers.get("content-type"), headers.get("content-encoding"), settings.max_body_bytes)
    evaluation = protocol.parse_evaluation_request(decoded, settings.max_total_tokens)
    answer = state.environment.evaluate(evaluation)
    encoded = encode_answer(dict(answer), headers.get("accept"), headers.get("accept-encoding"))
    return encoded, evaluation.batch_size


async def _unless_client_leaves(request: Request, job: asyncio.Future, poll_s: float = 0.2) -> Any:
    """The job's result; if the client disconnects first, the job is cancelled (one still queued
    never runs; one already running finishes unseen) and ClientGone is raised."""
    while True:
        done, _ = await asyncio.wait({job}, timeout=poll_s)
        if done:
            return job.result()
        if await request.is_disconnected():
            job.cancel()
            raise ClientGone


def error_for(exc: BaseException) -> Response:
    """Any failure of an evaluation as the protocol's error shape (500 for the environment's own)."""
    if isinstance(exc, ServiceError):
        return error_response(exc.status, exc.code, exc.message, exc.headers)
    if isinstance(exc, ContractError):
        return error_response(422, exc.code, exc.message)
    logger.exception("evaluation failed", exc_info=exc)
    return error_response(500, "internal_error", f"the environment failed: {type(exc).__name__}: {exc}")


async def evaluate_and_compute_advantages(request: Request) -> Response:
    """Score B responses and compute their advantages (see docs/PROTOCOL.md)."""
    state = _state(request)
    if not state.ready:
        raise state.not_ready_error()
    overloaded = state.overloaded_error()
    if overloaded is not None:
        raise overloaded
    state.pending += 1
    try:
        body = await read_body(request, state.settings.max_body_bytes)
        job = asyncio.ensure_future(state.runner.run(_evaluate_job, state, body, dict(request.headers)))
        encoded, batch_size = await _unless_client_leaves(request, job)
    except ClientGone:
        state.requests_abandoned += 1
        return Response(status_code=CLIENT_GONE_STATUS)
    except Exception as exc:  # noqa: BLE001 - every failure becomes the protocol's error shape
        return error_for(exc)
    finally:
        state.pending -= 1
    state.requests_served += 1
    state.samples_scored += batch_size
    return encoded.response()


async def register_inference_endpoint(request: Request) -> Response:
    """Store an OpenAI-compatible endpoint for the environment; /health reports it (never its key)."""
    state = _state(request)
    limit = state.settings.max_body_bytes
    body = await read_body(request, limit)
    decoded = decode_body(body, request.headers.get("content-type"), request.headers.get("content-encoding"), limit)
    if not isinstance(decoded, Mapping):
        raise ServiceError(422, "invalid_request", f"body: expected an object with base_url and model, got {type(decoded).__name__}")
    try:
        fields = protocol.RegisterInferenceEndpointRequest.model_validate(dict(decoded))
    except ValidationError as exc:
        _, message = protocol.validation_message(exc)
        raise ServiceError(422, "invalid_request", message) from exc
    endpoint = InferenceEndpoint(fields.base_url, fields.model, fields.api_key)
    state.environment.set_inference_endpoint(endpoint)
    state.inference_endpoint = endpoint
    logger.info("inference endpoint registered: %s (%s)", endpoint.base_url, endpoint.model)
    return encode_answer({"registered": True, **endpoint.public()}, request.headers.get("accept"), None).response()


def _request_body(schema: dict[str, Any], media_types: tuple[str, ...]) -> dict[str, Any]:
    """OpenAPI ``requestBody`` of a handler that reads its body itself (so FastAPI does not)."""
    return {"requestBody": {"required": True, "content": {media: {"schema": schema} for media in media_types}}}


def add_routes(app: FastAPI, state: ServiceState) -> None:
    """The three endpoints; the request schema is the one of this environment's required fields."""
    request_model = protocol.evaluate_request_model(state.environment.required_request_fields())
    app.add_api_route(
        protocol.HEALTH_PATH, health, methods=["GET"],
        responses={503: {"model": protocol.ErrorResponse, "description": "starting"}},
    )
    app.add_api_route(
        protocol.EVALUATE_PATH, evaluate_and_compute_advantages, methods=["POST"], response_class=Response,
        responses={200: {"model": protocol.EvaluateResponse, "content": {wire.MSGPACK: {}}}, **ERROR_RESPONSES},
        openapi_extra=_request_body(request_model.model_json_schema(), wire.SUPPORTED_CONTENT_TYPES),
    )
    app.add_api_route(
        protocol.REGISTER_PATH, register_inference_endpoint, methods=["POST"], response_class=Response,
        responses=ERROR_RESPONSES,
        openapi_extra=_request_body(protocol.RegisterInferenceEndpointRequest.model_json_schema(), (wire.JSON,)),
    )
