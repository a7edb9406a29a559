"""The decode side of KV transfer: take the KV a handle names, by the first transport that moves it.

A transport moves a held transfer's bytes from the prefill worker into this worker's memory and ends
the prefill worker's lease:
- `shm`: on the prefill worker's host, link its segment under a name of our own (no copy);
- `nixl`: READ the bytes from memory the prefill worker registered with its NIXL agent (`nixl_transport`);
- `grpc`: anywhere, pull `PullKv` chunk streams (several in parallel) into local memory, checking size
  and CRC-32; the last chunk sent frees the transfer, so no release call follows.
The transfer of a tensor-parallel engine holds one shard per rank, back to back (`KvHandle.shards`): each
transport moves them all, gRPC on streams of their own per shard, naming the rank of a corrupted one.
`KvReceiver` checks that a handle fits the request and this engine (its MAC under the deployment's KV key,
when there is one, and a size no larger than this engine's KV of the prompt), before it allocates or connects
anywhere; tries the transports, all within one deadline sized from the bytes, in the order the pairing table
gives for the pair (a transport that cannot reach the bytes, or breaks mid-transfer, hands
over to the next; the completion names the one that moved them and those that failed), and releases the
transfer. Engines only see the bytes that arrived (`ReceivedKv`), never how.
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from zlib_ng import zlib_ng

from dynamo_grpc import metrics, tracing
from dynamo_grpc.channels import ChannelPool
from dynamo_grpc.errors import (
    DeadlineExceeded,
    DynamoError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
    from_rpc_error,
)
from dynamo_grpc.kv import shm
from dynamo_grpc.kv.fingerprint import mismatch_hint
from dynamo_grpc.kv.handle_key import KvKey
from dynamo_grpc.kv.nixl_transport import NixlAgent, NixlFailure
from dynamo_grpc.kv.store import prompt_digest
from dynamo_grpc.kv.wire import PULL_KV_METHOD, parse_chunk
from dynamo_grpc.v1 import common_pb2 as pb
from dynamo_grpc.v1 import kv_transfer_pb2 as kv_pb
from dynamo_grpc.v1 import kv_transfer_pb2_grpc as kv_grpc

log = logging.getLogger(__name__)

TRANSPORT_NAMES = ("shm", "nixl", "grpc")
"""Every transport, in order of preference (as `routing.pairing.TRANSPORT_PREFERENCE`)."""
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
DEFAULT_PULL_STREAMS = max(1, min(4, _CORES // 2))
"""Parallel PullKv streams per transfer, each over its own connection: one per two cores we may run on, up
to 4. Every chunk costs Python time on both ends, so on 2 cores one stream was the fastest
(`bench/kv_transfer.py`, docs/experiments.md §5); larger hosts get more, a choice not measured there."""
_MIN_STREAM_BYTES = 4 << 20
DEFAULT_PULL_TIMEOUT_S = 10.0
DEFAULT_PULL_MIN_MIB_S = 64.0
"""A pull may take `DEFAULT_PULL_TIMEOUT_S` plus the time its bytes need at this rate (1 GiB: 16 s more)."""
# Failures that say something about the transfer itself; any other failure of a pull is the transport's.
_TRANSFER_REFUSALS = frozenset({grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED,
                                grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT,
                                grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.DATA_LOSS})


@dataclass
class ReceivedKv:
    """A prompt's KV, now this worker's: its bytes, and the shared-memory segment holding them when the
    engine asked for one (the vLLM connector reads segments by name)."""

    data: Any
    """The bytes: a mapping of the segment, or local memory."""
    stats: pb.KvTransferStats
    segment: str = ""

    def close(self) -> None:
        """Drop this worker's claim: the segment's name (the engine has read it) and the mapping, off the
        calling thread (see `shm.release_soon`)."""
        shm.release_soon(self.segment, self.data if isinstance(self.data, mmap.mmap) else None)


class KvTransport(Protocol):
    name: str
    kind: int
    """Its `KvTransport` value, by which pairing tables name it."""

    def reaches(self, handle: pb.KvHandle) -> bool:
        """Whether this transport can move the handle's bytes from here."""
        ...

    async def fetch(self, handle: pb.KvHandle, *, segment: str, fingerprint: str, request_id: str) -> ReceivedKv:
        """The handle's bytes for an engine with `fingerprint`, in a new segment named `segment` (in memory
        when it is empty). Raises `TransportFailed`, having removed whatever it made, when the transport
        could not move them (unreachable, or broken mid-transfer), so the next transport may try."""
        ...

    async def release(self, handle: pb.KvHandle, *, request_id: str) -> bool:
        """End the prefill worker's lease; False when the transfer was already gone."""
        ...


