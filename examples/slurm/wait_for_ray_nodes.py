"""Wait until a Ray cluster has a number of alive nodes (used by ray_on_slurm.slurm).

    python examples/slurm/wait_for_ray_nodes.py --address HEAD_IP:6379 --nodes 4 --timeout 300

Why: verl checks the cluster's GPUs once, when it builds its resource pools; a trainer started
while worker nodes are still joining fails with "not enough resources". A fixed ``sleep`` is either
too short on a busy cluster or wasted time on a quiet one.
Exit code 0 once ``--nodes`` nodes are alive, 1 on timeout (naming what it saw).
"""

from __future__ import annotations

import argparse
import socket
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", required=True, help="Ray head's GCS address, HOST:PORT")
    parser.add_argument("--nodes", type=int, required=True, help="alive nodes to wait for (the head included)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before giving up (default 300)")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between checks (default 2)")
    args = parser.parse_args(argv)

    import ray  # here, so that --help works without Ray

    deadline = time.monotonic() + args.timeout
    seen = "no connection to the head yet"
    connected = False
    while time.monotonic() < deadline:
        try:
            if not connected:
                _check_port_open(args.address)  # ray.init itself blocks for long on a head that is not up
                ray.init(address=args.address, logging_level="ERROR", log_to_driver=False)
                connected = True
            alive = [n for n in ray.nodes() if n.get("Alive")]
            gpus = ray.cluster_resources().get("GPU", 0)
            seen = f"{len(alive)} of {args.nodes} node(s) alive, {gpus:g} GPU(s)"
            if len(alive) >= args.nodes:
                print(f"wait_for_ray_nodes: {seen}", flush=True)
                ray.shutdown()
                return 0
        except (OSError, RuntimeError) as exc:  # head not up yet (ConnectionError is an OSError)
            seen = f"cannot connect to {args.address}: {exc}"
        print(f"wait_for_ray_nodes: {seen}; waiting", flush=True)
        time.sleep(args.interval)
    print(f"wait_for_ray_nodes: timed out after {args.timeout:g} s: {seen}", file=sys.stderr, flush=True)
    return 1


def _check_port_open(address: str) -> None:
    """Raise ConnectionError unless something accepts TCP connections at HOST:PORT."""
    host, _, port = address.rpartition(":")
    with socket.create_connection((host.strip("[]"), int(port)), timeout=2.0):
        pass


if __name__ == "__main__":
    sys.exit(main())
