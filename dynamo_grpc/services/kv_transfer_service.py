"""KvTransferService: hand held KV bytes to the decode worker that presents the right pull token."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc

from dynamo_grpc.kv.store import LeasedKvStore
from dynamo_grpc.v1 import kv_transfer_pb2 as kv_pb
from dynamo_grpc.v1 import kv_transfer_pb2_grpc as kv_grpc

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 1024 * 1024


class KvTransferServicer(kv_grpc.KvTransferServiceServicer):
    def __init__(self, store: LeasedKvStore, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        self._store = store
        self._chunk_bytes = chunk_bytes

    async def PullKv(self, request: kv_pb.PullKvRequest, context: grpc.aio.ServicerContext
                     ) -> AsyncIterator[tuple[int, memoryview]]:
        """(offset, data) chunks, serialized as `PullKvResponse` by `kv_wire` without extra copies."""
        data = memoryview(self._store.claim(request.transfer_id, request.pull_token, request.engine_fingerprint))
        log.debug("request %s: sending %d KV bytes of transfer %s", request.request_id, len(data),
                  request.transfer_id)
        for offset in range(0, len(data), self._chunk_bytes):
            yield offset, data[offset:offset + self._chunk_bytes]

    async def ReleaseKv(self, request: kv_pb.ReleaseKvRequest, context: grpc.aio.ServicerContext
                        ) -> kv_pb.ReleaseKvResponse:
        return kv_pb.ReleaseKvResponse(released=self._store.release(request.transfer_id, request.pull_token))
