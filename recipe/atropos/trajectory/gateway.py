"""The policy gateway: one stable endpoint in front of the policy's inference servers, closed while
their weights are being replaced.

In trajectory mode Atropos environments generate through the policy being trained. verl's rollout
servers (vLLM's OpenAI server on GPU, the HF rollout's on CPU) listen on ports chosen at start-up,
one per replica, and on GPU they sleep (weights and KV cache freed) from the end of a step's
generation until the next weight sync. The gateway gives the environments one address that does
not change, spreads their requests over the replicas (fewest requests in flight first), and holds
requests that arrive while the gate is closed until it opens again, rather than letting them reach
a sleeping server:

- `close_and_drain()` (before the replicas sleep) stops admitting requests and waits for those in
  flight to finish;
- `open(global_steps)` (after the new weights are loaded and the replicas woke up) lets the held
  requests through.

`GatedCheckpointEngineManager` (weight_sync.py) calls both from verl's own weight-sync
sequence. A request held longer than `hold_timeout_s` gets 503 with `Retry-After`; so does one that
arrives when `max_held` requests are already held. A held request whose client disconnects is
dropped at once (never forwarded when the gate opens) and counted in `/health` as
`requests_abandoned`: a retrying environment would otherwise have the servers generate every
abandoned attempt once the step ends.

With `api_key` every route but `/health` needs `Authorization: Bearer <key>` (recipe/atropos/http_auth.py);
a gateway that listens beyond loopback refuses to start without one.

Routes: `/v1/completions`, `/v1/chat/completions` and `/v1/models` are passed through, with the
request's `model` replaced by the name the server serves (environments need not know it);
`/generate` (atroposlib's `server_type: vllm` and `sglang` dialects, generate_api.py) is translated
to `/v1/completions` with vLLM's `return_token_ids`, which verl's vLLM servers answer; `/health` says
whether the gate is open and which training step's weights the servers hold. Errors are JSON.

The parts: gate.py (the gate's state and admission), gateway_routes.py (the FastAPI app and its
routes); this module runs them on a thread of their own, controlled from the trainer's.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Sequence

from recipe.atropos.config import check_gateway_exposure
from recipe.atropos.trajectory.gate import Backends, PolicyGate
from recipe.atropos.trajectory.gateway_routes import build_app

logger = logging.getLogger("verl.recipe.atropos")


def _listening_socket(host: str, port: int) -> socket.socket:
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return socket.create_server((host.strip("[]"), port), family=family)
    except OSError as exc:
        raise OSError(
            f"the policy gateway cannot listen on {host}:{port} ({exc.strerror}): free the port or set "
            "trainer.atropos.policy_gateway_port (and policy_gateway_host)"
        ) from exc


def check_port_free(host: str, port: int) -> None:
    """Raise, naming trainer.atropos.policy_gateway_port, when the gateway could not listen there."""
    if port != 0:
        _listening_socket(host, port).close()


class PolicyGateway:
    """Runs the gateway's uvicorn server on its own thread and event loop, controlled from any thread."""

    def __init__(
        self,
        server_urls: Sequence[str],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        hold_timeout_s: float = 1800.0,
        drain_timeout_s: float = 120.0,
        max_held: int = 1024,
        api_key: str | None = None,
    ):
        check_gateway_exposure(host, api_key)  # before anything listens
        self.host = host
        self.port = port
        self.drain_timeout_s = drain_timeout_s
        self._backends = Backends(server_urls)
        self._hold_timeout_s = hold_timeout_s
        self._max_held = max_held
        self._api_key = api_key
        self._loop: asyncio.AbstractEventLoop | None = None
        self._gate: PolicyGate | None = None
        self._server = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        """What environments get as `--openai.base_url`."""
        host = f"[{self.host.strip('[]')}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    def start(self, timeout_s: float = 30.0) -> PolicyGateway:
        import uvicorn

        sock = _listening_socket(self.host, self.port)  # bound here: a busy port fails now, not later
        self.port = sock.getsockname()[1]

        def serve() -> None:
            try:  # uvloop (uvicorn's own choice when installed): ~12% less CPU per request relayed
                import uvloop

                self._loop = uvloop.new_event_loop()
            except ImportError:
                self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            self._gate = PolicyGate(self._backends, self._hold_timeout_s, self._max_held)
            app = build_app(self._gate, api_key=self._api_key)
            # Requests still running get a short grace period at shutdown (their clients retry).
            # No access log and no X-Forwarded-For rewriting: per-request work the gateway does not use.
            config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2,
                                    access_log=False, proxy_headers=False)
            self._server = uvicorn.Server(config)
            try:
                self._loop.run_until_complete(self._server.serve(sockets=[sock]))
                # uvicorn cancels the requests still running after the grace period but does not wait
                # for them: let them end (their connections close) before the loop does.
                pending = asyncio.all_tasks(self._loop)
                for task in pending:
                    task.cancel()
                self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            finally:
                self._loop.close()
                sock.close()

        self._thread = threading.Thread(target=serve, name="atropos-policy-gateway", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not (self._server is not None and self._server.started):  # started: its loop runs
            if time.monotonic() > deadline or not self._thread.is_alive():
                self.stop()
                sock.close()
                raise RuntimeError(f"the policy gateway on {self.host}:{self.port} did not start within {timeout_s:g} s")
            time.sleep(0.01)
        logger.warning(
            "policy gateway for environments: %s -> %s (closed until the first weight sync)",
            self.base_url, ", ".join(self._backends.urls),
        )
        return self

    def _call(self, coroutine_fn, *args, timeout_s: float = 30.0):
        """Run one of the gate's coroutines on the gateway's loop and wait for its result."""
        if self._loop is None:
            raise RuntimeError("the policy gateway is not running")
        return asyncio.run_coroutine_threadsafe(coroutine_fn(*args), self._loop).result(timeout=timeout_s)

    def open(self, global_steps: int | None) -> None:
        """Let requests through to servers that hold the weights of training step `global_steps`."""
        self._call(self._gate.open, global_steps)

    def close_and_drain(self) -> None:
        """Hold new requests; wait (up to drain_timeout_s) for those in flight to finish."""
        start = time.monotonic()
        remaining = self._call(self._gate.close_and_drain, self.drain_timeout_s, timeout_s=self.drain_timeout_s + 30)
        if remaining:
            logger.warning(
                "policy gateway: %d request(s) still running after %.0f s (trainer.atropos.policy_drain_timeout_s); "
                "the inference servers go to sleep under them", remaining, time.monotonic() - start,
            )

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            if self._thread.is_alive():
                self._call(self._gate.stop_admitting)
            self._server.should_exit = True
            self._thread.join(timeout=10)
        self._server = self._thread = None
