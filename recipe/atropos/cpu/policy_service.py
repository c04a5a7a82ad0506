"""The policy behind one HF rollout server: concurrent requests in, batched `generate()` calls out.

verl's agent loop sends one request per sample (batch size x n of them at once) and environments
call the OpenAI endpoint concurrently. `PolicyService` queues them, waits a moment for the rest of a
burst, and runs requests that sample alike as one left-padded `generate()` call in a worker thread
(so the event loop, and with it the HTTP server, stays responsive). Requests with a seed run on their
own, so that their result depends on the seed alone. New weights are staged bucket by bucket and
swapped in at once, between two batches: no completion ever mixes two policies.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Sequence
from typing import Any

import torch

from recipe.atropos.cpu.hf_generation import FINISH_LENGTH, Completion, HFGenerator, SamplingSettings


@dataclasses.dataclass
class _Job:
    prompts: list[list[int]]
    settings: SamplingSettings
    future: asyncio.Future


class PolicyService:
    """Serves one `HFGenerator` to many concurrent callers (one event loop)."""

    def __init__(
        self,
        generator: HFGenerator,
        tokenizer: Any,
        model_name: str,
        *,
        batch_window_s: float = 0.002,
        max_batch_size: int = 256,
    ):
        self.generator = generator
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.batch_window_s = batch_window_s
        self.max_batch_size = max_batch_size
        # Training step whose weights are loaded (verl's `global_steps`); -1: the checkpoint on disk.
        self.global_steps = -1
        self.weight_version = 0
        self._model_lock = threading.Lock()
        self._pending: list[_Job] = []
        self._drainer: asyncio.Task | None = None
        self._staged: list[tuple[str, torch.Tensor]] = []

    # -- sampling -----------------------------------------------------------------------------

    async def generate(self, prompts: Sequence[Sequence[int]], settings: SamplingSettings) -> list[Completion]:
        """One completion per prompt (repeat a prompt for several samples of it)."""
        if not prompts:
            return []
        # Fails here, for this caller only, rather than for a whole batch later.
        self.generator.max_new_tokens(max(len(p) for p in prompts), settings.max_tokens)
        job = _Job([list(p) for p in prompts], settings, asyncio.get_running_loop().create_future())
        self._pending.append(job)
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain())
        return await job.future

    async def _drain(self) -> None:
        while self._pending:
            await asyncio.sleep(self.batch_window_s)  # let the rest of a burst arrive
            jobs, self._pending = self._pending, []
            for batch in self._batches(jobs):
                await self._run(batch)

    def _batches(self, jobs: list[_Job]) -> list[list[_Job]]:
        batches: list[list[_Job]] = []
        open_batches: dict[tuple, list[_Job]] = {}
        for job in jobs:
            if job.settings.seed is not None:
                batches.append([job])
                continue
            batch = open_batches.get(job.settings.batch_key())
            if batch is None or sum(len(j.prompts) for j in batch) + len(job.prompts) > self.max_batch_size:
                batch = open_batches[job.settings.batch_key()] = []
                batches.append(batch)
            batch.append(job)
        return batches

    async def _run(self, batch: list[_Job]) -> None:
        prompts = [p for job in batch for p in job.prompts]
        settings = dataclasses.replace(batch[0].settings, max_tokens=max(job.settings.max_tokens for job in batch))
        try:
            completions = await asyncio.to_thread(self._locked, self.generator.generate, prompts, settings)
        except Exception as exc:  # every waiting caller gets the error
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        start = 0
        for job in batch:
            mine = completions[start : start + len(job.prompts)]
            start += len(job.prompts)
            if not job.future.done():
                limits = [self.generator.max_new_tokens(len(p), job.settings.max_tokens) for p in job.prompts]
                job.future.set_result([_truncated(c, limit) for c, limit in zip(mine, limits, strict=True)])

    def _locked(self, fn, *args):
        with self._model_lock:
            return fn(*args)

    async def prompt_logprobs(
        self, token_ids: Sequence[int], top_n: int = 0
    ) -> tuple[list[float | None], list[dict[int, float] | None]]:
        """Log-probs of a fixed sequence under the current weights (see `HFGenerator.prompt_logprobs`)."""
        return await asyncio.to_thread(self._locked, self.generator.prompt_logprobs, list(token_ids), top_n)

    # -- weights ------------------------------------------------------------------------------

    def stage_weights(self, named_tensors: Sequence[tuple[str, torch.Tensor]]) -> int:
        """Keep a bucket of new weights until `commit_weights`; returns how many are staged."""
        self._staged.extend((name, tensor) for name, tensor in named_tensors)
        return len(self._staged)

    async def commit_weights(self, global_steps: int | None = None) -> int:
        """Load every staged tensor at once (between batches); returns how many were loaded."""
        staged, self._staged = self._staged, []
        loaded = await asyncio.to_thread(self._locked, self.generator.load_weights, staged)
        self.weight_version += 1
        if global_steps is not None:
            self.global_steps = int(global_steps)
        return loaded


def _truncated(completion: Completion, max_tokens: int) -> Completion:
    """`completion` cut to `max_tokens` (requests sharing a batch may ask for fewer tokens)."""
    if len(completion.token_ids) <= max_tokens:
        return completion
    return Completion(
        token_ids=completion.token_ids[:max_tokens],
        log_probs=completion.log_probs[:max_tokens],
        finish_reason=FINISH_LENGTH,
        top_logprobs=completion.top_logprobs[:max_tokens],
    )
