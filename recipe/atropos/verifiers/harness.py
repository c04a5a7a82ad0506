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
import contextlib
import weakref
from collections.abc import AsyncIterator

import aiohttp
import verifiers.v1 as vf
from verifiers.v1.dialects.chat import message_to_wire

from recipe.atropos.verifiers.plugins import register

__all__ = ["HARNESS_ID", "InProcessChatConfig", "InProcessChatHarness", "shared_session_scope"]

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
        # No client-side retries: a failed call is the rollout's error, recorded on its trace.
        url = f"{endpoint.rstrip('/')}/chat/completions"
        body = {"model": ctx.model, "messages": messages}
        async with _shared_session().post(url, json=body, headers={"Authorization": f"Bearer {secret}"}) as answer:
            if answer.status != 200:
                raise RuntimeError(f"the rollout's model endpoint {url} answered HTTP {answer.status}: "
                                   f"{(await answer.text())[:300]}")
            await answer.read()
        return vf.ProgramResult(exit_code=0, stdout="", stderr="")


_SESSIONS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aiohttp.ClientSession] = weakref.WeakKeyDictionary()
_USERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, int] = weakref.WeakKeyDictionary()


def _shared_session() -> aiohttp.ClientSession:
    """One connection pool per event loop for every segment's call. Not the OpenAI SDK: a client of its
    own per call builds a TLS context each time (~90 ms of CPU per episode), and one shared httpx pool
    scans every pooled connection for each request (at 64 episodes in flight, the runner's largest cost,
    benchmarks/bench_verifiers_runner.py)."""
    loop = asyncio.get_running_loop()
    session = _SESSIONS.get(loop)
    if session is None or session.closed:
        # No total timeout, as verifiers' own clients: the rollout's deadline bounds a call.
        session = _SESSIONS[loop] = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=30.0),
                                                          connector=aiohttp.TCPConnector(limit=0))
    return session


@contextlib.asynccontextmanager
async def shared_session_scope() -> AsyncIterator[None]:
    """Closes this event loop's session when the last runner using it ends (several runners can share
    a loop: tests, benchmarks); a loop's session otherwise lives as long as the loop."""
    loop = asyncio.get_running_loop()
    _USERS[loop] = _USERS.get(loop, 0) + 1
    try:
        yield
    finally:
        _USERS[loop] -= 1
        if not _USERS[loop]:
            del _USERS[loop]
            session = _SESSIONS.pop(loop, None)
            if session is not None:
                await session.close()


register("harness", InProcessChatHarness, HARNESS_ID)
