"""Which prompt blocks a worker's prefix cache holds, told to every watcher as it changes.

Blocks are named by content, the same way on every engine and in the router (see kv_events.proto):
the hash of a block covers the whole prefix up to its end, chained from the block before. An engine
reports what it stores and evicts to its worker's `KvEventLog`; the worker's `KvEventService`
streams the log to routers, which keep a `PrefixIndex` of the whole fleet.
"""

from __future__ import annotations

import array
import asyncio
import hashlib
import heapq
import sys
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence

from dynamo_grpc.v1 import kv_events_pb2 as events_pb

_MAX_PENDING = 4096
"""Changes queued for one watcher before it is sent a fresh snapshot instead."""
_CHUNK_BLOCKS = 16
"""Blocks of a prompt a lookup converts, and remembers the hashes of, at a time."""
_BITS_OF_BYTE = [tuple(bit for bit in range(8) if byte >> bit & 1) for byte in range(256)]
_UINT32 = next(code for code in "IL" if array.array(code).itemsize == 4)


def chain_hash(parent: int | None, block: Sequence[int]) -> int:
    """The hash of a block whose prefix before it hashes to `parent` (None for a prompt's first block)."""
    return _chain(parent, token_bytes(block))


def block_hashes(tokens: Sequence[int], block_size: int, parent: int | None = None) -> list[int]:
    """The hash of each full block of `tokens`, in order; `parent` continues a chain already started."""
    return [h for size, h in prefix_hashes(tokens, block_size, parent) if size == block_size]


def prefix_hashes(tokens: Sequence[int], block_size: int, parent: int | None = None) -> Iterator[tuple[int, int]]:
    """(tokens in the block, its chained hash) for each block of `tokens`, the last one maybe partial."""
    data = token_bytes(tokens)
    step = 4 * block_size
    for start in range(0, len(data), step):
        block = data[start:start + step]
        parent = _chain(parent, block)
        yield len(block) // 4, parent


def token_bytes(tokens: Sequence[int]) -> bytes:
    """Token ids as the hash reads them: 4-byte little-endian integers."""
    ids = array.array(_UINT32, tokens)
    if sys.byteorder == "big":
        ids.byteswap()
    return ids.tobytes()


