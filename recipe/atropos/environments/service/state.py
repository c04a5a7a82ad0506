"""The service's settings and its state: one object the handlers share (``app.state.service``)."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections import Counter
from typing import Any

from recipe.atropos import wire
from recipe.atropos.datatypes import InferenceEndpoint
from recipe.atropos.environments.base import Environment
from recipe.atropos.environments.service.bodies import CLIENT_GONE_STATUS, RETRY_AFTER_S, ServiceError
from recipe.atropos.environments.service.runners import Runner

logger = logging.getLogger("verl.recipe.atropos.service")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9001
API_KEY_ENV = "ATROPOS_ENV_API_KEY"
DEFAULT_MAX_BODY_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_PENDING = 64
DEFAULT_MAX_TOTAL_TOKENS = 32 * 1024 * 1024


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


def slurm_info() -> dict[str, str | None]:
    """Where this job runs, from SLURM's environment (for trainers on other nodes to find the service)."""
    return {
        "job_id": os.environ.get("SLURM_JOB_ID"),
        "node": os.environ.get("SLURMD_NODENAME"),
        "nodelist": os.environ.get("SLURM_JOB_NODELIST"),
    }


class ServiceState:
    """The environment, the settings, the runner, readiness and counters (read by /health).

    Only the event loop's thread writes the counters.
    """

    def __init__(self, environment: Environment, settings: ServiceSettings, runner: Runner) -> None:
        self.environment = environment
        self.settings = settings
        self.runner = runner
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
        if status >= 400 and status != CLIENT_GONE_STATUS:  # abandoned requests have their own counter
            self.errors_by_status[status] += 1

    def run_setup(self) -> None:
        """``environment.setup()`` (on the runner, at startup); the service is ready when it returns."""
        try:
            self.environment.setup()
        except Exception as exc:
            logger.exception("environment %r failed to set up", self.environment.name)
            self.setup_error = f"{type(exc).__name__}: {exc}"
            raise
        self.ready = True
        logger.info("environment %r ready", self.environment.name)

    def not_ready_error(self) -> ServiceError:
        name = self.environment.name
        if self.setup_error:
            return ServiceError(503, "setup_failed", f"environment {name!r} failed to set up: {self.setup_error}")
        return ServiceError(503, "starting", f"environment {name!r} is starting", {"Retry-After": RETRY_AFTER_S})

    def overloaded_error(self) -> ServiceError | None:
        """503 when ``max_pending`` evaluations are already waiting, else None."""
        if self.pending < self.settings.max_pending:
            return None
        return ServiceError(
            503,
            "overloaded",
            f"{self.pending} evaluations are already waiting (max_pending={self.settings.max_pending}); retry later",
            {"Retry-After": RETRY_AFTER_S},
        )

    def health(self) -> dict[str, Any]:
        """The ``/health`` body: status, counters, limits and what the environment shows."""
        settings = self.settings
        info: dict[str, Any] = {
            "status": "ok" if self.ready else ("failed" if self.setup_error else "starting"),
            "env": self.environment.name,
            "encodings": list(wire.SUPPORTED_CONTENT_TYPES),
            "requests_served": self.requests_served,
            "requests_abandoned": self.requests_abandoned,
            "samples_scored": self.samples_scored,
            "errors": sum(self.errors_by_status.values()),
            "errors_by_status": {str(status): count for status, count in sorted(self.errors_by_status.items())},
            "pending": self.pending,
            "uptime_s": round(time.monotonic() - self.started_at, 3),
            "auth_required": settings.api_key is not None,
            "limits": {
                "max_body_bytes": settings.max_body_bytes,
                "max_pending": settings.max_pending,
                "max_total_tokens": settings.max_total_tokens,
            },
            "inference_endpoint": self.inference_endpoint.public() if self.inference_endpoint else None,
            **self.environment.describe(),
        }
        if settings.slurm:
            info["slurm"] = slurm_info()
        if not self.ready:
            error = self.not_ready_error()
            info["error"] = {"code": error.code, "message": error.message}
        return info
