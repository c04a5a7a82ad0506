"""A small environment service that misbehaves on request, for testing clients over real HTTP.

By default it follows docs/PROTOCOL.md (``/health``, ``/evaluate_and_compute_advantages`` with
group-normalised advantages, ``/register_inference_endpoint``) plus stand-ins for the trajectory
API's ``/status``, ``/info`` and ``/batch``. Tests queue :class:`Fault` answers per path
(errors, slow answers, ``Retry-After``, malformed bodies, dropped connections); the next calls to
that path get them, later calls the normal answer. Every request is recorded. :meth:`stop` closes
the listening socket *and* open keep-alive connections, as a crashed server would, and
:meth:`start` brings it back on the same port.

It is a stdlib ``ThreadingHTTPServer`` in a thread of the test process, bound to 127.0.0.1.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import defaultdict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from recipe.atropos import wire

LOOPBACK_HOST = "127.0.0.1"


@dataclass(frozen=True)
class Fault:
    """One scripted answer.

    ``status`` None answers normally, after ``delay_s``. Otherwise it answers ``status`` with
    ``body`` (bytes as they are, anything else encoded as ``content_type``; None gives the
    protocol's error body for statuses >= 400) and ``headers``. ``drop_connection`` closes the
    connection without answering, as a process dying mid-request does.
    """

    status: int | None = None
    body: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    content_type: str = wire.JSON
    drop_connection: bool = False


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    client_port: int
    received_at: float  # time.monotonic()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], owner: FaultInjectingServer) -> None:
        self.owner = owner
        self.open_connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            self.open_connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.open_connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Broken pipes after a stop or a client timeout are expected here; stay quiet."""

    def drop_all_connections(self) -> None:
        with self.connections_lock:
            connections = list(self.open_connections)
            self.open_connections.clear()
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            connection.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so that connection reuse is observable
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def _handle(self) -> None:
        owner = self.server.owner
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        path = self.path.split("?", 1)[0]
        owner._record(
            RecordedRequest(
                method=self.command,
                path=path,
                headers={k.lower(): v for k, v in self.headers.items()},
                body=body,
                client_port=self.client_address[1],
                received_at=time.monotonic(),
            )
        )
        fault = owner._next_fault(path)
        if fault is not None and fault.delay_s:
            time.sleep(fault.delay_s)
        if fault is not None and fault.drop_connection:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault is not None and fault.status is not None:
            self._send_fault(fault)
            return
        status, payload = owner._answer(self.command, path, body, self.headers)
        self._send(status, payload, self._answer_content_type(owner))

    def _answer_content_type(self, owner: FaultInjectingServer) -> str:
        if wire.MSGPACK in owner.encodings and wire.accepts_msgpack(self.headers.get("Accept")):
            return wire.MSGPACK
        return wire.JSON

    def _send_fault(self, fault: Fault) -> None:
        assert fault.status is not None
        if isinstance(fault.body, bytes):
            raw = fault.body
        else:
            payload = fault.body
            if payload is None and fault.status >= 400:
                payload = {"error": {"code": f"injected_{fault.status}", "message": f"injected fault {fault.status}"}}
            raw = wire.encode(payload if payload is not None else {}, fault.content_type)
        self._send_raw(fault.status, raw, fault.content_type, fault.headers)

    def _send(self, status: int, payload: Any, content_type: str) -> None:
        self._send_raw(status, wire.encode(payload, content_type), content_type, {})

    def _send_raw(self, status: int, raw: bytes, content_type: str, headers: Mapping[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(raw)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(raw)


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


class FaultInjectingServer:
    """The server; see the module docstring. ``port=0`` picks a free port on the first start."""

    def __init__(
        self,
        port: int = 0,
        *,
        encodings: Sequence[str] = (wire.JSON, wire.MSGPACK),
        env_name: str = "fault-server",
    ) -> None:
        self.port = port
        self.encodings = tuple(encodings)
        self.env_name = env_name
        self._faults: dict[str, deque[Fault]] = defaultdict(deque)
        self._requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle ----------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK_HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> FaultInjectingServer:
        """Listen (again) on ``self.port``; the first start with port 0 picks one."""
        if self._server is not None:
            return self
        self._server = _Server((LOOPBACK_HOST, self.port), self)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop as a crash would: no more connections accepted, open ones cut."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        server.drop_all_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FaultInjectingServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ---- scripting and inspection --------------------------------------------------------

    def inject(self, path: str, fault: Fault, times: int = 1) -> None:
        """The next ``times`` calls to ``path`` get ``fault``."""
        with self._lock:
            self._faults[path].extend([fault] * times)

    def requests_to(self, path: str | None = None) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self._requests if path is None or r.path == path]

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def _next_fault(self, path: str) -> Fault | None:
        with self._lock:
            queue = self._faults.get(path)
            return queue.popleft() if queue else None

    # ---- the well-behaved service --------------------------------------------------------

    def _answer(self, method: str, path: str, body: bytes, headers: Mapping[str, str]) -> tuple[int, Any]:
        if method == "GET" and path == "/health":
            return 200, {"status": "ok", "env": self.env_name, "encodings": list(self.encodings)}
        if method == "POST" and path == "/evaluate_and_compute_advantages":
            return self._evaluate(body, headers)
        if method == "POST" and path == "/register_inference_endpoint":
            return 200, {"registered": True}
        if method == "GET" and path == "/status":
            return 200, {"current_step": 0, "queue_size": 0}
        if method == "GET" and path == "/info":
            return 200, {"batch_size": -1, "max_token_len": -1}
        if method == "GET" and path == "/batch":
            return 200, {"batch": None}
        return 404, _error("not_found", f"no endpoint {method} {path}")

    def _evaluate(self, body: bytes, headers: Mapping[str, str]) -> tuple[int, Any]:
        content_type = wire.media_type(headers.get("Content-Type"))
        if content_type not in self.encodings:
            return 415, _error("unsupported_media_type", f"{content_type} not in {list(self.encodings)}")
        try:
            request = wire.decode(body, content_type, headers.get("Content-Encoding"))
        except wire.WireError as exc:
            return 400, _error("malformed_body", str(exc))
        prompts, responses = request.get("prompts"), request.get("responses")
        if not isinstance(prompts, list) or not isinstance(responses, list) or len(prompts) != len(responses):
            return 422, _error("length_mismatch", "prompts and responses must be lists of one length")
        ground_truths = request.get("ground_truths") or [None] * len(prompts)
        # Score: 1 when the response equals its ground truth; without one, the response's length.
        scores = np.array(
            [
                float(response == truth) if truth is not None else float(len(response))
                for response, truth in zip(responses, ground_truths)
            ]
        )
        group_keys = request.get("group_ids") or prompts
        normalised = np.zeros_like(scores)
        for key in set(group_keys):
            members = np.array([k == key for k in group_keys])
            group_scores = scores[members]
            normalised[members] = (group_scores - group_scores.mean()) / (group_scores.std() + 1e-6)
        lengths = request.get("response_lengths")
        if request.get("response_token_ids") is not None:
            lengths = [len(ids) for ids in request["response_token_ids"]]
        if lengths is not None:
            advantages: list[Any] = [np.full(n, a, dtype=np.float32) for n, a in zip(lengths, normalised)]
        else:
            advantages = [float(a) for a in normalised]
        metrics = {"mean_reward": float(scores.mean()), "batch_size": float(len(prompts))}
        return 200, {"advantages": advantages, "scores": scores.tolist(), "metrics": metrics}
