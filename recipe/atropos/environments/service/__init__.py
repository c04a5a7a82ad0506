"""The environment service: one FastAPI app hosting one :class:`Environment` (see docs/PROTOCOL.md).

Modules, one job each: ``bodies`` (limits, encodings, error shape), ``runners`` (where evaluations
run), ``state`` (settings and the one state object the handlers share), ``routes`` (the handlers),
``app`` (:func:`create_app`), ``cli`` (the command line, :func:`serve`, :func:`main`). The wire
models and the request checks are :mod:`recipe.atropos.protocol`, shared with the client.

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
lengths) are validated by the strict request model; token ids become numpy arrays whose dtype,
shape and range are checked at C speed; the answer is encoded without validation.

Threads: evaluations run on a runner, off the event loop, so ``/health`` stays responsive; up to
the environment's ``max_concurrent_evaluations`` at once (GSM8K: 4, its math-verify judging in a
process pool), so an unrelated request need not wait behind a slow one. An evaluation whose client
disconnects (it timed out, and will retry) before its turn comes is dropped, not run: retries do
not pile up behind a slow environment; one that disconnects while sending its body is counted the
same way (``requests_abandoned``), never as a 500. Environments that run one evaluation at a time
run them, under ``serve``, on the main thread (uvicorn runs in a second thread), where signal-based
timeouts work.
"""

from recipe.atropos.environments.service.app import create_app
from recipe.atropos.environments.service.bodies import ServiceError, decode_body, encode_answer, error_response
from recipe.atropos.environments.service.cli import build_parser, main, parse_bool, parse_command_line, serve
from recipe.atropos.environments.service.runners import MainThreadRunner, Runner, ThreadRunner
from recipe.atropos.environments.service.state import (
    API_KEY_ENV,
    DEFAULT_HOST,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_PENDING,
    DEFAULT_MAX_TOTAL_TOKENS,
    DEFAULT_PORT,
    ServiceSettings,
    ServiceState,
)

__all__ = [
    "API_KEY_ENV",
    "DEFAULT_HOST",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_PENDING",
    "DEFAULT_MAX_TOTAL_TOKENS",
    "DEFAULT_PORT",
    "MainThreadRunner",
    "Runner",
    "ServiceError",
    "ServiceSettings",
    "ServiceState",
    "ThreadRunner",
    "build_parser",
    "create_app",
    "decode_body",
    "encode_answer",
    "error_response",
    "main",
    "parse_bool",
    "parse_command_line",
    "serve",
]
