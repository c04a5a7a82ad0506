"""Stand-in trainer for the trajectory-mode launcher tests.

Reads ``trainer.atropos.trajectory_api_url=`` and ``trainer.atropos.policy_gateway_port=``
from its argv (the launcher appends the first; the test passes the second as an override), checks
run-api answers, then, after ``$TRAJ_POLICY_DELAY_S`` seconds (default 1), serves a fake policy
``GET /health`` on that port, as the real trainer's policy gateway does. It writes what it saw to
``$TRAJ_TRAINER_REPORT`` (JSON), waits until ``$TRAJ_WAIT_FOR`` exists (at most 60 s, then exit 4)
and exits with ``$TRAJ_EXIT_CODE`` (default 0).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests

from recipe.atropos.tests.launcher_stub_trainer import wait_for_file, write_report

URL_KEY = "trainer.atropos.trajectory_api_url="
PORT_KEY = "trainer.atropos.policy_gateway_port="


class _Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"status": "ok", "global_steps": 0}).encode()
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def main(argv: list[str]) -> int:
    url = next((a[len(URL_KEY) :] for a in argv if a.startswith(URL_KEY)), None)
    port = int(next((a[len(PORT_KEY) :] for a in argv if a.startswith(PORT_KEY)), "0"))
    report: dict = {"pid": os.getpid(), "argv": argv, "trajectory_api_url": url, "started_at": time.time()}
    try:
        report["api_status"] = requests.get(f"{url}/", timeout=5).status_code
    except (requests.RequestException, TypeError) as exc:
        report["api_error"] = f"{type(exc).__name__}: {exc}"
    _write(report)
    time.sleep(float(os.environ.get("TRAJ_POLICY_DELAY_S", "1")))
    server = ThreadingHTTPServer(("127.0.0.1", port), _Health)
    report["policy_up_at"] = time.time()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _write(report)
    print(f"stand-in trainer: policy /health on port {port}, run-api {url}", flush=True)
    wait_for = os.environ.get("TRAJ_WAIT_FOR")
    if wait_for and not wait_for_file(wait_for, 60):
        return 4
    code = int(os.environ.get("TRAJ_EXIT_CODE", "0"))
    print(f"stand-in trainer: done, exit {code}", flush=True)
    return code


def _write(report: dict) -> None:
    write_report(report, os.environ.get("TRAJ_TRAINER_REPORT"))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
