"""The policy gateway's gate: open/closed state, held requests and in-flight accounting per server.

Everything here runs on the gateway's event loop (gateway.py); the routes (gateway_routes.py) admit
each request through `PolicyGate.admitted`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from recipe.atropos.trajectory.activity import ServingActivity


class GateTimeout(Exception):
    """A request waited longer than `hold_timeout_s` at the closed gate."""


class GatewayStopping(Exception):
    """The gateway is shutting down: held requests are turned away."""


class GateFull(Exception):
    """`max_held` requests are already waiting at the closed gate."""


class ClientGone(Exception):
    """The client of a held request disconnected: nobody waits for its answer."""


class Backends:
    """The replicas' base URLs and how many requests each has in flight (gateway loop only)."""

    def __init__(self, urls: Sequence[str]):
        if not urls:
            raise ValueError("the policy gateway needs at least one inference server URL")
        self.urls = [url.rstrip("/") for url in urls]
        self.in_flight = dict.fromkeys(self.urls, 0)
        self._order = itertools.count()

    def replace(self, old: str, new: str) -> None:
        """A restarted server's new URL in place of its old one (requests still counted on the old
        one finish against it: they failed with the server)."""
        old, new = old.rstrip("/"), new.rstrip("/")
        self.urls[self.urls.index(old)] = new
        self.in_flight.setdefault(new, 0)

    def pick(self) -> str:
        """The server with the fewest requests in flight (round robin among equals)."""
        turn = next(self._order)
        n = len(self.urls)
        rotated = [self.urls[(turn + i) % n] for i in range(n)]
        return min(rotated, key=self.in_flight.__getitem__)


class PolicyGate:
    """Open/closed state and in-flight accounting; every coroutine runs on the gateway's loop."""

    def __init__(self, backends: Backends, hold_timeout_s: float, max_held: int = 1024):
        self.backends = backends
        self.hold_timeout_s = hold_timeout_s
        self.max_held = max_held
        self.global_steps: int | None = None
        self.held = 0
        self.requests_abandoned = 0  # held requests dropped because their client disconnected
        self.requests_refused_full = 0  # 503: max_held requests were already held
        self.requests_held_too_long = 0  # 503: held past hold_timeout_s
        self.requests_unauthorized = 0  # 401: no or a wrong bearer key
        self.times_opened = 0  # weight syncs done (fit() syncs once before the first step)
        self.times_closed = 0  # times the servers were put to sleep
        self.stopping = False
        self.activity = ServingActivity()  # when requests were in flight (trajectory/activity.py)
        self._open = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def is_open(self) -> bool:
        return self._open.is_set()

    @property
    def in_flight(self) -> int:
        return sum(self.backends.in_flight.values())

    @contextlib.asynccontextmanager
    async def admitted(self, disconnected: Callable[[], Awaitable[Any]] | None = None) -> AsyncIterator[str]:
        """Wait for the gate (up to hold_timeout_s), then hold a slot on one server until done.

        `disconnected` returns when the request's client has gone; a held request whose client goes
        raises ClientGone instead of being let through."""
        if not self._open.is_set():
            await self._hold(disconnected)
        if self.stopping:
            raise GatewayStopping
        url = self.backends.pick()
        self.backends.in_flight[url] += 1
        self._idle.clear()
        self.activity.busy()
        try:
            yield url
        finally:
            self.backends.in_flight[url] -= 1
            if self.in_flight == 0:
                self._idle.set()
                self.activity.idle()

    async def _hold(self, disconnected: Callable[[], Awaitable[Any]] | None) -> None:
        if self.held >= self.max_held:
            self.requests_refused_full += 1
            raise GateFull
        self.held += 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.hold_timeout_s
        client_gone = asyncio.ensure_future(disconnected()) if disconnected is not None else loop.create_future()
        try:
            # Checked again on every wake-up: a gate opened and closed at once lets nobody through.
            while not self._open.is_set() and not self.stopping and not client_gone.done():
                opened = asyncio.ensure_future(self._open.wait())
                try:
                    await asyncio.wait({opened, client_gone}, timeout=deadline - loop.time(), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    opened.cancel()
                if loop.time() >= deadline and not self._open.is_set():
                    self.requests_held_too_long += 1
                    raise GateTimeout
            if client_gone.done():  # also when it left just as the gate opened: nobody reads the answer
                self.requests_abandoned += 1
                raise ClientGone
        finally:
            client_gone.cancel()
            self.held -= 1

    async def open(self, global_steps: int | None) -> None:
        self.global_steps = global_steps
        self.times_opened += 1
        self._open.set()

    async def replace_backend(self, old: str, new: str) -> None:
        self.backends.replace(old, new)

    async def stop_admitting(self) -> None:
        """Turn away held and new requests (503), before the server shuts down."""
        self.stopping = True
        self._open.set()  # wakes the held requests, which then see `stopping`

    async def close_and_drain(self, timeout_s: float) -> int:
        """Close the gate, wait up to timeout_s for requests in flight; returns how many remain."""
        self._open.clear()
        self.times_closed += 1
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout=timeout_s)
        return self.in_flight
