"""Ray's own view of a multi-node run, for recipe/atropos/tests/test_multinode.py.

    python -m recipe.atropos.tests.multinode_probe observe --address HEAD:6379 --out actors.json
        Polls Ray's state API (alive nodes, actors) until killed; after every poll, writes every
        actor seen so far with its node id and that node's address.
    python -m recipe.atropos.tests.multinode_probe core-algos --address HEAD:6379 --node-ip IP [--working-dir DIR]
        Runs one actor pinned to the node with address IP and prints, as JSON, which core_algos
        it imports and what the GRPO function does with a token-level override there.

Run on a node of the cluster (inside its network namespace), with RAY_AUTH_TOKEN when the cluster
uses token auth.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def observe(address: str, out: str, interval_s: float) -> None:
    from ray.util.state import list_actors, list_nodes

    seen: dict[str, dict] = {}
    nodes: dict[str, str] = {}
    while True:
        try:
            nodes.update({n.node_id: n.node_ip for n in list_nodes(address=address, raise_on_missing_output=False)})
            for actor in list_actors(address=address, limit=1000, raise_on_missing_output=False):
                seen[actor.actor_id] = {"class_name": actor.class_name, "name": actor.name, "node_id": actor.node_id,
                                        "pid": actor.pid, "state": actor.state}
        except Exception as exc:  # the cluster is starting or stopping: try again
            print(f"multinode_probe: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        for record in seen.values():
            record["node_ip"] = nodes.get(record["node_id"])
        tmp = f"{out}.tmp"
        with open(tmp, "w") as f:
            json.dump({"nodes": nodes, "actors": list(seen.values())}, f)
        os.replace(tmp, out)
        time.sleep(interval_s)


def _report() -> dict:
    """In the pinned actor: where core_algos comes from, and whether the override path runs here."""
    import numpy as np
    import ray
    import torch

    from verl.trainer.ppo import core_algos

    rewards_BT = torch.zeros(4, 3)
    rewards_BT[:, -1] = torch.tensor([1.0, 0.0, 1.0, 0.0])
    mask_BT = torch.ones(4, 3)
    override_BT = torch.full((4, 3), 0.25)
    try:
        advantages_BT, _ = core_algos.compute_grpo_outcome_advantage(
            token_level_rewards=rewards_BT, response_mask=mask_BT, index=np.array(["a", "a", "b", "b"]),
            token_level_advantages=override_BT, advantage_override_mask=torch.ones(4, dtype=torch.bool),
        )
        override = advantages_BT.tolist()
    except TypeError as exc:  # the installed function takes no token_level_advantages
        override = f"TypeError: {exc}"
    return {
        "node_ip": ray.util.get_node_ip_address(),
        "core_algos_file": core_algos.__file__,
        "registry_grpo_file": core_algos.get_adv_estimator_fn("grpo").__code__.co_filename,
        "override": override,
        "cwd": os.getcwd(),
    }


def core_algos_on(address: str, node_ip: str, working_dir: str | None) -> dict:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    runtime_env = None
    if working_dir:
        runtime_env = {"working_dir": working_dir, "excludes": [".venv", ".venv-*", ".git", "outputs", "build", "*.egg-info"]}
    ray.init(address=address, runtime_env=runtime_env, logging_level="ERROR", log_to_driver=False)
    try:
        (node_id,) = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeManagerAddress"] == node_ip]
        strategy = NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)
        task = ray.remote(num_cpus=0)(_report).options(scheduling_strategy=strategy)
        return ray.get(task.remote(), timeout=300)
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    obs = sub.add_parser("observe")
    obs.add_argument("--address", required=True)
    obs.add_argument("--out", required=True)
    obs.add_argument("--interval", type=float, default=2.0)
    core = sub.add_parser("core-algos")
    core.add_argument("--address", required=True)
    core.add_argument("--node-ip", required=True)
    core.add_argument("--working-dir", default=None, help="ship this folder as Ray's runtime_env working_dir")
    args = parser.parse_args(argv)
    if args.command == "observe":
        observe(args.address, args.out, args.interval)
        return 0
    print(json.dumps(core_algos_on(args.address, args.node_ip, args.working_dir)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
