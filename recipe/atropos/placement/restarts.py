"""A rollout server that died is started again, and takes the current weights before it serves.

With `rollout_placement: separate` the rollout servers are processes of their own that environments
reach through the policy gateway the whole time; one that dies (killed, out of memory) would leave
every request failing until the run's batch timeout. `RolloutRestarts` finds a dead server by
asking each server actor for `__ray_ready__` (a Ray actor that died answers RayActorError at once;
one that is busy is left alone) and starts it again through its replica's own `launch_servers`
(verl's `RolloutReplica`: for the `hf` rollout, a new `HFRolloutServer` beside the replica's
`CheckpointEngineWorker`, under the same Ray name, where the worker's adapter finds it: the dead
actor is `ray.kill`ed first, without which Ray keeps its name taken). The new
server replaces the old one in the policy gateway and in verl's load balancer (the agent loop that
validation uses). It holds the model's initial weights: the caller (placement/weight_sync.py) syncs
the current ones before the gateway opens again.

Checks run on the trainer's thread only (at each weight swap, and between polls while a step waits
for its batch), never while the actor's workers are busy with a step: the sync that follows a
restart uses them.
"""

from __future__ import annotations

import logging
from typing import Any

import ray
from ray.exceptions import RayActorError
from tenacity import retry, retry_if_exception_type, stop_after_delay, wait_fixed

logger = logging.getLogger("verl.recipe.atropos")


class RolloutRestarts:
    """Finds rollout servers that died and starts them again (see the module's docstring)."""

    def __init__(self, llm_server_manager: Any, gateway: Any = None, ping_timeout_s: float = 5.0):
        self.llm_server_manager = llm_server_manager
        self.gateway = gateway
        self.ping_timeout_s = ping_timeout_s
        self.restarts = 0  # servers started again since the run began

    def dead_replicas(self) -> list[Any]:
        """Replicas with a server actor that has died (one slow to answer counts as alive)."""
        dead = []
        for replica in self.llm_server_manager.get_replicas():
            pings = [server.__ray_ready__.remote() for server in replica.servers]
            done, _ = ray.wait(pings, num_returns=len(pings), timeout=self.ping_timeout_s)
            for ping in done:
                try:
                    ray.get(ping)
                except RayActorError:
                    dead.append(replica)
                    break
        return dead

    async def restart(self, replicas: list[Any]) -> None:
        """Start each replica's server again; the gateway and verl's load balancer use the new one."""
        for replica in replicas:
            old_address = replica.server_address
            for server in replica.servers:
                ray.kill(server)  # Ray keeps a dead actor's name taken until it is killed
            await _launch(replica)
            new_address = replica.server_address
            self._replace(old_address, new_address, replica.server_handle)
            self.restarts += 1
            logger.warning("rollout replica %d: its server died and was started again at %s (restart %d)",
                           replica.replica_rank, new_address, self.restarts)

    def _replace(self, old_address: str, new_address: str, handle: Any) -> None:
        manager = self.llm_server_manager
        i = manager.server_addresses.index(old_address)
        manager.server_addresses[i], manager.server_handles[i] = new_address, handle
        balancer = manager.global_load_balancer
        ray.get(balancer.remove_servers.remote([old_address]))
        ray.get(balancer.add_servers.remote({new_address: handle}))
        if self.gateway is not None:
            self.gateway.replace_server(f"http://{old_address}", f"http://{new_address}")


@retry(retry=retry_if_exception_type(ValueError), wait=wait_fixed(0.5), stop=stop_after_delay(30), reraise=True)
async def _launch(replica: Any) -> None:
    """`launch_servers` again (ActorAlreadyExistsError, a ValueError, while Ray still holds the name)."""
    await replica.launch_servers()