class TransportFailed(Exception):
    """A transport could not move the bytes (not a failure of the transfer itself: another may)."""


async def release_over_grpc(channels: ChannelPool, handle: pb.KvHandle, *, request_id: str,
                            require_held: bool = False) -> bool:
    """`ReleaseKv` on the prefill worker, which checks the pull token (idempotent unless `require_held`)."""
    stub = kv_grpc.KvTransferServiceStub(channels.get(handle.endpoint))
    try:
        response = await stub.ReleaseKv(kv_pb.ReleaseKvRequest(
            request_id=request_id, transfer_id=handle.transfer_id, pull_token=handle.pull_token,
            require_held=require_held), metadata=tracing.metadata())
    except grpc.aio.AioRpcError as error:
        raise from_rpc_error(error, request_id=request_id) from None
    return response.released


async def release_proving_the_lease(channels: ChannelPool, handle: pb.KvHandle, *, request_id: str) -> bool:
    """For bytes read in place or by NIXL, the release is what proves the pull token and that the lease
    held all along (the memory stays registered and mapped until the transfer is freed)."""
    if not await release_over_grpc(channels, handle, request_id=request_id, require_held=True):
        # A prefill worker that predates `require_held` answers false instead of saying why.
        raise NotFound(f"KV transfer {handle.transfer_id} is gone (lease expired or already taken); "
                       "prefill again", request_id=request_id, reason="KV_HANDLE_EXPIRED")
    return True


class ShmTransport:
    """Same host: a second name for the prefill worker's segment; the bytes are never copied."""

    name = "shm"
    kind = pb.KV_TRANSPORT_SHM

    def __init__(self, channels: ChannelPool, host: str) -> None:
        self._channels = channels
        self._host = host

    def reaches(self, handle: pb.KvHandle) -> bool:
        return bool(handle.shm_segment) and bool(self._host) and handle.host == self._host

    async def fetch(self, handle: pb.KvHandle, *, segment: str, fingerprint: str, request_id: str
                    ) -> ReceivedKv:
        name = segment or shm.new_segment_name()
        try:
            shm.link(handle.shm_segment, name)
        except (OSError, ValueError) as error:
            raise TransportFailed(f"segment {handle.shm_segment} is not reachable here ({error})") from None
        if shm.size_of(name) != handle.total_bytes:
            shm.unlink(name)
            raise TransportFailed(f"segment {handle.shm_segment} does not hold the handle's "
                                  f"{handle.total_bytes} bytes")
        stats = pb.KvTransferStats(bytes=handle.total_bytes, path=self.name)
        if segment:  # the engine reads it by name; nothing is mapped here
            return ReceivedKv(data=None, stats=stats, segment=segment)
        data = shm.attach(name)
        shm.unlink(name)  # the mapping keeps the memory
        return ReceivedKv(data=data, stats=stats)

    async def release(self, handle: pb.KvHandle, *, request_id: str) -> bool:
        return await release_proving_the_lease(self._channels, handle, request_id=request_id)


class NixlTransport:
    """Anywhere NIXL reaches: one READ from the prefill worker's registered memory into our own."""

    name = "nixl"
    kind = pb.KV_TRANSPORT_NIXL

    def __init__(self, agent: NixlAgent, channels: ChannelPool) -> None:
        self.agent = agent
        self._channels = channels

    def reaches(self, handle: pb.KvHandle) -> bool:
        return handle.HasField("nixl")

    async def fetch(self, handle: pb.KvHandle, *, segment: str, fingerprint: str, request_id: str
                    ) -> ReceivedKv:
        started = time.perf_counter()
        size = handle.total_bytes
        buffer = shm.create(segment, size, populate=True) if segment else anonymous_buffer(size)
        try:
            registration = self.agent.register(buffer)
            try:
                await self.agent.read(handle.nixl, registration)
            finally:
                self.agent.deregister(registration)
        except BaseException as error:
            _discard(buffer, segment)
            if isinstance(error, NixlFailure):
                raise TransportFailed(str(error)) from None
            raise
        stats = pb.KvTransferStats(bytes=size, duration_us=int((time.perf_counter() - started) * 1e6),
                                   path=self.name)
        if segment:
            buffer.close()
            return ReceivedKv(data=None, stats=stats, segment=segment)
        return ReceivedKv(data=buffer, stats=stats)

    async def release(self, handle: pb.KvHandle, *, request_id: str) -> bool:
        return await release_proving_the_lease(self._channels, handle, request_id=request_id)


