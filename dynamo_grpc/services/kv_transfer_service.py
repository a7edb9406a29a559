"""KvTransferService: hand held KV bytes to the decode worker that presents the right pull token."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc

from dynamo_grpc.errors import DynamoError
from dynamo_grpc.kv.store import LeasedKvStore
from dynamo_grpc.v1 import kv_transfer_pb2 as kv_pb
from dynamo_grpc.v1 import kv_transfer_pb2_grpc as kv_grpc

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 1024 * 1024
"""Chosen by `bench/kv_transfer.py --chunk-kib`: larger chunks, fewer messages but more memory per copy."""


class KvTransferServicer(kv_grpc.KvTransferServiceServicer):
    def __init__(self, store: LeasedKvStore, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        self._store = store
        self._chunk_bytes = chunk_bytes

    async def PullKv(self, request: kv_pb.PullKvRequest, context: grpc.aio.ServicerContext
                     ) -> AsyncIterator[tuple[int, memoryview]]:
        """(offset, data) chunks of the asked range, serialized as `PullKvResponse` by `kv_wire` without extra
        copies; with `release`, the transfer is freed once such pulls have sent all of it."""
        data = memoryview(self._store.claim(request.transfer_id, request.pull_token, request.engine_fingerprint))
        start = request.offset
        end = start + request.length if request.length else len(data)
        if start > end or end > len(data):
            raise DynamoError(f"range [{start}, {end}) is outside KV transfer {request.transfer_id}'s "
                              f"{len(data)} bytes", request_id=request.request_id,
                              reason="KV_RANGE_OUT_OF_BOUNDS", code=grpc.StatusCode.OUT_OF_RANGE)
        log.debug("request %s: sending bytes [%d, %d) of KV transfer %s", request.request_id, start, end,
                  request.transfer_id)
        for offset in range(start, end, self._chunk_bytes):
            yield offset, data[offset:min(offset + self._chunk_bytes, end)]
        if request.release:
            self._store.sent(request.transfer_id, request.pull_token, start, end)

    async def ReleaseKv(self, request: kv_pb.ReleaseKvRequest, context: grpc.aio.ServicerContext
                        ) -> kv_pb.ReleaseKvResponse:
        released = self._store.release(request.transfer_id, request.pull_token,
                                       require_held=request.require_held)
        return kv_pb.ReleaseKvResponse(released=released)
