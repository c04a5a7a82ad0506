"""`run`: one `type: verifiers` entry's runner process, from start-up checks to pushed groups.

1. The environment (loading.py): imported and made local, or refused with what to fix.
2. The policy's tokenizer: verifiers' training client renders every prompt with it (the renderers
   package's renderer for the model; for a model it does not know, the tokenizer's own chat template
   with an exact multi-turn bridge, rendering.py); loaded once here, so a wrong folder fails now.
3. The policy gateway: `GET /health` until it answers (the trainer starts it), progress every 30 s.
4. The core's episode loop (recipe/atropos/episodes/loop.py): groups of `group_size` episodes of one
   task, `concurrency` at once, each played by `env.run_slot` with verifiers' TRAINING client
   (`vf.TrainClientConfig`: token ids in, token ids and log-probs out, through the gateway's
   `/inference/v1/generate`, where each answer is recorded with the weights version that gave it),
   turned into one sample (convert.py), credited and pushed to run-api.

Tasks: the taskset in order, shuffled with `seed` (again each pass), endlessly; an endless taskset as
it comes.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import verifiers.v1 as vf
from renderers import RendererConfig
from pydantic import TypeAdapter, ValidationError
from verifiers.v1.clients.train import ElasticRendererPool
from verifiers.v1.env import RunSlot

from recipe.atropos.episodes.cli import POLICY_API_KEY_ENV, RunnerArgs
from recipe.atropos.episodes.loop import EpisodeStats, run_episode_groups
from recipe.atropos.episodes.runapi import RunApiPusher
from recipe.atropos.episodes.spec import KEY, EpisodeSpecError
from recipe.atropos.episodes.types import EpisodeFailed
from recipe.atropos.verifiers import patches
from recipe.atropos.verifiers.convert import to_episode
from recipe.atropos.verifiers.harness import shared_session_scope
from recipe.atropos.verifiers.loading import load_env
from recipe.atropos.verifiers.rendering import BRIDGE_RENDERER
from recipe.atropos.verifiers.spec import VerifiersEnvSpec

__all__ = ["VfTask", "model_context", "run", "tasks"]

logger = logging.getLogger("verl.recipe.atropos.verifiers")

POLICY_MODEL = "policy"  # the gateway serves the policy under whatever name: it replaces this one
GATEWAY_WAIT_S = 3600.0
# Rollouts sharing one renderer (verifiers' default): one tokenizer in memory per runner.
RENDERER_MULTIPLEX = 256


@dataclass(frozen=True)
class VfTask:
    """A task of the taskset, with the id the core logs it under (data.id, else name, else index)."""

    task_id: str
    task: Any


def tasks(env: vf.Env, seed: int) -> Iterator[VfTask]:
    taskset = env.taskset
    for epoch in itertools.count() if taskset.bounded else (None,):
        view = taskset if epoch is None else taskset.shuffle(seed + epoch)
        empty = True
        for task in view:
            empty = False
            data = task.data
            yield VfTask(str(data.id or data.name or f"idx{data.idx}"), task)
        if empty:
            raise EpisodeSpecError(f"the taskset of {type(env).__name__} yields no task")


def _explicit_renderer(where: str, spec: VerifiersEnvSpec) -> Any:
    try:
        return TypeAdapter(RendererConfig).validate_python(spec.renderer)
    except ValidationError as exc:
        raise EpisodeSpecError(f"{where}.renderer: {spec.renderer!r} is not a renderers RendererConfig "
                               f"({exc.errors()[0]['msg']}); e.g. {{name: qwen3}}") from exc


def choose_renderer(where: str, tokenizer: str, spec: VerifiersEnvSpec) -> Any:
    """The entry's `renderer`, else renderers' own choice for the tokenizer, except that its generic
    fallback (DefaultRenderer, no multi-turn bridge) becomes ChatTemplateBridgeRenderer (rendering.py)."""
    if spec.renderer is not None:
        return _explicit_renderer(where, spec)
    from renderers import CustomRendererConfig, DefaultRenderer, create_renderer
    from renderers.base import load_tokenizer

    try:
        auto = create_renderer(load_tokenizer(tokenizer))
    except Exception as exc:  # transformers' and renderers' errors alike
        raise EpisodeSpecError(f"{where}: cannot render prompts with the policy's tokenizer at {tokenizer!r} "
                               f"({type(exc).__name__}: {exc}); fix: --tokenizer names the policy's local tokenizer "
                               "folder (the launcher passes the model's)") from exc
    if type(auto) is DefaultRenderer:
        return CustomRendererConfig(import_path=BRIDGE_RENDERER)
    return None


def model_context(args: RunnerArgs, spec: VerifiersEnvSpec, renderer: Any = None) -> vf.ModelContext:
    """The policy as every agent of the environment sees it: verifiers' training client at the gateway."""
    client = vf.TrainClientConfig(base_url=args.policy_url, api_key_var=POLICY_API_KEY_ENV,
                                  renderer_model_name=args.tokenizer, renderer=renderer,
                                  multiplex=RENDERER_MULTIPLEX)
    sampling = {"max_tokens": spec.max_tokens, "temperature": spec.temperature, "top_p": spec.top_p,
                **({"top_k": spec.top_k} if spec.top_k != -1 else {}), **spec.sampling_args}
    return vf.ModelContext(model=POLICY_MODEL, client=client, sampling=vf.SamplingConfig(**sampling))


