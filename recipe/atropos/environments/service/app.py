"""The service app for one environment: state, guard (API key, error counts), error shapes, routes."""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from recipe.atropos.environments.base import Environment
from recipe.atropos.environments.service.bodies import CLIENT_GONE_STATUS, ClientGone, ServiceError, error_response
from recipe.atropos.environments.service.routes import add_routes
from recipe.atropos.environments.service.runners import Runner, ThreadRunner
from recipe.atropos.environments.service.state import ServiceSettings, ServiceState
from recipe.atropos.http_auth import CHALLENGE_HEADERS, authorization_header, bearer_refusal


class GuardMiddleware:
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


# ---- error shapes: every error is {"error": {"code", "message"}} ----------------------------


async def _on_validation_error(request: Request, exc: RequestValidationError) -> Response:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
    where = ".".join(str(part) for part in first.get("loc", ()))
    return error_response(422, "invalid_request", f"{where}: {first.get('msg')}")


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
    codes = {404: "not_found", 405: "method_not_allowed"}
    return error_response(
        exc.status_code, codes.get(exc.status_code, "http_error"), f"{request.method} {request.url.path}: {exc.detail}",
        getattr(exc, "headers", None),
    )


async def _on_client_gone(request: Request, exc: ClientGone) -> Response:
    request.app.state.service.requests_abandoned += 1
    return Response(status_code=CLIENT_GONE_STATUS)


async def _on_service_error(request: Request, exc: ServiceError) -> Response:
    return error_response(exc.status, exc.code, exc.message, exc.headers)


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI):
    """``environment.setup()`` on the runner in the background; at shutdown, close both."""
    state: ServiceState = app.state.service

    async def setup_in_background() -> None:
        with contextlib.suppress(Exception):
            await state.runner.run(state.run_setup)

    task = asyncio.ensure_future(setup_in_background())
    yield
    task.cancel()
    state.runner.close()
    state.environment.close()


def create_app(
    environment: Environment, settings: ServiceSettings | None = None, runner: Runner | None = None
) -> FastAPI:
    """The service app for one environment. ``environment.setup()`` runs on the runner at startup;
    until it returns, /health and evaluations answer 503."""
    settings = settings or ServiceSettings()
    runner = runner or ThreadRunner(environment.max_concurrent_evaluations)
    state = ServiceState(environment, settings, runner)
    app = FastAPI(
        title=f"{environment.name} environment service",
        description="Scores responses and computes GRPO advantages; see docs/PROTOCOL.md.",
        lifespan=_lifespan,
    )
    app.state.service = state
    app.state.environment = environment
    app.state.settings = settings
    app.add_middleware(GuardMiddleware, state=state, api_key=settings.api_key)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(ClientGone, _on_client_gone)
    app.add_exception_handler(ServiceError, _on_service_error)
    add_routes(app, state)
    return app
