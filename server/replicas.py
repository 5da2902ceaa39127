"""Data parallelism: several engine replicas behind one front, each on its own slice of the mesh.

`--mesh data=D,sequence=S,tensor=T` builds D engines, each over S x T devices with its own
weights, page pool, cache manager and engine thread (an `EngineLoop`); `Replicas` puts them
behind the one interface the servicer uses (submit, call, stats). Routing:
- a request naming a named cache goes to the replica that pinned the cache (only it holds the
  pages); creating a cache picks a replica and remembers it;
- any other request goes to the replica with the least work (running plus waiting), ties broken
  by a hash of the prompt's first page, so repeated prefixes tend to meet their prefix cache.
Replicas never talk to each other: data parallelism needs no collectives. Stats and the
Prometheus gauges are sums over replicas.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import threading
from typing import Callable

from server.engine_loop import EngineLoop, Stats, Stream
from server.kv_manager import KVStats
from server.metrics import Metrics
from server.validation import GenerationRequest


class ReplicaMetrics:
    """One replica's view of the shared Metrics: counters and histograms go straight through;
    gauges are set to the sum of every replica's last snapshot."""

    def __init__(self, metrics: Metrics, snapshots: list, index: int, lock: threading.Lock):
        self._metrics, self._snapshots, self._index, self._lock = metrics, snapshots, index, lock

    def __getattr__(self, name: str):
        return getattr(self._metrics, name)

    def set_snapshot(self, *values: int) -> None:
        with self._lock:
            self._snapshots[self._index] = values
            total = [sum(column) for column in zip(*self._snapshots)]
        self._metrics.set_snapshot(*total)


def replica_metrics(metrics: Metrics, count: int) -> list[ReplicaMetrics]:
    snapshots = [(0, 0, 0, 0, 0, 0)] * count
    lock = threading.Lock()
    return [ReplicaMetrics(metrics, snapshots, i, lock) for i in range(count)]


class Replicas:
    """`EngineLoop`s behind one front; see the module note."""

    def __init__(self, loops: list[EngineLoop], metrics: Metrics):
        if not loops:
            raise ValueError("Replicas needs at least one engine loop")
        self.loops = loops
        self._metrics = metrics
        self._pins: dict[str, int] = {}  # named cache -> the replica holding its pages

    @property
    def metrics(self) -> Metrics:
        return self._metrics

    def start(self) -> None:
        for loop in self.loops:
            loop.start()

    def stop(self, timeout: float = 10.0) -> None:
        for loop in self.loops:
            loop.stop(timeout)

    def _least_loaded(self, request: GenerationRequest) -> int:
        loads = []
        for i, loop in enumerate(self.loops):
            stats = loop.stats()
            if stats.serving:
                loads.append((stats.running + stats.waiting, i))
        if not loads:
            return 0  # every replica is down: its submit says so
        least = min(load for load, _ in loads)
        tied = [i for load, i in loads if load == least]
        digest = hashlib.blake2b(repr(request.prompt_ids[:16]).encode(), digest_size=4).digest()
        return tied[int.from_bytes(digest, "little") % len(tied)]

    def submit(self, request: GenerationRequest, received_at: float,
               affinity: str | None = None) -> Stream:
        """Queues a request on its replica (`affinity`: the named cache it uses)."""
        index = self._pins.get(affinity) if affinity is not None else None
        if index is None:
            index = self._least_loaded(request)
        stream = self.loops[index].submit(request, received_at)
        if request.pin_as is not None:
            self._pins[request.pin_as] = index
        return stream

    def call(self, fn: Callable, affinity: str | None = None) -> asyncio.Future:
        """Runs `fn(kv_manager)` on the replica holding `affinity`'s pages, or on every replica
        (the first one's result) when no replica is known for it."""
        index = self._pins.get(affinity) if affinity is not None else None
        if index is not None:
            return self.loops[index].call(fn)
        futures = [loop.call(fn) for loop in self.loops]
        return asyncio.ensure_future(_first(futures))

    def forget(self, name: str) -> None:
        """A named cache is gone: requests naming it no longer have a home."""
        self._pins.pop(name, None)

    def pool_tokens_free_of_pins(self) -> int:
        return max(loop.pool_tokens_free_of_pins() for loop in self.loops)

    def stats(self) -> Stats:
        parts = [loop.stats() for loop in self.loops]
        return parts[0] if len(parts) == 1 else sum_stats(parts)


def sum_stats(parts: list[Stats]) -> Stats:
    """Several replicas' stats as one, field by field from the dataclass itself, so a field
    added to Stats is summed too (or refused here, if no rule fits its type)."""
    fields = {}
    for field in dataclasses.fields(Stats):
        values = [getattr(part, field.name) for part in parts]
        if field.name == "kv":
            fields["kv"] = None if any(v is None for v in values) else sum_kv(values)
        elif isinstance(values[0], bool):
            fields[field.name] = all(values)  # serving: only when every replica serves
        elif isinstance(values[0], collections.Counter):
            fields[field.name] = sum(values, collections.Counter())
        elif isinstance(values[0], int):
            fields[field.name] = sum(values)
        else:
            raise TypeError(f"Stats.{field.name}: no rule to add {type(values[0]).__name__} "
                            "values across replicas")
    return Stats(**fields)


def sum_kv(stats: list[KVStats]) -> KVStats:
    """KV snapshots of several pools as one: counts add up, per-rank counts add rank by rank."""
    def add(field):
        values = [getattr(s, field) for s in stats]
        if isinstance(values[0], tuple):
            return tuple(sum(column) for column in zip(*values))
        return sum(values)

    fields = {f.name: add(f.name) for f in dataclasses.fields(KVStats)}
    fields["block_size"] = stats[0].block_size
    fields["num_ranks"] = stats[0].num_ranks * len(stats)
    # Each pool has a null block per rank: count every pool's ranks, so allocatable
    # (total - num_ranks) stays right. (max_request_blocks means nothing across pools: a request
    # lives in one; each replica's engine loop reads its own.)
    for name in ("free_per_rank", "used_per_rank", "pinned_per_rank"):
        fields[name] = tuple(v for s in stats for v in getattr(s, name))
    return KVStats(**fields)


async def _first(futures):
    results = await asyncio.gather(*futures)
    return results[0]