class GrpcTransport:
    """Anywhere: `PullKv` streams over disjoint ranges, each on its own connection, checked for size and
    CRC-32 as they arrive; the prefill worker frees the transfer once it has sent every byte."""

    name = "grpc"
    kind = pb.KV_TRANSPORT_GRPC

    def __init__(self, channels: ChannelPool, *, streams: int = DEFAULT_PULL_STREAMS) -> None:
        if streams < 1:
            raise ValueError(f"a pull needs at least one stream, got {streams}")
        self._channels = channels
        self._streams = streams

    def reaches(self, handle: pb.KvHandle) -> bool:
        return True

    async def fetch(self, handle: pb.KvHandle, *, segment: str, fingerprint: str, request_id: str
                    ) -> ReceivedKv:
        sink = _FileSink(segment, handle.total_bytes) if segment else _MemorySink(handle.total_bytes)
        try:
            stats = await self.pull(handle, fingerprint=fingerprint, request_id=request_id, write=sink.write,
                                    release=True)
        except BaseException:
            sink.discard()
            raise
        return ReceivedKv(data=sink.finish(), stats=stats, segment=segment)

    async def pull(self, handle: pb.KvHandle, *, fingerprint: str, request_id: str,
                   write: Callable[[int, memoryview], None], release: bool = False) -> pb.KvTransferStats:
        """Every byte of the transfer, handed to `write(offset, data)` (from one thread, chunks of each
        stream in order) and checked against the handle's size and CRC-32; the prefill worker checks
        `fingerprint`. With `release`, the prefill worker frees the transfer once all of it is sent."""
        started = time.perf_counter()
        ranges = _shard_ranges(handle, self._streams)
        request = kv_pb.PullKvRequest(request_id=request_id, transfer_id=handle.transfer_id,
                                      pull_token=handle.pull_token, engine_fingerprint=fingerprint,
                                      release=release)
        pulls = [asyncio.ensure_future(self._pull_range(handle.endpoint, lane, request, start, end, write))
                 for lane, (start, end) in enumerate(ranges)]
        try:
            crcs = await asyncio.gather(*pulls)
        except BaseException:
            for pull in pulls:
                pull.cancel()
            await asyncio.gather(*pulls, return_exceptions=True)
            raise
        crc = 0
        for (start, end), range_crc in zip(ranges, crcs):
            crc = zlib_ng.crc32_combine(crc, range_crc, end - start)
        if crc != handle.crc32:
            corrupt = _corrupt_ranks(handle, ranges, crcs)
            raise _data_loss(request_id, "KV bytes failed their CRC-32 check"
                             + (f" (the shards of tensor-parallel ranks {corrupt})" if corrupt else ""))
        duration_us = int((time.perf_counter() - started) * 1e6)
        return pb.KvTransferStats(bytes=handle.total_bytes, duration_us=duration_us, path=self.name)

    async def _pull_range(self, endpoint: str, lane: int, request: kv_pb.PullKvRequest, start: int, end: int,
                          write: Callable[[int, memoryview], None]) -> int:
        """Bytes [start, end) over connection `lane`; their CRC-32."""
        ranged = kv_pb.PullKvRequest()
        ranged.CopyFrom(request)
        ranged.offset, ranged.length = start, end - start
        pull_kv = self._channels.get(endpoint, lane=lane).unary_stream(
            PULL_KV_METHOD, request_serializer=kv_pb.PullKvRequest.SerializeToString,
            response_deserializer=parse_chunk)
        received, crc = start, 0
        try:
            async for chunk in pull_kv(ranged, metadata=tracing.metadata()):
                if chunk is None:  # what gRPC hands on for a message its deserializer refused
                    raise _data_loss(request.request_id, f"a KV chunk from {endpoint} is no PullKvResponse")
                offset, data = chunk
                if offset != received or offset + len(data) > end:
                    raise _data_loss(request.request_id, f"KV chunk [{offset}, {offset + len(data)}) does "
                                     f"not follow byte {received} of the range [{start}, {end})")
                write(offset, data)
                crc = zlib_ng.crc32(data, crc)
                received += len(data)
        except grpc.aio.AioRpcError as error:
            if error.code() in _TRANSFER_REFUSALS:
                raise from_rpc_error(error, request_id=request.request_id) from None
            raise TransportFailed(f"PullKv broke after {received - start} of {end - start} bytes: "
                                  f"{error.code().name}: {error.details()}") from None
        if received != end:
            raise _data_loss(request.request_id, f"KV pull got {received - start} of the {end - start} bytes "
                             f"of the range [{start}, {end})")
        return crc

    async def release(self, handle: pb.KvHandle, *, request_id: str) -> bool:
        return True  # the pull asked the prefill worker to free the transfer once it had sent it all


