"""Stand-in Atropos environment for the trajectory-mode launcher tests.

Appends one JSON line per start to ``$TRAJ_ENV_RECORD``: its pid, argv, start time, the ``TRAJ_*``
environment variables, and the status of ``GET <--policy without /v1>/health``. Then
``--die-first N``: the first N starts exit with code 3 (a crash); later ones sleep until stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import requests


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--policy", required=True)
    parser.add_argument("--die-first", type=int, default=0)
    args, _ = parser.parse_known_args(argv)
    record_path = os.environ["TRAJ_ENV_RECORD"]
    try:
        with open(record_path) as f:
            previous = sum(1 for line in f if line.strip())
    except FileNotFoundError:
        previous = 0
    root = args.policy.rstrip("/").removesuffix("/v1")
    try:
        policy_status = requests.get(f"{root}/health", timeout=5).status_code
    except requests.RequestException as exc:
        policy_status = f"{type(exc).__name__}"
    record = {
        "pid": os.getpid(),
        "argv": argv,
        "started_at": time.time(),
        "env": {k: v for k, v in os.environ.items() if k.startswith("TRAJ_")},
        "policy_status": policy_status,
    }
    with open(record_path, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"stand-in environment: start {previous + 1}, policy {policy_status}", flush=True)
    if previous < args.die_first:
        time.sleep(0.2)
        print("stand-in environment: crashing", flush=True)
        return 3
    while True:
        time.sleep(1)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
