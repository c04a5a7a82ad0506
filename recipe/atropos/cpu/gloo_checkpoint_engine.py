"""verl checkpoint engine "gloo": the actor's weights to rollout servers on their own processes, on CPU.

verl moves weights to rollout replicas on a resource pool of their own (separate placement,
`trainer.atropos.rollout_placement: separate`) through a checkpoint engine other than `naive`, and
every backend verl 0.9.1 ships (nccl, hccl, nixl, kimi, mooncake) needs an accelerator or RDMA.
This one is registered in verl's own `CheckpointEngineRegistry` (the CPU plugin imports this module
in every process) and drives verl's sequence unchanged (`CheckpointEngineManager.update_weights`):

- `prepare`: actor rank 0 opens a `TCPStore` on a free port of its node;
- `build_topology`: actor rank 0 sends (rank 0), the other actor ranks only walk the weight
  generator (producing a full tensor is collective over the actor's FSDP ranks), every rollout
  worker receives (ranks 1..n);
- `init_process_group`: a gloo group of its own from that store (torch's default group belongs to
  FSDP), rebuilt at every sync;
- `send_weights` / `receive_weights`: buckets of at most `update_weights_bucket_megabytes`, cut and
  joined by verl's `split_weight_chunks` / `merge_weight_chunks`; each bucket's tensor metadata goes
  through the store, its bytes through one gloo broadcast;
- `finalize`: the group and the store are dropped.
"""

from __future__ import annotations

import dataclasses
import datetime
import pickle
from collections.abc import AsyncGenerator, Generator
from typing import Any

import torch
import torch.distributed as dist

from verl.checkpoint_engine.base import (
    CheckpointEngine,
    CheckpointEngineRegistry,
    merge_weight_chunks,
    split_weight_chunks,
)

BACKEND = "gloo"
TIMEOUT = datetime.timedelta(seconds=600)


@dataclasses.dataclass(frozen=True)
class StoreAddress:
    """Where actor rank 0's TCPStore listens (its node's address)."""

    host: str
    port: int


def _node_address() -> str:
    import ray

    return ray.util.get_node_ip_address().strip("[]")


@CheckpointEngineRegistry.register(BACKEND)
class GlooCheckpointEngine(CheckpointEngine):
    """Weights over a gloo broadcast from actor rank 0 to every rollout worker (CPU tensors)."""

    def __init__(self, bucket_size: int, is_master: bool = False, **_: Any) -> None:
        self.bucket_size = bucket_size
        self.is_master = is_master
        self.rank: int | None = None
        self._store: dist.TCPStore | None = None
        self._group: Any = None
        self._bucket = 0

    def prepare(self) -> StoreAddress | None:
        if not self.is_master:
            return None
        host = _node_address()
        self._store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False, timeout=TIMEOUT)
        return StoreAddress(host, self._store.port)

    @classmethod
    def build_topology(cls, actor_wg_world_size: int, rollout_world_size: int, metadata: list[Any]):
        address = metadata[0]
        if not isinstance(address, StoreAddress):
            raise RuntimeError("checkpoint_engine.backend=gloo: actor rank 0 opened no store (is_master unset?)")
        world_size = 1 + rollout_world_size
        actor = {"rank": [0] + [-1] * (actor_wg_world_size - 1), "world_size": [world_size] * actor_wg_world_size,
                 "address": [address] * actor_wg_world_size}
        rollout = {"rank": list(range(1, world_size)), "world_size": [world_size] * rollout_world_size,
                   "address": [address] * rollout_world_size}
        return actor, rollout

    def init_process_group(self, rank: int, world_size: int, address: StoreAddress) -> None:
        self.rank, self._bucket = rank, 0
        if rank < 0:
            return
        if self._store is None:
            self._store = dist.TCPStore(address.host, address.port, is_master=False, timeout=TIMEOUT)
        options = dist.ProcessGroupGloo._Options()
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=_node_address())]
        options._timeout = TIMEOUT
        self._group = dist.ProcessGroupGloo(self._store, rank, world_size, options)

    def finalize(self) -> None:
        self._group = None
        self._store = None
        self.rank = None

    @torch.no_grad()
    async def send_weights(self, weights: Generator[tuple[str, torch.Tensor], None, None], global_steps: int | None = None):
        if self.rank is None or self.rank < 0:
            for _name, _weight in weights:  # the other actor ranks' part of each collective gather
                pass
            return {}
        metas, chunks, size = [], [], 0
        async for meta, chunk in split_weight_chunks(weights, self.bucket_size):
            if size + meta.chunk_size > self.bucket_size and chunks:
                self._broadcast(metas, chunks, last=False)
                metas, chunks, size = [], [], 0
            meta.offset = size
            metas.append(meta)
            chunks.append(chunk.detach().to("cpu").contiguous())
            size += meta.chunk_size
        self._broadcast(metas, chunks, last=True)
        return {}

    def _broadcast(self, metas: list, chunks: list[torch.Tensor], last: bool) -> None:
        bucket = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.uint8)
        self._store.set(f"bucket/{self._bucket}", pickle.dumps((metas, len(bucket), last)))
        self._bucket += 1
        if len(bucket):
            self._group.broadcast(bucket, 0).wait()

    async def receive_weights(self, global_steps: int | None = None) -> AsyncGenerator[tuple[str, torch.Tensor], None]:
        async for name, weight in merge_weight_chunks(self._receive_chunks(), self.bucket_size):
            yield name, weight

    async def _receive_chunks(self):
        last = False
        while not last:
            metas, length, last = pickle.loads(self._store.get(f"bucket/{self._bucket}"))
            self._bucket += 1
            bucket = torch.empty(length, dtype=torch.uint8)
            if length:
                self._group.broadcast(bucket, 0).wait()
            for meta in metas:
                # A copy: the next bucket must not be written under a tensor still being loaded.
                yield meta, bucket[meta.offset: meta.offset + meta.chunk_size].clone()
