"""`InProcessChatHarness`: verifiers' tool-less chat loop, run inside the runner process.

verifiers' own harnesses are programs: `null` and `bash` (the default) are scripts that `uv` installs
with their dependencies from the package registry on first use, the others install third-party agents.
A training runner must not install anything while it runs, so seats left on the default harness play
this one: each segment sends the conversation so far to the rollout's interception endpoint (what every
harness must do, `Harness.launch`), one model call, no tools. Continuing an exchange (`resume`, the
environment's text between turns) relaunches it on the whole conversation, as `null` does.

Loaded by verifiers under the id `HARNESS_ID` (plugins.py registers it).
"""

from __future__ import annotations

import asyncio
import weakref

import httpx
import verifiers.v1 as vf
from openai import AsyncOpenAI
from verifiers.v1.dialects.chat import message_to_wire

from recipe.atropos.verifiers.plugins import register

__all__ = ["HARNESS_ID", "InProcessChatConfig", "InProcessChatHarness"]

HARNESS_ID = "verl_in_process_chat"


class InProcessChatConfig(vf.HarnessConfig):
    id: str = HARNESS_ID


class InProcessChatHarness(vf.Harness[InProcessChatConfig]):
    """One chat completion per segment, in this process, through the rollout's interception endpoint."""

    APPENDS_SYSTEM_PROMPT = True  # the system prompt goes as a system message
    SUPPORTS_RESUME = True
    EXECUTES_CODE = False
    NEEDS_CONTAINER = False

    async def launch(self, ctx, trace, runtime, endpoint, secret, mcp_urls, data, tool_interception_url=None):
        system, prompt = self.resolve_prompt(data)
        messages = [{"role": "system", "content": system}] if system else []
        if isinstance(prompt, str):
            messages.append({"role": "user", "content": prompt})
        elif prompt:
            messages.extend(message_to_wire(message) for message in prompt)
        # No client-side retries: a failed call is the rollout's error, recorded on its trace. Not closed:
        # it owns nothing but the shared connection pool.
        client = AsyncOpenAI(base_url=endpoint, api_key=secret, max_retries=0, http_client=_shared_http_client())
        await client.chat.completions.create(model=ctx.model, messages=messages)
        return vf.ProgramResult(exit_code=0, stdout="", stderr="")


_HTTP_CLIENTS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = weakref.WeakKeyDictionary()


def _shared_http_client() -> httpx.AsyncClient:
    """One connection pool per event loop for every segment's call. A client of its own per call
    (the SDK's default) builds a TLS context each time, loading the CA bundle: ~90 ms of CPU per
    episode, most of a runner's own cost (benchmarks/bench_verifiers_runner.py)."""
    loop = asyncio.get_running_loop()
    client = _HTTP_CLIENTS.get(loop)
    if client is None:
        # Read timeout unbounded, as verifiers' own clients: the rollout's deadline bounds a call.
        client = _HTTP_CLIENTS[loop] = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=30.0),
                                                         limits=httpx.Limits(max_connections=None))
    return client


register("harness", InProcessChatHarness, HARNESS_ID)
