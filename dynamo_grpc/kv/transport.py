"""The decode side of KV transfer: take the KV a handle names, by the first transport that reaches it.

A transport moves a held transfer's bytes from the prefill worker into this worker's memory and ends
the prefill worker's lease:
- `shm`: on the prefill worker's host, link its segment under a name of our own (no copy);
- `grpc`: anywhere, pull the chunk stream (`PullKv`) into local memory, checking size and CRC-32.
`KvReceiver` checks that a handle fits the request and this engine, tries the transports in order of
preference (a transport that cannot reach the bytes hands over to the next), and releases the transfer.
Engines only see the bytes that arrived (`ReceivedKv`), never how.
"""

from __future__ import annotations

import logging
import mmap
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from dynamo_grpc import metrics, tracing
from dynamo_grpc.channels import ChannelPool
from dynamo_grpc.errors import DynamoError, FailedPrecondition, InvalidArgument, NotFound, from_rpc_error
from dynamo_grpc.kv import shm
from dynamo_grpc.kv.store import prompt_digest
from dynamo_grpc.kv.wire import PULL_KV_METHOD, parse_chunk
from dynamo_grpc.v1 import common_pb2 as pb
from dynamo_grpc.v1 import kv_transfer_pb2 as kv_pb
from dynamo_grpc.v1 import kv_transfer_pb2_grpc as kv_grpc

log = logging.getLogger(__name__)


@dataclass
class ReceivedKv:
    """A prompt's KV, now this worker's: its bytes, and the shared-memory segment holding them when the
    engine asked for one (the vLLM connector reads segments by name)."""

    data: Any
    """The bytes: a mapping of the segment, or local memory."""
    stats: pb.KvTransferStats
    segment: str = ""

    def close(self) -> None:
        """Drop this worker's claim: the segment's name (the engine has read it) and the mapping."""
        if self.segment:
            shm.unlink(self.segment)
        if isinstance(self.data, mmap.mmap):
            self.data.close()


class KvTransport(Protocol):
    name: str

    def reaches(self, handle: pb.KvHandle) -> bool:
        """Whether this transport can move the handle's bytes from here."""
        ...

    async def fetch(self, handle: pb.KvHandle, *, segment: str, fingerprint: str, request_id: str) -> ReceivedKv:
        """The handle's bytes for an engine with `fingerprint`, in a new segment named `segment` (in memory
        when it is empty). Raises `Unreachable` when the bytes are out of its reach after all, so the next
        transport may try."""
        ...

    async def release(self, handle: pb.KvHandle, *, request_id: str) -> bool:
        """End the prefill worker's lease; False when the transfer was already gone."""
        ...


class Unreachable(Exception):
    """A transport could not get at the bytes (not a failure of the transfer itself)."""


async def release_over_grpc(channels: ChannelPool, handle: pb.KvHandle, *, request_id: str) -> bool:
    """`ReleaseKv` on the prefill worker, which checks the pull token (idempotent)."""
    stub = kv_grpc.KvTransferServiceStub(channels.get(handle.endpoint))
    try:
        response = await stub.ReleaseKv(kv_pb.ReleaseKvRequest(
            request_id=request_id, transfer_id=handle.transfer_id, pull_token=handle.pull_token),
            metadata=tracing.metadata())
    except grpc.aio.AioRpcError as error:
        raise from_rpc_error(error, request_id=request_id) from None
    return response.released


class ShmTransport:
    """Same host: a second name for the prefill worker's segment; the bytes are never copied."""

    name = "shm"

    def __init__(self, channels: ChannelPool, host: str) -> None:
        self._channels = channels
        self._host = host

    def reaches(self, handle: pb.KvHandle) -> bool:
        return bool(handle.shm_segment) and bool(self._host) and handle.host == self._host

    async def fetch(self, handle: pb.KvHandle, *, segment: str, fingerprint: str, request_id: str) -> ReceivedKv:
        name = segment or shm.new_segment_name()
        try:
            shm.link(handle.shm_segment, name)
        except (OSError, ValueError) as error:
            raise Unreachable(f"segment {handle.shm_segment} is not reachable here ({error})") from None
        if shm.size_of(name) != handle.total_bytes:
            shm.unlink(name)
            raise Unreachable(f"segment {handle.shm_segment} does not hold the handle's {handle.total_bytes} bytes")
        stats = pb.KvTransferStats(bytes=handle.total_bytes, path=self.name)
        if segment:  # the engine reads it by name; nothing is mapped here
            return ReceivedKv(data=None, stats=stats, segment=segment)
        data = shm.attach(name)
        shm.unlink(name)  # the mapping keeps the memory
        return ReceivedKv(data=data, stats=stats)

    async def release(self, handle: pb.KvHandle, *, request_id: str) -> bool:
        """For a linked segment the release is what proves the pull token and that the lease still held."""
        if not await release_over_grpc(self._channels, handle, request_id=request_id):
            raise NotFound(f"KV transfer {handle.transfer_id} is gone (lease expired or already taken); "
                           "prefill again", request_id=request_id, reason="KV_HANDLE_EXPIRED")
        return True