async def load_renderer(where: str, tokenizer: str, renderer: Any) -> None:
    """Build the training client's renderer now (shared by its rollouts), so a bad one fails at start."""
    try:
        await ElasticRendererPool(tokenizer, renderer, multiplex=RENDERER_MULTIPLEX).grow()
    except Exception as exc:
        raise EpisodeSpecError(f"{where}.renderer: {renderer!r} cannot render the tokenizer at {tokenizer!r} "
                               f"({type(exc).__name__}: {exc})") from exc


async def wait_for_gateway(policy_url: str, timeout_s: float = GATEWAY_WAIT_S) -> None:
    """Until the policy gateway's `/health` answers 200; EpisodeSpecError after `timeout_s`."""
    health = policy_url.rstrip("/").removesuffix("/v1") + "/health"
    started = last_note = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        while True:
            try:
                async with session.get(health) as answer:
                    if answer.status == 200:
                        return
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            now = time.monotonic()
            if now - started > timeout_s:
                raise EpisodeSpecError(f"no policy gateway answers at {health} after {timeout_s:.0f} s; fix: "
                                       "--policy-url is the trainer's gateway (http://host:port/v1), started by "
                                       "the trainer in trajectory mode")
            if now - last_note >= 30:
                last_note = now
                logger.info("waiting for the policy gateway at %s (%.0f s)", health, now - started)
            await asyncio.sleep(1.0)


def quiet_per_request_logs() -> None:
    """verifiers logs every rollout's start and end, its interception server and httpx every request, at
    INFO: thousands of lines a step. Failures still show (the core logs them with the task id)."""
    for name in ("verifiers", "httpx", "aiohttp.access", "uvicorn.access"):
        logging.getLogger(name).setLevel(logging.WARNING)


async def run(args: RunnerArgs, spec: VerifiersEnvSpec, stats: EpisodeStats | None = None) -> EpisodeStats:
    where = f"{KEY}.{args.name}"
    quiet_per_request_logs()
    patches.apply()
    env = load_env(args.name, spec)
    renderer = await asyncio.to_thread(choose_renderer, where, args.tokenizer, spec)
    await load_renderer(where, args.tokenizer, renderer)
    ctx = model_context(args, spec, renderer)
    stats = stats or EpisodeStats()
    await wait_for_gateway(args.policy_url)

    async def play(task: VfTask, attempt: int):
        try:
            return to_episode(await env.run_slot(RunSlot(task.task), ctx), task.task_id)
        except EpisodeFailed as exc:
            if exc.kind == "server":  # the gateway is down (the trainer restarts or ends): wait, don't spin
                await wait_for_gateway(args.policy_url)
            raise

    pusher = RunApiPusher(args.run_api_url, name=args.name, group_size=spec.group_size,
                          max_token_length=spec.max_token_length, weight=spec.weight,
                          min_batch_allocation=spec.min_batch_allocation, api_key=args.run_api_key,
                          max_batches_offpolicy=spec.max_batches_offpolicy)
    logger.info("%s: playing %s, %d episodes at once, groups of %d, through %s", args.name, spec.env,
                spec.concurrency, spec.group_size, args.policy_url)
    try:
        async with shared_session_scope(), env.serving():
            await run_episode_groups(spec, args.name, tasks(env, spec.seed), play, pusher, stats)
    finally:
        await pusher.close()
    logger.info("%s: done: %s", args.name, dict(stats.total))
    return stats