def _chain(parent: int | None, block: bytes) -> int:
    prefix = b"" if parent is None else parent.to_bytes(8, "little")
    return int.from_bytes(hashlib.blake2b(prefix + block, digest_size=8).digest(), "little")


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
    """The router's map of which worker holds which blocks, fed by every worker's `WatchKvEvents`.

    A block maps to its holders as a bit mask over worker slots, so a block held by one worker costs one
    dict entry (the mask is that worker's, shared) and a lookup narrows the candidates with one `&` a
    block. A lookup hashes the prompt only as far as some candidate holds it, through `_BlockNames`.
    """

    def __init__(self) -> None:
        self._holders: dict[int, int] = {}
        """block hash -> bit mask of the slots of the workers holding it"""
        self._held: dict[str, set[int]] = {}
        self._bits: dict[str, int] = {}
        """worker -> the bit of its slot, 1 << slot"""
        self._slot_workers: dict[int, str] = {}
        self._free_slots: list[int] = []
        self._names = _BlockNames()
        self._by_size: dict[int, int] = {}
        """block size -> mask of the workers whose blocks are that size"""
        self.block_sizes: dict[str, int] = {}

    def apply(self, worker_id: str, change: events_pb.WatchKvEventsResponse) -> None:
        if change.reset:
            self.forget(worker_id)
        bit = self._bit(worker_id)
        self._set_block_size(worker_id, bit, change.block_size)
        held = self._held.setdefault(worker_id, set())
        holders = self._holders
        for h in change.removed_block_hashes:
            if h in held:
                held.discard(h)
                self._unhold(h, bit)
        for h in change.stored_block_hashes:
            if h not in held:
                held.add(h)
                mask = holders.get(h)
                holders[h] = bit if mask is None else mask | bit

    def forget(self, worker_id: str) -> None:
        """Drop a worker's blocks (it left, or its feed broke and will restart with a snapshot)."""
        bit = self._bits.pop(worker_id, 0)
        for h in self._held.pop(worker_id, ()):
            self._unhold(h, bit)
        if bit:
            self._set_block_size(worker_id, bit, 0)
            slot = bit.bit_length() - 1
            del self._slot_workers[slot]
            heapq.heappush(self._free_slots, slot)
        self.block_sizes.pop(worker_id, None)

    def _set_block_size(self, worker_id: str, bit: int, size: int) -> None:
        """Move a worker to the mask of its block size (0: to none)."""
        previous = self.block_sizes.get(worker_id)
        if previous == size:
            return
        if previous:
            self._by_size[previous] ^= bit
        if size:
            self._by_size[size] = self._by_size.get(size, 0) | bit
        self.block_sizes[worker_id] = size

    def _bit(self, worker_id: str) -> int:
        bit = self._bits.get(worker_id)
        if bit is None:
            slot = heapq.heappop(self._free_slots) if self._free_slots else len(self._slot_workers)
            self._slot_workers[slot] = worker_id
            bit = self._bits[worker_id] = 1 << slot
        return bit

    def _unhold(self, block_hash: int, bit: int) -> None:
        mask = self._holders[block_hash] ^ bit
        if mask:
            self._holders[block_hash] = mask
        else:
            del self._holders[block_hash]

    def blocks_held(self, worker_id: str) -> int:
        return len(self._held.get(worker_id, ()))

    def cached_tokens(self, prompt: Sequence[int], workers: Iterable[str] | None = None) -> dict[str, int]:
        """How many leading prompt tokens (whole blocks) each worker's cache holds, for those holding any;
        of `workers`, or of every worker in the index."""
        found: dict[str, int] = {}
        if workers is None:
            by_size = self._by_size
        else:
            by_size = {}
            for worker in workers:
                size = self.block_sizes.get(worker)
                if size:
                    by_size[size] = by_size.get(size, 0) | self._bits[worker]
        for size, alive in by_size.items():
            if alive:
                self._walk(prompt, size, alive, found)
        return found

    def _walk(self, prompt: Sequence[int], size: int, alive: int, found: dict[str, int]) -> None:
        """Follow the prompt's blocks while some worker of `alive` holds them; record where each one stops."""
        holders = self._holders
        depth = 0
        for hashes in self._names.of(prompt, size):
            for h in hashes:
                holding = alive & holders.get(h, 0)
                if holding != alive:
                    if depth:
                        self._found(alive ^ holding, depth * size, found)  # the workers that hold no more
                    if not holding:
                        return
                    alive = holding
                depth += 1
        if depth:
            self._found(alive, depth * size, found)

    def _found(self, mask: int, tokens: int, found: dict[str, int]) -> None:
        """Record `tokens` for every worker in `mask`, a byte of it at a time."""
        workers = self._slot_workers
        for offset, byte in enumerate(mask.to_bytes((mask.bit_length() + 7) // 8, "little")):
            if byte:
                for bit in _BITS_OF_BYTE[byte]:
                    found[workers[8 * offset + bit]] = tokens


class _BlockNames:
    """Chained block hashes of the prompts seen lately, so a prefix many prompts share (the ones whose
    lookups hit) is hashed once: BLAKE2b costs about 1 us a block in Python, a look-up here a tenth.

    A trie of chunks of `_CHUNK_BLOCKS` blocks: a chunk's entry holds its blocks' hashes (each covers the
    path to it) and the chunks seen after it. A chunk is kept once a lookup has read all of it. The trie
    holds at most `capacity` blocks; when full it starts again empty, and the prefixes in use are hashed
    once more.
    """

    def __init__(self, capacity: int = 1 << 16) -> None:
        self._capacity = capacity
        self._root: dict[bytes, tuple[tuple[int, ...], dict]] = {}
        self._size = 0

    def of(self, tokens: Sequence[int], block_size: int) -> Iterator[tuple[int, ...]]:
        """The hash of each full block of `tokens`, in order: a chunk at a time where the trie has it, else a
        block at a time, computed as the caller reads them (a lookup stops at the first block no worker
        holds: the rest of the prompt is not even converted)."""
        if self._size >= self._capacity:
            self._root, self._size = {}, 0
        node, parent = self._root, None
        step = 4 * block_size
        chunk = _CHUNK_BLOCKS * block_size
        for first in range(0, len(tokens) - block_size + 1, chunk):
            data = token_bytes(tokens[first:first + chunk])
            entry = node.get(data)
            if entry is None:
                hashes = []
                for start in range(0, len(data) - step + 1, step):
                    parent = _chain(parent, data[start:start + step])
                    hashes.append(parent)
                    yield (parent,)
                entry = node[data] = (tuple(hashes), {})  # the caller read all of it
                self._size += len(hashes)
            else:
                yield entry[0]
                parent = entry[0][-1]
            node = entry[1]
