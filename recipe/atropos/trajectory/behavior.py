"""What the policy gateway generated: per completion, the weights version that produced it and the
sampled tokens' log-probs under those weights (the *behaviour policy* of each trained token).

Every token an environment trains on in trajectory mode was generated through the gateway, which
knows which weights the servers held at the time (it is closed around each weight sync). The
gateway records each completion here; the trainer looks up each pulled sample's generated tokens to
know how stale it is and which log-probs sampled it (verl's `rollout_log_probs`, which its
`algorithm.rollout_correction` uses).

Keys are the exact completion token ids, and with them the exact context they followed (the prompt ids
the server was sent) where the gateway knows it: the same completion after two prompts (a lone
end-of-sequence token, a one-token answer) was sampled with different log-probs, and only its context
tells which. A sample is looked up by its context first (everything before the completion in its
sequence), then by the completion alone (an environment whose sequence does not repeat the prompt ids
the server saw); of several versions' records, the one nearest the log-probs the environment got, where
it sent them, else the newest. An environment that re-tokenizes the text it got back may
train on different ids: such a sample is not found (the trainer counts it). Memory is bounded by
keeping the completions of the last `keep_versions` weights versions only; of the
`keep_evicted_versions` versions before them only a 64-bit hash per completion is kept (8 bytes),
so that a sample older than the window is known as such (`evicted_version`), not mistaken for one
the gateway never generated. With a journal (behavior_journal.py, beside verl's checkpoints) the
same holds for completions recorded before the trainer restarted from a checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from recipe.atropos.trajectory.behavior_journal import BehaviorJournal


@dataclasses.dataclass(frozen=True)
class BehaviorRecord:
    """One completion as the gateway saw it."""

    version: int | None  # the training step whose weights generated it (the gateway's `global_steps`)
    logprobs_T: np.ndarray  # float32 [T]: each sampled token's log-prob under those weights
    recorded_at: float = 0.0  # wall-clock time (time.time()) the gateway had the answer: when it was generated


def token_key(token_ids: Sequence[int] | np.ndarray) -> bytes:
    """The lookup key of a token sequence (int64 bytes: the same for lists, tuples and arrays)."""
    return np.asarray(token_ids, dtype=np.int64).tobytes()


def context_key(context_ids: Sequence[int] | np.ndarray, token_ids: Sequence[int] | np.ndarray) -> bytes:
    """The lookup key of a completion after its context (a 128-bit digest: contexts are long)."""
    context = token_key(context_ids)
    return hashlib.blake2b(len(context).to_bytes(8, "little") + context + token_key(token_ids), digest_size=16).digest()


class BehaviorRecords:
    """Completions of the last `keep_versions` weights versions; written on the gateway's loop, read
    from the trainer's thread (one lock; each call holds it for a dict operation)."""

    def __init__(self, keep_versions: int = 16, keep_evicted_versions: int = 64):
        if keep_versions < 1:
            raise ValueError(f"keep_versions must be >= 1, got {keep_versions}")
        self.keep_versions = keep_versions
        self.keep_evicted_versions = keep_evicted_versions
        self._by_version: OrderedDict[int | None, dict[bytes, BehaviorRecord]] = OrderedDict()
        # The same records by `context_key`, where the gateway knew the prompt; evicted with their version.
        self._in_context: dict[int | None, dict[bytes, BehaviorRecord]] = {}
        # Versions evicted from the window: their completions' sorted 64-bit key hashes.
        self._evicted_hashes: OrderedDict[int | None, np.ndarray] = OrderedDict()
        # Completions recorded before a restart (read from the journal): version -> sorted key hashes.
        self._restored_hashes: dict[int, np.ndarray] = {}
        self.journal: BehaviorJournal | None = None
        self._lock = threading.Lock()
        self.recorded = 0  # completions recorded since start
        self.evicted = 0  # records dropped with their version
        self.collisions = 0  # the same tokens generated again in one version (by completion alone, the newest is kept)

    def add(self, version: int | None, token_ids: Sequence[int], logprobs: Sequence[float],
            prompt_ids: Sequence[int] | None = None) -> None:
        """Record one completion; `logprobs` has one entry per token of `token_ids`; `prompt_ids`: the
        token ids it followed, where known."""
        if len(token_ids) != len(logprobs):
            raise ValueError(f"{len(token_ids)} token ids but {len(logprobs)} log-probs")
        record = BehaviorRecord(version, np.asarray(logprobs, dtype=np.float32), time.time())
        key = token_key(token_ids)
        in_context = context_key(prompt_ids, token_ids) if prompt_ids is not None else None
        with self._lock:
            records = self._by_version.get(version)
            if records is None:
                records = self._by_version[version] = {}
                self._evict()
            if key in records:
                self.collisions += 1
            records[key] = record
            if in_context is not None:
                self._in_context.setdefault(version, {})[in_context] = record
            self.recorded += 1
            if self.journal is not None and self.journal.started:
                self.journal.append(version, _hash64(key))

    def use_journal(self, journal: BehaviorJournal) -> None:
        """Journal every completion; the first `new_version` starts it (a resume reads it back)."""
        with self._lock:
            self.journal = journal

    def new_version(self, version: int | None) -> None:
        """The servers now hold `version`'s weights: versions older than the window are dropped."""
        with self._lock:
            if self.journal is not None:
                if not self.journal.started:
                    self._restored_hashes = self.journal.start(version)
                self.journal.new_version(version)
            self._by_version.setdefault(version, {})
            self._evict()

    def _evict(self) -> None:
        while len(self._by_version) > self.keep_versions:
            version, dropped = self._by_version.popitem(last=False)
            self._in_context.pop(version, None)
            self.evicted += len(dropped)
            if self.keep_evicted_versions > 0:
                self._evicted_hashes[version] = np.sort(np.fromiter((_hash64(k) for k in dropped), dtype=np.uint64,
                                                                    count=len(dropped)))
                while len(self._evicted_hashes) > self.keep_evicted_versions:
                    self._evicted_hashes.popitem(last=False)

    def lookup(self, token_ids: Sequence[int] | np.ndarray) -> BehaviorRecord | None:
        """The newest record of exactly these tokens, whatever they followed, or None."""
        return self.find(token_ids)[0]

    def find(self, token_ids: Sequence[int] | np.ndarray, context_ids: Sequence[int] | np.ndarray | None = None,
             env_logprobs: np.ndarray | None = None) -> tuple[BehaviorRecord | None, bool]:
        """(The record of exactly these tokens, or None; whether it was found after exactly
        `context_ids`, else by the tokens alone). Of several versions' records: the one nearest
        `env_logprobs` (what the environment got for these tokens), else the newest."""
        key = token_key(token_ids)
        in_context = context_key(context_ids, token_ids) if context_ids is not None else None
        with self._lock:
            found = []
            if in_context is not None:
                found = [records[in_context] for version in reversed(self._by_version)
                         if in_context in (records := self._in_context.get(version, {}))]
            by_context = bool(found)
            if not found:
                found = [records[key] for records in reversed(self._by_version.values()) if key in records]
        if len(found) > 1 and env_logprobs is not None and len(env_logprobs) == len(found[0].logprobs_T):
            return min(found, key=lambda r: float(np.max(np.abs(r.logprobs_T - env_logprobs)))), by_context
        return (found[0] if found else None), by_context

    def evicted_version(self, token_ids: Sequence[int] | np.ndarray) -> int | None:
        """The version of a completion with exactly these tokens that has left the window (the
        newest such version) or was recorded before the trainer restarted, or None: not generated,
        or evicted too long ago to say."""
        wanted = np.uint64(_hash64(token_key(token_ids)))
        with self._lock:
            known = [*reversed(self._evicted_hashes.items()), *sorted(self._restored_hashes.items(), reverse=True)]
            for version, hashes in known:
                i = int(np.searchsorted(hashes, wanted))
                if i < len(hashes) and hashes[i] == wanted:
                    return version
        return None

    def stats(self) -> dict[str, int]:
        """Counts and the bytes the records hold (keys and log-probs), for `/health` and metrics."""
        with self._lock:
            held = sum(len(r) for r in self._by_version.values())
            nbytes = sum(len(k) + v.logprobs_T.nbytes for r in self._by_version.values() for k, v in r.items())
            nbytes += sum(len(k) for r in self._in_context.values() for k in r)
            nbytes += sum(h.nbytes for h in (*self._evicted_hashes.values(), *self._restored_hashes.values()))
            return {"records": held, "versions": len(self._by_version), "bytes": nbytes, "recorded": self.recorded,
                    "evicted": self.evicted, "collisions": self.collisions,
                    "in_context": sum(len(r) for r in self._in_context.values()),
                    "restored": sum(len(h) for h in self._restored_hashes.values())}


def _hash64(key: bytes) -> int:
    """A 64-bit digest of a token key (collisions: ~n^2 / 2^65 for n completions, negligible)."""
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
