"""vLLM's KV cache events, renamed into our engine-independent block hashes.

vLLM's engine core publishes what its prefix cache stores and evicts on a ZMQ socket, naming blocks by
its own hashes (salted per process, so no router could recompute them). Each stored batch also carries
its tokens and its parent block, which is all our chained hash needs: `VllmKvEvents` remembers vLLM's
name -> ours for every cached block and replays the changes into the worker's `KvEventLog`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import threading
import uuid
from collections.abc import Callable
from typing import Any

from dynamo_grpc.kv.events import KvEventLog, block_hashes

log = logging.getLogger(__name__)

_POLL_MS = 100


def new_endpoint() -> str:
    """A ZMQ IPC address for one engine's events (IPC paths must stay short)."""
    return f"ipc://{tempfile.gettempdir()}/dgkv-{os.getpid()}-{uuid.uuid4().hex[:8]}.sock"


class EventTranslator:
    """vLLM block hashes -> ours, for the blocks vLLM caches now. Not thread-safe: one feed owns it."""

    def __init__(self) -> None:
        self._ours: dict[Any, int] = {}
        self.skipped = 0
        """Stored batches whose parent block was never seen (events lost): they cannot be named."""

    def __len__(self) -> int:
        return len(self._ours)

    def stored(self, vllm_hashes: list[Any], parent: Any, token_ids: list[int], block_size: int) -> list[int]:
        if parent is None:
            ours = None
        elif parent in self._ours:
            ours = self._ours[parent]
        else:
            self.skipped += 1
            return []
        named = block_hashes(token_ids[:len(vllm_hashes) * block_size], block_size, parent=ours)
        self._ours.update(zip(vllm_hashes, named, strict=True))
        return named

    def removed(self, vllm_hashes: list[Any]) -> list[int]:
        return [h for h in (self._ours.pop(v, None) for v in vllm_hashes) if h is not None]

    def cleared(self) -> None:
        self._ours.clear()


class VllmKvEvents:
    """Subscribes to one engine core's KV events on a thread and applies them to `events` on `loop`."""

    def __init__(self, endpoint: str, events: KvEventLog, loop: asyncio.AbstractEventLoop) -> None:
        import msgspec
        import zmq
        from vllm.distributed.kv_events import KVEventBatch

        self.endpoint = endpoint
        self._events = events
        self._loop = loop
        self._translator = EventTranslator()
        self._decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
        self._socket = zmq.Context.instance().socket(zmq.SUB)
        self._socket.setsockopt(zmq.SUBSCRIBE, b"")
        self._socket.connect(endpoint)
        self._stopping = threading.Event()
        self._next_seq: int | None = None
        self._thread = threading.Thread(target=self._run, name="vllm-kv-events", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=2)
        self._socket.close(linger=0)
        if self.endpoint.startswith("ipc://"):
            try:
                os.unlink(self.endpoint.removeprefix("ipc://"))
            except FileNotFoundError:
                pass

    def _run(self) -> None:
        while not self._stopping.is_set():
            if not self._socket.poll(_POLL_MS):
                continue
            _topic, seq_bytes, payload = self._socket.recv_multipart()
            seq = int.from_bytes(seq_bytes, "big")
            if self._next_seq is not None and seq != self._next_seq:
                log.warning("vLLM KV events %d..%d were lost; the router's view of this worker's cache may "
                            "miss blocks until they are evicted or stored again", self._next_seq, seq - 1)
            self._next_seq = seq + 1
            try:
                self._apply(self._decoder.decode(payload).events)
            except Exception:  # a bad batch must not end the feed
                log.exception("could not apply a vLLM KV event batch")

    def _apply(self, batch: list[Any]) -> None:
        from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored

        for event in batch:
            if isinstance(event, BlockStored):
                self._hand_over(self._events.stored, self._translator.stored(
                    event.block_hashes, event.parent_block_hash, event.token_ids, event.block_size))
            elif isinstance(event, BlockRemoved):
                self._hand_over(self._events.removed, self._translator.removed(event.block_hashes))
            elif isinstance(event, AllBlocksCleared):
                self._translator.cleared()
                self._loop.call_soon_threadsafe(self._events.cleared)

    def _hand_over(self, apply: Callable[[list[int]], None], hashes: list[int]) -> None:
        if hashes:
            self._loop.call_soon_threadsafe(apply, hashes)
