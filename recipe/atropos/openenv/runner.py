"""`run`: one `type: openenv` entry's driver process, from start-up checks to pushed groups.

1. The policy's tokenizer (the episode's tokens are rendered with it) and its chat template.
2. The server: the entry's `url`, or the `command` the driver starts and supervises (child_server.py);
   `/health`, then `/schema` (the action mapping and the prompt template are checked against it).
3. The core's episode loop (recipe/atropos/episodes/loop.py): groups of `group_size` episodes of one
   reset seed, `concurrency` at once, each played by player.py over its own WebSocket session,
   credited (process supervision by default) and pushed to run-api.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Iterator

from recipe.atropos.episodes.cli import RunnerArgs
from recipe.atropos.episodes.loop import EpisodeStats, run_episode_groups
from recipe.atropos.episodes.policy import TokenPolicyClient
from recipe.atropos.episodes.runapi import RunApiPusher
from recipe.atropos.episodes.spec import KEY, EpisodeSpecError
from recipe.atropos.openenv.actions import action_mapper
from recipe.atropos.openenv.child_server import ChildServer
from recipe.atropos.openenv.link import ServerLink
from recipe.atropos.openenv.player import EpisodePlayer, Task
from recipe.atropos.openenv.rendering import ChatRenderer, ObservationPrompt
from recipe.atropos.openenv.session import fetch_json, wait_until_healthy
from recipe.atropos.openenv.spec import OpenEnvSpec

__all__ = ["run", "tasks"]

logger = logging.getLogger("verl.recipe.atropos.openenv")


def tasks(seed: int) -> Iterator[Task]:
    """An endless stream of reset seeds (the same for the same `seed`)."""
    rng = random.Random(seed)
    while True:
        yield Task(rng.randrange(2**31))


async def run(args: RunnerArgs, spec: OpenEnvSpec, stats: EpisodeStats | None = None) -> EpisodeStats:
    from transformers import AutoTokenizer  # slow to import: only here, not for --help or a bad spec

    key = f"{KEY}.{args.name}"
    renderer = ChatRenderer(AutoTokenizer.from_pretrained(args.tokenizer), spec.system_prompt)
    prompt = ObservationPrompt(spec.prompt_template, spec.prompt_function, key=key)
    stats = stats or EpisodeStats()
    try:
        child = ChildServer(args.name, spec.command, env=spec.command_env, cwd=spec.command_cwd,
                            startup_timeout_s=spec.startup_timeout_s) if spec.command else None
    except FileNotFoundError as exc:
        raise EpisodeSpecError(f"{key}.command: {exc}") from exc
    supervisor = None
    try:
        url = child.url if child else spec.url.rstrip("/")
        try:
            if child:
                await child.start()
            await wait_until_healthy(url, spec.startup_timeout_s)
            schema = await fetch_json(url, "/schema")
        except (TimeoutError, ConnectionError, OSError) as exc:
            raise EpisodeSpecError(f"{key}: no OpenEnv server answers at {url} ({exc}); start it, or set "
                                   f"{key}.command for the driver to start it") from exc
        to_action = action_mapper(schema.get("action", {}), field=spec.action_field, function=spec.action_function,
                                  key=key, url=url)
        observation = schema.get("reset_observation") or schema.get("observation") or {}
        prompt.check(list(observation.get("properties", {})))
        logger.info("%s: playing %s (action fields %s), %d episodes at once, groups of %d, up to %d turns",
                    args.name, url, sorted(schema.get("action", {}).get("properties", {})), spec.concurrency,
                    spec.group_size, spec.max_turns)
        supervisor = asyncio.create_task(child.supervise()) if child else None
        link = ServerLink(url, args.name, stats, reset_timeout_s=spec.step_timeout_s,
                          reconnect_max_wait_s=spec.reconnect_max_wait_s)
        pusher = RunApiPusher(args.run_api_url, name=args.name, group_size=spec.group_size,
                              max_token_length=spec.max_token_length, weight=spec.weight,
                              min_batch_allocation=spec.min_batch_allocation, api_key=args.run_api_key,
                              max_batches_offpolicy=spec.max_batches_offpolicy)
        # Registered before the first episode (run-api answers once the trainer asked for a batch): nothing
        # is generated for a trainer that is not there yet, and run-api reserves this entry's
        # min_batch_allocation from the first batch on, not from its first group.
        await pusher.register()
        async with TokenPolicyClient(args.policy_url, api_key=args.policy_api_key) as policy:
            player = EpisodePlayer(spec, link, policy, renderer, prompt, to_action, stats)
            try:
                await run_episode_groups(spec, args.name, tasks(spec.seed), player.play, pusher, stats)
            finally:
                await link.close()
                await pusher.close()
    finally:
        if supervisor is not None:
            supervisor.cancel()
        if child is not None:
            await child.stop()
    logger.info("%s: done: %s", args.name, dict(stats.total))
    return stats
