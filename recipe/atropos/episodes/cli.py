"""The command line every episode runner shares.

    python -m recipe.atropos.<type> --name NAME --spec-json JSON --policy-url URL --run-api URL --tokenizer DIR

The launcher starts one such process per entry `type: <type>` of `trainer.atropos.environments` in
trajectory mode (launcher/plan.py), with the gateway's key in ATROPOS_POLICY_API_KEY and run-api's in
ATROPOS_API_KEY when set. `runner_main` parses it, checks the spec (exit 2 with a message naming the
field), sets the process offline (HF_HUB_OFFLINE=1: tokenizers and environments load from local
files only) and runs the kind's coroutine.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence

from recipe.atropos.episodes.spec import EpisodeEnvSpec, EpisodeSpecError, load_spec

__all__ = ["RunnerArgs", "runner_main"]

POLICY_API_KEY_ENV = "ATROPOS_POLICY_API_KEY"
RUN_API_KEY_ENV = "ATROPOS_API_KEY"


@dataclasses.dataclass(frozen=True)
class RunnerArgs:
    """Where a runner's episodes go.

    name: the entry's name (run-api registration, metrics `atropos/env/<name>/...`).
    policy_url: the policy gateway's OpenAI base URL (`.../v1`).
    run_api_url: atroposlib's run-api.
    tokenizer: the policy's tokenizer folder (prompts are rendered with it, never fetched).
    policy_api_key / run_api_key: bearer keys, or None.
    """

    name: str
    policy_url: str
    run_api_url: str
    tokenizer: str
    policy_api_key: str | None = None
    run_api_key: str | None = None


def parse_args(kind: str, argv: Sequence[str] | None = None) -> tuple[RunnerArgs, EpisodeEnvSpec]:
    parser = argparse.ArgumentParser(prog=f"python -m recipe.atropos.{kind}",
                                     description=f"Play {kind} episodes through the policy gateway; push scored groups to run-api.")
    parser.add_argument("--name", required=True, help="the entry's name in trainer.atropos.environments")
    parser.add_argument("--spec-json", required=True, help="the entry, as JSON")
    parser.add_argument("--policy-url", required=True, help="the policy gateway's base URL (http://host:port/v1)")
    parser.add_argument("--run-api", required=True, help="atroposlib's run-api URL")
    parser.add_argument("--tokenizer", required=True, help="the policy's tokenizer folder")
    args = parser.parse_args(argv)
    try:
        entry = json.loads(args.spec_json)
    except ValueError as exc:
        parser.error(f"--spec-json is not JSON: {exc}")
    spec = load_spec(args.name, entry)
    runner = RunnerArgs(args.name, args.policy_url, args.run_api, args.tokenizer,
                        os.environ.get(POLICY_API_KEY_ENV) or None, os.environ.get(RUN_API_KEY_ENV) or None)
    return runner, spec


async def _until_terminated(main: Awaitable[object]) -> bool:
    """Run `main`; SIGTERM (the launcher stopping the run) cancels it, so that its `finally` blocks run:
    the runner leaves run-api and stops what it started. False when it was stopped so."""
    task = asyncio.ensure_future(main)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        return False
    return True


def runner_main(kind: str, run: Callable[[RunnerArgs, EpisodeEnvSpec], Awaitable[object]],
                argv: Sequence[str] | None = None) -> int:
    """Parse, check and run; exit 2 on a spec or start-up error (the message says what to fix)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {kind} %(levelname)s %(message)s", stream=sys.stderr)
    try:
        runner, spec = parse_args(kind, argv)
    except EpisodeSpecError as exc:
        print(f"{kind} runner: {exc}", file=sys.stderr)
        return 2
    try:
        if not asyncio.run(_until_terminated(run(runner, spec))):
            return 128 + signal.SIGTERM
    except EpisodeSpecError as exc:  # the kind's own start-up checks (imports, endpoints)
        print(f"{kind} runner {runner.name!r}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
