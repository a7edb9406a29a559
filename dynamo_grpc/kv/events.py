"""Which prompt blocks a worker's prefix cache holds, told to every watcher as it changes.

Blocks are named by content, the same way on every engine and in the router (see kv_events.proto):
the hash of a block covers the whole prefix up to its end, chained from the block before. An engine
reports what it stores and evicts to its worker's `KvEventLog`; the worker's `KvEventService`
streams the log to routers, which keep a `PrefixIndex` of the whole fleet.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence

import numpy as np

from dynamo_grpc.v1 import kv_events_pb2 as events_pb

_MAX_PENDING = 4096
"""Changes queued for one watcher before it is sent a fresh snapshot instead."""


def chain_hash(parent: int | None, block: Sequence[int]) -> int:
    """The hash of a block whose prefix before it hashes to `parent` (None for a prompt's first block)."""
    return _chain(parent, np.asarray(block, dtype="<u4").tobytes())


def block_hashes(tokens: Sequence[int], block_size: int, parent: int | None = None) -> list[int]:
    """The hash of each full block of `tokens`, in order; `parent` continues a chain already started."""
    return [h for size, h in prefix_hashes(tokens, block_size, parent) if size == block_size]


def prefix_hashes(tokens: Sequence[int], block_size: int, parent: int | None = None) -> Iterator[tuple[int, int]]:
    """(tokens in the block, its chained hash) for each block of `tokens`, the last one maybe partial."""
    data = np.asarray(tokens, dtype="<u4").tobytes()
    step = 4 * block_size
    for start in range(0, len(data), step):
        block = data[start:start + step]
        parent = _chain(parent, block)
        yield len(block) // 4, parent


def _chain(parent: int | None, block: bytes) -> int:
    digest = hashlib.blake2b(digest_size=8)
    if parent is not None:
        digest.update(parent.to_bytes(8, "little"))
    digest.update(block)
    return int.from_bytes(digest.digest(), "little")


class KvEventLog:
    """The block hashes one engine's prefix cache holds now, and a feed of their changes.

    Call it from the event loop; an engine that reports from another thread hands its calls over
    with `loop.call_soon_threadsafe`.
    """

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._cached: dict[int, None] = {}  # an ordered set: snapshots list blocks oldest first
        self._watchers: set[_Watcher] = set()

    def __len__(self) -> int:
        return len(self._cached)

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self._cached

    def stored(self, hashes: Iterable[int]) -> None:
        new = [h for h in dict.fromkeys(hashes) if h not in self._cached]
        if new:
            self._cached.update(dict.fromkeys(new))
            self._publish(events_pb.WatchKvEventsResponse(stored_block_hashes=new, block_size=self.block_size))

    def removed(self, hashes: Iterable[int]) -> None:
        gone = [h for h in dict.fromkeys(hashes) if h in self._cached]
        for h in gone:
            del self._cached[h]
        if gone:
            self._publish(events_pb.WatchKvEventsResponse(removed_block_hashes=gone, block_size=self.block_size))

    def cleared(self) -> None:
        self._cached.clear()
        self._publish(self.snapshot())

    def snapshot(self) -> events_pb.WatchKvEventsResponse:
        return events_pb.WatchKvEventsResponse(reset=True, stored_block_hashes=list(self._cached),
                                               block_size=self.block_size)

    async def watch(self) -> AsyncIterator[events_pb.WatchKvEventsResponse]:
        """Everything cached now, then each change; a watcher too slow for the changes gets a new snapshot."""
        watcher = _Watcher()
        self._watchers.add(watcher)
        try:
            yield self.snapshot()
            while True:
                await watcher.ready.wait()
                watcher.ready.clear()
                if watcher.overflowed:
                    watcher.overflowed, watcher.pending = False, []
                    yield self.snapshot()
                    continue
                pending, watcher.pending = watcher.pending, []
                for change in pending:
                    yield change
        finally:
            self._watchers.discard(watcher)

    def _publish(self, change: events_pb.WatchKvEventsResponse) -> None:
        for watcher in self._watchers:
            if len(watcher.pending) >= _MAX_PENDING:
                watcher.overflowed = True
            else:
                watcher.pending.append(change)
            watcher.ready.set()


class _Watcher:
    def __init__(self) -> None:
        self.pending: list[events_pb.WatchKvEventsResponse] = []
        self.overflowed = False
        self.ready = asyncio.Event()


class PrefixIndex:
    """The router's map of which worker holds which blocks, fed by every worker's `WatchKvEvents`."""

    def __init__(self) -> None:
        self._holders: dict[int, set[str]] = {}
        self._held: dict[str, set[int]] = {}
        self.block_sizes: dict[str, int] = {}

    def apply(self, worker_id: str, change: events_pb.WatchKvEventsResponse) -> None:
        if change.reset:
            self.forget(worker_id)
        self.block_sizes[worker_id] = change.block_size
        held = self._held.setdefault(worker_id, set())
        for h in change.removed_block_hashes:
            if h in held:
                held.discard(h)
                self._unhold(h, worker_id)
        for h in change.stored_block_hashes:
            held.add(h)
            self._holders.setdefault(h, set()).add(worker_id)

    def forget(self, worker_id: str) -> None:
        """Drop a worker's blocks (it left, or its feed broke and will restart with a snapshot)."""
        for h in self._held.pop(worker_id, ()):
            self._unhold(h, worker_id)
        self.block_sizes.pop(worker_id, None)

    def _unhold(self, block_hash: int, worker_id: str) -> None:
        holders = self._holders[block_hash]
        holders.discard(worker_id)
        if not holders:
            del self._holders[block_hash]

    def blocks_held(self, worker_id: str) -> int:
        return len(self._held.get(worker_id, ()))

    def cached_tokens(self, prompt: Sequence[int], workers: Iterable[str]) -> dict[str, int]:
        """How many leading prompt tokens (whole blocks) each worker's cache holds, for those holding any."""
        found: dict[str, int] = {}
        by_size: dict[int, list[str]] = {}
        for worker in workers:
            size = self.block_sizes.get(worker)
            if size:
                by_size.setdefault(size, []).append(worker)
        for size, group in by_size.items():
            alive = set(group)
            depth = 0
            for h in block_hashes(prompt, size):
                holding = alive & self._holders.get(h, set())
                if not holding:
                    break
                for worker in alive - holding:
                    if depth:
                        found[worker] = depth * size
                depth += 1
                alive = holding
            for worker in alive:
                if depth:
                    found[worker] = depth * size
        return found
