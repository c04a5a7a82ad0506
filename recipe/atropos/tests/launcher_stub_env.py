"""Stand-in environment services for the launcher tests, for what the real one does not do.

``--mode never-healthy``: prints a few log lines, then answers ``/health`` with 503
``{"status": "starting"}`` forever (a service stuck loading).
``--mode no-register``: healthy, but has no ``/register_inference_endpoint`` (404, as services
that do not need an inference server answer).
``--die-after S``: exits with code 5 after S seconds.
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
    parser.add_argument("--mode", choices=["never-healthy", "no-register"], required=True)
    parser.add_argument("--die-after", type=float, default=None)
    args = parser.parse_args(argv)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            if self.path != "/health":
                self._send(404, {"error": {"code": "not_found", "message": self.path}})
            elif args.mode == "never-healthy":
                self._send(503, {"status": "starting"})
            else:
                self._send(200, {"status": "ok", "env": "stub"})

        def do_POST(self) -> None:  # noqa: N802
            self._send(404, {"error": {"code": "not_found", "message": self.path}})

        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    print("stub env: loading the dataset", flush=True)
    print(f"stub env: mode {args.mode}, STUB-ENV-MARKER on {args.host}:{args.port}", flush=True)
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    if args.die_after is not None:
        timer = threading.Timer(args.die_after, lambda: os._exit(5))
        timer.daemon = True
        timer.start()
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
