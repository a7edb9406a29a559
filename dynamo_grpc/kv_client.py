"""The decode side of KV transfer: pull a prefill worker's held KV over gRPC, check it, release it."""

from __future__ import annotations

import mmap
import time
import zlib
from collections.abc import Callable
from typing import Any

import grpc

from dynamo_grpc.channels import ChannelPool
from dynamo_grpc.errors import DynamoError, FailedPrecondition, from_rpc_error
from dynamo_grpc.kv_wire import PULL_KV_METHOD, parse_chunk
from dynamo_grpc.v1 import common_pb2 as pb
from dynamo_grpc.v1 import kv_transfer_pb2 as kv_pb
from dynamo_grpc.v1 import kv_transfer_pb2_grpc as kv_grpc


class KvPuller:
    """Pulls KV bytes named by a `KvHandle`; one per decode worker, channels shared across requests."""

    def __init__(self, channels: ChannelPool, *, fingerprint: str) -> None:
        self._channels = channels
        self._fingerprint = fingerprint

    def check_compatible(self, handle: pb.KvHandle, *, request_id: str) -> None:
        """Refuse KV from an engine whose cache this engine cannot read."""
        if handle.engine_fingerprint != self._fingerprint:
            raise FailedPrecondition(
                f"KV handle comes from an incompatible engine ({handle.engine_fingerprint}); this decode "
                f"worker runs {self._fingerprint}. Pair only workers with the same engine fingerprint.",
                request_id=request_id, reason="ENGINE_FINGERPRINT_MISMATCH")

    async def pull(self, handle: pb.KvHandle, *, request_id: str,
                   into: Callable[[int], Any] | None = None) -> tuple[Any, pb.KvTransferStats]:
        """All bytes of the transfer, written into `into(size)` (default: `anonymous_buffer`) and verified
        against the handle's size and CRC-32 as they arrive."""
        self.check_compatible(handle, request_id=request_id)
        pull_kv = self._channels.get(handle.endpoint).unary_stream(
            PULL_KV_METHOD, request_serializer=kv_pb.PullKvRequest.SerializeToString,
            response_deserializer=parse_chunk)
        started = time.perf_counter()
        buffer = (into or anonymous_buffer)(handle.total_bytes)
        received = crc = 0
        try:
            with memoryview(buffer) as view:
                async for offset, data in pull_kv(kv_pb.PullKvRequest(
                        request_id=request_id, transfer_id=handle.transfer_id, pull_token=handle.pull_token,
                        engine_fingerprint=self._fingerprint)):
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
                                   path="grpc")
        return buffer, stats

    async def release(self, handle: pb.KvHandle, *, request_id: str) -> bool:
        """Tell the prefill worker to free the transfer (idempotent)."""
        stub = kv_grpc.KvTransferServiceStub(self._channels.get(handle.endpoint))
        try:
            response = await stub.ReleaseKv(kv_pb.ReleaseKvRequest(
                request_id=request_id, transfer_id=handle.transfer_id, pull_token=handle.pull_token))
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error, request_id=request_id) from None
        return response.released


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
