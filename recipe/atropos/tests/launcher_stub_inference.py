"""Stand-in OpenAI-compatible inference worker for the launcher tests.

Serves ``GET /health`` (200, empty body, as vLLM does) and ``GET /v1/models`` on ``--host``
``--port``; accepts and ignores vLLM's other options. ``--die-after S`` exits with code 3 after S
seconds (a worker that crashes mid-run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default="stub-model")
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--die-after", type=float, default=None)
    args, _ignored = parser.parse_known_args(argv)
    model = args.served_model_name or args.model

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path == "/health":
                self._send(200, b"")
            elif self.path == "/v1/models":
                self._send(200, json.dumps({"object": "list", "data": [{"id": model, "object": "model"}]}).encode())
            else:
                self._send(404, b'{"error": "not found"}')

        def _send(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:  # quiet: health polls would fill the log
            pass

    server = ThreadingHTTPServer((args.host, args.port), Handler)
    print(f"stub inference: serving {model} on {args.host}:{args.port}", flush=True)
    if args.die_after is not None:
        timer = threading.Timer(args.die_after, _crash)
        timer.daemon = True
        timer.start()
    server.serve_forever()
    return 0


def _crash() -> None:
    print("stub inference: crashing", flush=True)
    os._exit(3)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