class GrpcTransport:
    """Anywhere: the prefill worker's `PullKv` chunk stream, checked for size and CRC-32 as it arrives."""

    name = "grpc"

    def __init__(self, channels: ChannelPool) -> None:
        self._channels = channels

    def reaches(self, handle: pb.KvHandle) -> bool:
        return True

    async def fetch(self, handle: pb.KvHandle, *, segment: str, fingerprint: str, request_id: str) -> ReceivedKv:
        into: Callable[[int], Any] = (lambda size: shm.create(segment, size)) if segment else anonymous_buffer
        try:
            data, stats = await self.pull(handle, fingerprint=fingerprint, request_id=request_id, into=into)
        except BaseException:
            if segment:
                shm.unlink(segment)
            raise
        if segment:
            data.close()
            return ReceivedKv(data=None, stats=stats, segment=segment)
        return ReceivedKv(data=data, stats=stats)

    async def pull(self, handle: pb.KvHandle, *, fingerprint: str, request_id: str,
                   into: Callable[[int], Any] | None = None) -> tuple[Any, pb.KvTransferStats]:
        """All bytes of the transfer, written into `into(size)` (default: `anonymous_buffer`) and verified
        against the handle's size and CRC-32 as they arrive; the prefill worker checks `fingerprint` too."""
        pull_kv = self._channels.get(handle.endpoint).unary_stream(
            PULL_KV_METHOD, request_serializer=kv_pb.PullKvRequest.SerializeToString,
            response_deserializer=parse_chunk)
        started = time.perf_counter()
        buffer = (into or anonymous_buffer)(handle.total_bytes)
        received = crc = 0
        try:
            with memoryview(buffer) as view:
                async for chunk in pull_kv(kv_pb.PullKvRequest(
                        request_id=request_id, transfer_id=handle.transfer_id, pull_token=handle.pull_token,
                        engine_fingerprint=fingerprint), metadata=tracing.metadata()):
                    if chunk is None:  # what gRPC hands on for a message its deserializer refused
                        raise _data_loss(request_id, f"a KV chunk from {handle.endpoint} is no PullKvResponse")
                    offset, data = chunk
                    end = offset + len(data)
                    if end > len(buffer):
                        raise _data_loss(request_id,
                                         f"KV chunk ends at byte {end}, past the announced {len(buffer)}")
                    view[offset:end] = data
                    if crc >= 0:  # in-order chunks are checked as they arrive; others once at the end
                        crc = zlib.crc32(data, crc) if offset == received else -1
                    received += len(data)
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error, request_id=request_id) from None
        if received != handle.total_bytes:
            raise _data_loss(request_id, f"KV pull got {received} of {handle.total_bytes} bytes")
        if (crc if crc >= 0 else zlib.crc32(memoryview(buffer))) != handle.crc32:
            raise _data_loss(request_id, "KV bytes failed their CRC-32 check")
        stats = pb.KvTransferStats(bytes=received, duration_us=int((time.perf_counter() - started) * 1e6),
                                   path=self.name)
        return buffer, stats

    async def release(self, handle: pb.KvHandle, *, request_id: str) -> bool:
        return await release_over_grpc(self._channels, handle, request_id=request_id)


class KvReceiver:
    """One per decode worker: checks a handle against the request and the engine, takes its bytes by the
    first transport that reaches them, and ends the prefill worker's lease."""

    def __init__(self, transports: Sequence[KvTransport]) -> None:
        self.transports = list(transports)
        self._metrics = metrics.kv_transfer()

    @classmethod
    def over_network(cls, channels: ChannelPool, *, host: str) -> KvReceiver:
        """Shared memory with prefill workers on this host, gRPC with the others."""
        return cls([ShmTransport(channels, host), GrpcTransport(channels)])

    @staticmethod
    def check(handle: pb.KvHandle, *, prompt: Sequence[int], fingerprint: str, request_id: str) -> None:
        """Refuse KV for another prompt, or from an engine whose cache this engine cannot read."""
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
                f"worker runs {fingerprint}. Pair only workers with the same engine fingerprint.",
                request_id=request_id, reason="ENGINE_FINGERPRINT_MISMATCH")

    async def receive(self, handle: pb.KvHandle, *, prompt: Sequence[int], fingerprint: str, request_id: str,
                      into_segment: bool = False) -> ReceivedKv:
        """The KV of `prompt` (token ids) for an engine with `fingerprint`, checked, its lease ended; in a new
        shared-memory segment if `into_segment`."""
        self.check(handle, prompt=prompt, fingerprint=fingerprint, request_id=request_id)
        with tracing.span("kv.transfer", **{"request.id": request_id, "kv.bytes": handle.total_bytes}) as span:
            received = await self._take(handle, fingerprint=fingerprint, request_id=request_id,
                                        into_segment=into_segment)
            if span is not None:
                span.set_attribute("kv.transport", received.stats.path)
            return received

    async def _take(self, handle: pb.KvHandle, *, fingerprint: str, request_id: str, into_segment: bool
                    ) -> ReceivedKv:
        """The bytes, by the first transport that reaches them, and the lease ended."""
        for transport in self.transports:
            if not transport.reaches(handle):
                continue
            segment = shm.new_segment_name() if into_segment else ""
            started = time.perf_counter()
            try:
                received = await transport.fetch(handle, segment=segment, fingerprint=fingerprint,
                                                 request_id=request_id)
            except Unreachable as why:
                log.info("request %s: %s transport: %s; trying the next", request_id, transport.name, why)
                continue
            try:
                await transport.release(handle, request_id=request_id)
            except BaseException:
                received.close()
                raise
            self._metrics.observe(transport.name, received.stats.bytes, time.perf_counter() - started)
            return received
        raise DynamoError(f"no KV transport reaches {handle.endpoint or 'the handle'}",
                          request_id=request_id, reason="UNAVAILABLE", code=grpc.StatusCode.UNAVAILABLE)


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
