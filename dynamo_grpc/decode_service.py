"""DecodeService: generate tokens, with the prompt's KV pulled from a prefill worker or computed here."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc

from dynamo_grpc.engine.base import Engine
from dynamo_grpc.engine_calls import completion_of, engine_request, engine_run
from dynamo_grpc.streams import background, coalesce, first_message, watch_for_cancel
from dynamo_grpc.v1 import common_pb2 as pb
from dynamo_grpc.v1 import decode_pb2 as decode_pb
from dynamo_grpc.v1 import decode_pb2_grpc as decode_grpc


class DecodeServicer(decode_grpc.DecodeServiceServicer):
    def __init__(self, engine: Engine, *, worker_id: str) -> None:
        self._engine = engine
        self._worker_id = worker_id

    async def Decode(self, request_iterator: AsyncIterator[decode_pb.DecodeRequest],
                     context: grpc.aio.ServicerContext) -> AsyncIterator[decode_pb.DecodeResponse]:
        opening = await first_message(request_iterator, "start")
        rid, start = opening.request_id, opening.start
        handle = start.kv_handle if start.HasField("kv_handle") else None
        engine_req = engine_request(self._engine, rid, start.params, kv_handle=handle)
        async with (engine_run(self._engine, engine_req, start.params) as outputs,
                    background(watch_for_cancel(request_iterator, rid, lambda: self._engine.abort(rid))),
                    contextlib.aclosing(coalesce(outputs)) as batches):
            async for out in batches:
                if out.token_ids:
                    yield decode_pb.DecodeResponse(request_id=rid, tokens=pb.TokenBatch(token_ids=out.token_ids,
                                                                                       text=out.text))
                if out.finish_reason is not None:
                    yield decode_pb.DecodeResponse(request_id=rid, completion=completion_of(
                        out, prefill_worker_id=start.prefill_worker_id if handle else "",
                        decode_worker_id=self._worker_id))

    async def GetDecodeStats(self, request: decode_pb.GetDecodeStatsRequest, context: grpc.aio.ServicerContext
                             ) -> decode_pb.GetDecodeStatsResponse:
        return decode_pb.GetDecodeStatsResponse(stats=self._engine.stats())