def _split(total: int, streams: int) -> list[tuple[int, int]]:
    """Up to `streams` contiguous ranges covering [0, total), none under `_MIN_STREAM_BYTES` but the last."""
    if total == 0:
        return [(0, 0)]
    count = max(1, min(streams, total // _MIN_STREAM_BYTES))
    step = -(-total // count)
    return [(start, min(start + step, total)) for start in range(0, total, step)]


def _shard_ranges(handle: pb.KvHandle, streams: int) -> list[tuple[int, int]]:
    """`_split` of the transfer; with several tensor-parallel shards, of each shard on its share of the
    streams (at least one each), so that every range lies in one shard."""
    if len(handle.shards) < 2:
        return _split(handle.total_bytes, streams)
    per_shard = max(1, streams // len(handle.shards))
    return [(shard.offset + start, shard.offset + end)
            for shard in handle.shards for start, end in _split(shard.size, per_shard)]


def _corrupt_ranks(handle: pb.KvHandle, ranges: list[tuple[int, int]], crcs: list[int]) -> list[int]:
    """The ranks whose shard's CRC-32, combined from the ranges' that lie in it, is not the handle's."""
    corrupt = []
    for shard in handle.shards if len(handle.shards) > 1 else ():
        crc = 0
        for (start, end), range_crc in zip(ranges, crcs):
            if shard.offset <= start < shard.offset + shard.size:
                crc = zlib_ng.crc32_combine(crc, range_crc, end - start)
        if crc != shard.crc32:
            corrupt.append(shard.rank)
    return corrupt


class _FileSink:
    """A new segment written through its file: the kernel copies each chunk, no page faults here."""

    def __init__(self, segment: str, size: int) -> None:
        self._segment = segment
        self._fd = shm.create_file(segment, size)

    def write(self, offset: int, data: memoryview) -> None:
        while data:
            written = os.pwrite(self._fd, data, offset)
            data, offset = data[written:], offset + written

    def finish(self) -> None:
        os.close(self._fd)

    def discard(self) -> None:
        os.close(self._fd)
        shm.unlink(self._segment)


class _MemorySink:
    def __init__(self, size: int) -> None:
        self.buffer = anonymous_buffer(size)
        self._view = memoryview(self.buffer)

    def write(self, offset: int, data: memoryview) -> None:
        self._view[offset:offset + len(data)] = data

    def finish(self) -> Any:
        self._view.release()
        return self.buffer

    def discard(self) -> None:
        self._view.release()
        if isinstance(self.buffer, mmap.mmap):
            self.buffer.close()


def _discard(buffer: Any, segment: str) -> None:
    if isinstance(buffer, mmap.mmap):
        buffer.close()
    if segment:
        shm.unlink(segment)


def layout_bytes(layout: pb.KvLayout) -> int:
    """The most bytes KV of this layout takes: whole blocks of `bytes_per_token` per token."""
    return layout.num_blocks * layout.block_size * layout.bytes_per_token


class KvReceiver:
    """One per decode worker: checks a handle against the request and the engine, takes its bytes by the
    first transport that moves them, and ends the prefill worker's lease.

    With `key`, only handles signed with it are taken. Every pull (connecting, moving the bytes, ending the
    lease, over every transport tried) must end within `timeout_s` plus the time its bytes need at
    `min_mib_s`."""

    def __init__(self, transports: Sequence[KvTransport], *, key: KvKey | None = None,
                 timeout_s: float = DEFAULT_PULL_TIMEOUT_S, min_mib_s: float = DEFAULT_PULL_MIN_MIB_S) -> None:
        if timeout_s <= 0 or min_mib_s <= 0:
            raise ValueError(f"a KV pull deadline needs a positive floor and rate, got {timeout_s} s and "
                             f"{min_mib_s} MiB/s")
        self.transports = list(transports)
        self.key = key
        self.timeout_s = timeout_s
        self.min_mib_s = min_mib_s
        self._metrics = metrics.kv_transfer()

    @classmethod
    def over_network(cls, channels: ChannelPool, *, host: str, names: Sequence[str] = TRANSPORT_NAMES,
                     nixl: NixlAgent | None = None, grpc_streams: int = DEFAULT_PULL_STREAMS,
                     **limits: Any) -> KvReceiver:
        """The transports `names`, in order of preference: shared memory with prefill workers on this host,
        NIXL through the agent `nixl`, gRPC with anyone; `limits` (key, timeout_s, min_mib_s) as the
        constructor takes them."""
        built: dict[str, KvTransport] = {"shm": ShmTransport(channels, host),
                                         "grpc": GrpcTransport(channels, streams=grpc_streams)}
        if nixl is not None:
            built["nixl"] = NixlTransport(nixl, channels)
        missing = [name for name in names if name not in built]
        if missing:
            raise ValueError(f"no KV transport {', '.join(missing)} here (nixl needs an agent); known: "
                             f"{', '.join(TRANSPORT_NAMES)}")
        return cls([built[name] for name in TRANSPORT_NAMES if name in names], **limits)

    @property
    def kinds(self) -> list[int]:
        """The `KvTransport`s this receiver takes KV by, as workers register them."""
        return [transport.kind for transport in self.transports]

    def add_stats(self, stats: pb.WorkerStats) -> None:
        """Fill the receiver's part of a worker's stats."""
        for transport in self.transports:
            if isinstance(transport, NixlTransport):
                stats.nixl_registrations = transport.agent.registrations

    def deadline_s(self, total_bytes: int) -> float:
        """How long a pull of `total_bytes` may take, connecting and ending the lease included."""
        return self.timeout_s + total_bytes / (self.min_mib_s * 2**20)

    def check(self, handle: pb.KvHandle, *, prompt: Sequence[int], fingerprint: str, request_id: str,
              max_bytes: int | None = None) -> None:
        """Refuse a handle this deployment did not sign, KV for another prompt, from an engine whose cache
        this engine cannot read, or larger than `max_bytes` (this engine's KV of the prompt)."""
        if self.key is not None:
            self.key.verify(handle, request_id=request_id)
        if not handle.endpoint or not handle.transfer_id:
            raise InvalidArgument("kv_handle needs the prefill worker's endpoint and a transfer id",
                                  request_id=request_id, reason="BAD_KV_HANDLE")
        if handle.num_tokens != len(prompt):
            raise FailedPrecondition(
                f"KV handle covers {handle.num_tokens} tokens but the prompt has {len(prompt)}; "
                "send the same prompt that was prefilled", request_id=request_id, reason="KV_HANDLE_PROMPT_MISMATCH")
        if handle.prompt_digest and handle.prompt_digest != prompt_digest(prompt):
            raise FailedPrecondition(
                f"KV handle is of another prompt of {len(prompt)} tokens; send the same prompt that was "
                "prefilled", request_id=request_id, reason="KV_HANDLE_PROMPT_MISMATCH")
        if handle.engine_fingerprint != fingerprint:
            raise FailedPrecondition(
                f"KV handle comes from an incompatible engine ({handle.engine_fingerprint}); this decode "
                f"worker runs {fingerprint}. {mismatch_hint(handle.engine_fingerprint, fingerprint)}",
                request_id=request_id, reason="ENGINE_FINGERPRINT_MISMATCH")
        if max_bytes is not None and handle.total_bytes > max_bytes:
            raise InvalidArgument(
                f"kv_handle claims {handle.total_bytes} bytes; this engine's KV of {len(prompt)} prompt tokens "
                f"is at most {max_bytes}", request_id=request_id, reason="KV_HANDLE_TOO_LARGE")

    async def receive(self, handle: pb.KvHandle, *, prompt: Sequence[int], fingerprint: str, request_id: str,
                      max_bytes: int | None = None, into_segment: bool = False, order: Sequence[int] = ()
                      ) -> ReceivedKv:
        """The KV of `prompt` (token ids) for an engine with `fingerprint` (at most `max_bytes` of it), checked,
        its lease ended; in a new shared-memory segment if `into_segment`. `order` names the transports to
        try (the pair's, from the pairing table); empty tries all of this receiver's."""
        self.check(handle, prompt=prompt, fingerprint=fingerprint, request_id=request_id, max_bytes=max_bytes)
        deadline = self.deadline_s(handle.total_bytes)
        with tracing.span("kv.transfer", **{"request.id": request_id, "kv.bytes": handle.total_bytes}) as span:
            try:
                async with asyncio.timeout(deadline):
                    received = await self._take(handle, fingerprint=fingerprint, request_id=request_id,
                                                into_segment=into_segment, order=order)
            except TimeoutError:
                raise DeadlineExceeded(
                    f"the KV pull of {handle.total_bytes} bytes from {handle.endpoint} did not finish within "
                    f"{deadline:.1f} s; the prefill worker may be overloaded or unreachable",
                    request_id=request_id, reason="KV_PULL_TIMEOUT") from None
            if span is not None:
                span.set_attribute("kv.transport", received.stats.path)
            return received

    async def _take(self, handle: pb.KvHandle, *, fingerprint: str, request_id: str, into_segment: bool,
                    order: Sequence[int]) -> ReceivedKv:
        """The bytes, by the first of the transports in `order` that moves them, and the lease ended."""
        failures: list[str] = []
        for transport in self._in_order(order):
            if not transport.reaches(handle):
                continue
            segment = shm.new_segment_name() if into_segment else ""
            started = time.perf_counter()
            try:
                received = await transport.fetch(handle, segment=segment, fingerprint=fingerprint,
                                                 request_id=request_id)
            except TransportFailed as why:
                failures.append(f"{transport.name}: {why}")
                self._metrics.fallbacks.labels(transport.name).inc()
                log.warning("request %s: KV over %s failed (%s); trying the next transport", request_id,
                            transport.name, why)
                continue
            try:
                await transport.release(handle, request_id=request_id)
            except BaseException:
                received.close()
                raise
            received.stats.fallbacks.extend(failures)
            received.stats.shards = max(1, len(handle.shards))
            self._metrics.observe(transport.name, received.stats.bytes, time.perf_counter() - started)
            return received
        tried = "; ".join(failures) or (f"none of the transports {self._names(order)} reaches "
                                        f"{handle.endpoint or 'the handle'} from here")
        raise Unavailable(f"the KV transfer failed on every transport: {tried}", request_id=request_id,
                          reason="KV_TRANSFER_FAILED")

    def _in_order(self, order: Sequence[int]) -> list[KvTransport]:
        if not order:
            return self.transports
        by_kind = {transport.kind: transport for transport in self.transports}
        return [by_kind[kind] for kind in order if kind in by_kind]

    def _names(self, order: Sequence[int]) -> str:
        kinds = order or self.kinds
        return ", ".join(pb.KvTransport.Name(kind).removeprefix("KV_TRANSPORT_").lower() for kind in kinds)


def _data_loss(request_id: str, message: str) -> DynamoError:
    return DynamoError(message, request_id=request_id, reason="KV_TRANSFER_CORRUPT", code=grpc.StatusCode.DATA_LOSS)


def anonymous_buffer(size: int) -> mmap.mmap | bytearray:
    """Writable memory for a pull. Fresh pages fault in one at a time on first write, which for a large
    transfer costs about as much as the transfer itself; huge pages make that a few faults."""
    if size == 0:
        return bytearray()
    buffer = mmap.mmap(-1, size)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        buffer.madvise(mmap.MADV_HUGEPAGE)
    return buffer
