"""The policy gateway in a process of its own, for the benchmarks: in a run it lives in the trainer's
process, never in a runner's, so a benchmark that ran it in its own process would charge the gateway's
work (and its GIL) to the runner it measures.

    python -m recipe.atropos.benchmarks.gateway_process SERVER_URL PORT open|closed
"""

from __future__ import annotations

import sys
import time

from recipe.atropos.server_process import LOOPBACK_HOST, ServerProcess, find_free_loopback_port


def start_gateway_process(server_url: str, open_gate: bool = True) -> ServerProcess:
    """A gateway in front of `server_url` on a free loopback port, open (weights version 0) or closed."""
    port = find_free_loopback_port()
    argv = [sys.executable, "-m", "recipe.atropos.benchmarks.gateway_process", server_url, str(port),
            "open" if open_gate else "closed"]
    return ServerProcess(argv, port=port).start(startup_timeout_s=180)


def main(argv: list[str]) -> int:
    from recipe.atropos.trajectory.gateway import PolicyGateway

    server_url, port, state = argv
    gateway = PolicyGateway([server_url], host=LOOPBACK_HOST, port=int(port), max_held=4096).start()
    if state == "open":
        gateway.open(0)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
