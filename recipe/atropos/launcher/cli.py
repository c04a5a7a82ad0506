"""Command line of the launcher: options, logging, signals and exit codes."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from recipe.atropos.launcher.config import LauncherConfigError, load_launcher_config
from recipe.atropos.launcher.dry_run import format_plan
from recipe.atropos.launcher.health import LaunchError
from recipe.atropos.launcher.plan import build_plan

__all__ = ["main", "build_parser"]

logger = logging.getLogger("atropos.launcher")

EXIT_LAUNCH_FAILED = 1
EXIT_CONFIG = 2

DESCRIPTION = """\
Start an Atropos + verl run from one recipe config: the environment service and each of
launcher.environment_services (waits for their /health), optional OpenAI-compatible inference
workers (waits for them, registers each with every service), then the trainer (python -m
verl.trainer.main_ppo --config-path <dir of --config> --config-name <stem> OVERRIDES, pointed
at the service with trainer.atropos.api_url=...).
What to start comes from the config's `launcher:` section (config/launcher_defaults.yaml);
OVERRIDES apply to it too, e.g. launcher.environment.port=9002 launcher.inference.enabled=true.

With trainer.atropos.mode=trajectory it starts instead: atroposlib's run-api (waits for it), the
trainer (with trainer.atropos.trajectory_api_url=...), then, once the trainer's policy endpoint
answers (launcher.policy_endpoint), each of launcher.environments. No environment service.
"""

EPILOG = """\
supervision:
  the trainer's exit ends the run with its exit code; a dead environment service is restarted
  (launcher.environment.max_restarts in a row, backoff restart_backoff_s doubling); a dead
  inference worker ends the run. Trajectory mode: a dead environment is restarted
  (launcher.environments[i].max_restarts); a dead run-api ends the run. SIGINT/SIGTERM/SIGHUP or any
  error stops every process tree started (SIGTERM, launcher.shutdown_grace_s, SIGKILL).

files (run folder, default outputs/launch/<timestamp>/):
  <service>.log for environment, environment-<name>, inference-<i>, trainer (trajectory mode: run-api, trainer,
  env-<name>); launcher.log; services.json (pids, ports).

exit codes:
  the trainer's exit code; 1 launch failed (port in use, a service did not become healthy, an
  inference worker or run-api died, environment restarts exhausted); 2 bad config or override;
  128+N stopped by signal N (130 SIGINT, 143 SIGTERM).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launch_atropos_verl_services.py",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        required=True,
        type=Path,
        metavar="YAML",
        help="recipe config (e.g. recipe/atropos/config/gsm8k_grpo_example.yaml); its `launcher:` section "
        "says what to start, and the trainer gets it as --config-path/--config-name",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the plan (commands, ports, order) and exit; starts nothing"
    )
    parser.add_argument(
        "--console",
        action="store_true",
        help="also echo every service's output to stdout, each line prefixed with [service] "
        "(same as launcher.console=true)",
    )
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="run folder for logs and services.json (default: launcher.run_dir, else "
        "launcher.log_dir/<YYYYmmdd-HHMMSS>)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="the launcher's own log level on stderr (default: info)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="OVERRIDE",
        help="Hydra overrides (key=value, +key=value, ~key), applied to the launcher section and passed "
        "to the trainer",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s launcher %(levelname)s: %(message)s", stream=sys.stderr
    )
    try:
        cfg = load_launcher_config(args.config, args.overrides)
        plan = build_plan(cfg, args.config, args.overrides, run_dir=args.run_dir)
    except LauncherConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.dry_run:
        print(format_plan(plan))
        return 0

    from recipe.atropos.launcher.supervisor import Interrupted, Launcher

    launcher = Launcher(plan, console=args.console or cfg.console)
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, launcher.handle_signal) for sig in signals}
    try:
        return launcher.run()
    except Interrupted as exc:
        logger.info("%s received: stopped every service", exc)
        return 128 + exc.signum
    except (LaunchError, OSError) as exc:
        logger.error("%s", exc)
        return EXIT_LAUNCH_FAILED
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
