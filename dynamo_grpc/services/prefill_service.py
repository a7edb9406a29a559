"""PrefillService: run the prompt, keep its KV for a decode worker, answer with the first token."""

from __future__ import annotations

import time

import grpc

from dynamo_grpc import metrics
from dynamo_grpc.engine.base import Engine
from dynamo_grpc.errors import DynamoError
from dynamo_grpc.services.engine_calls import engine_request, engine_run
from dynamo_grpc.services.latency import LatencyWindow
from dynamo_grpc.v1 import prefill_pb2 as prefill_pb
from dynamo_grpc.v1 import prefill_pb2_grpc as prefill_grpc


class PrefillServicer(prefill_grpc.PrefillServiceServicer):
    def __init__(self, engine: Engine, *, worker_id: str) -> None:
        self._engine = engine
        self._ttft = LatencyWindow()
        self._metrics = metrics.worker("prefill", worker_id)

    async def Prefill(self, request: prefill_pb.PrefillRequest, context: grpc.aio.ServicerContext
                      ) -> prefill_pb.PrefillResponse:
        with self._metrics.request() as timer:
            engine_req = engine_request(self._engine, request.request_id, request.params, produce_kv=True)
            async with engine_run(self._engine, engine_req, request.params) as outputs:
                async for out in outputs:
                    if out.kv_handle is not None:
                        ttft = time.perf_counter() - timer.started
                        self._ttft.add(ttft * 1e3)
                        self._metrics.ttft.observe(ttft)
                        first_logprob = out.logprobs[0] if out.logprobs else None
                        return prefill_pb.PrefillResponse(
                            request_id=request.request_id, first_token_id=out.token_ids[0],
                            kv_handle=out.kv_handle, usage=out.usage, first_token_logprob=first_logprob)
            raise DynamoError("prefill ended without producing KV", request_id=request.request_id)

    async def GetPrefillStats(self, request: prefill_pb.GetPrefillStatsRequest, context: grpc.aio.ServicerContext
                              ) -> prefill_pb.GetPrefillStatsResponse:
        stats = self._engine.stats()
        stats.ttft_p90_ms = self._ttft.p90()
        return prefill_pb.GetPrefillStatsResponse(stats=stats)
