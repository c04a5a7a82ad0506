"""Command line of an environment service: ``python <env>_server.py serve [--slurm false] [--host ...] [--env.<option> ...]``.

Commands follow Atropos' environment conventions (``serve``, ``--slurm``, ``--env.*``). Under
``serve``, uvicorn runs in a second thread and environments that run one evaluation at a time run
them on the main thread, where signal-based timeouts work.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import threading
import typing
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from recipe.atropos.environments.base import Environment
from recipe.atropos.environments.service.app import create_app
from recipe.atropos.environments.service.runners import MainThreadRunner, ThreadRunner
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

logger = logging.getLogger("verl.recipe.atropos.service")


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
        description=f"Environment service for {environment_cls.name!r} (see docs/PROTOCOL.md). "
        f"Commands follow Atropos' environment conventions: serve, --slurm, --env.*.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{serve}")
    serve_parser = commands.add_parser(
        "serve",
        help="serve /health, /evaluate_and_compute_advantages and /register_inference_endpoint over HTTP",
        description=f"Serve the {environment_cls.name!r} environment over HTTP.",
    )
    _add_service_options(serve_parser.add_argument_group("service options"))
    env_group = serve_parser.add_argument_group(
        f"environment options ({environment_cls.name})", "Atropos-style namespaced options: --env.<name> <value>"
    )
    for name, field in environment_cls.Config.model_fields.items():
        help_text, extra = _env_option_help(field)
        env_group.add_argument(f"--env.{name}", dest=f"env.{name}", default=argparse.SUPPRESS, help=help_text, **extra)
    parser.epilog = "serve options:\n" + serve_parser.format_help()
    parser.serve_parser = serve_parser  # type: ignore[attr-defined] - for errors in serve's own usage
    return parser


def _add_service_options(service: argparse._ArgumentGroup) -> None:
    """``serve``'s options of the service itself (ServiceSettings)."""
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


def _warn_about_reach(settings: ServiceSettings) -> None:
    """Say when the bind address exposes the service, or hides it from the trainers that need it."""
    if not _is_loopback(settings.host):
        logger.warning(
            "binding %s: the service is reachable from the network%s",
            settings.host,
            "" if settings.api_key else " and has no API key (set --api-key or $" + API_KEY_ENV + ")",
        )
    elif settings.slurm:
        logger.warning("--slurm true with --host %s: trainers on other nodes cannot reach this service", settings.host)


def serve(environment: Environment, settings: ServiceSettings) -> int:
    """Run the service until SIGTERM/SIGINT: uvicorn in a thread, evaluations on this (main) thread.

    Returns the process exit code: 0 after a clean stop, 1 when the environment failed to set up
    or the server could not start (e.g. the port is taken).
    """
    _warn_about_reach(settings)
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
