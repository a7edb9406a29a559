"""PrefillService: run the prompt, keep its KV for a decode worker, answer with the first token.

The KV a caller is handed stays held until it is pulled or its lease ends, so the store counts it against
that caller (`LeasedKvStore.charge`). A caller is the gRPC peer (one connection) for now.
"""

from __future__ import annotations

import time

import grpc

from dynamo_grpc import metrics
from dynamo_grpc.engine.base import Engine
from dynamo_grpc.errors import DynamoError
from dynamo_grpc.kv.store import LeasedKvStore
from dynamo_grpc.services.engine_calls import engine_request, engine_run
from dynamo_grpc.services.latency import LatencyWindow
from dynamo_grpc.v1 import prefill_pb2 as prefill_pb
from dynamo_grpc.v1 import prefill_pb2_grpc as prefill_grpc


class PrefillServicer(prefill_grpc.PrefillServiceServicer):
    def __init__(self, engine: Engine, *, worker_id: str, store: LeasedKvStore | None = None) -> None:
        self._engine = engine
        self._store = store
        self._ttft = LatencyWindow()
        self._metrics = metrics.worker("prefill", worker_id)

    async def Prefill(self, request: prefill_pb.PrefillRequest, context: grpc.aio.ServicerContext
                      ) -> prefill_pb.PrefillResponse:
        caller = context.peer()
        if self._store is not None:
            self._store.admit(caller, request_id=request.request_id)
        with self._metrics.request() as timer:
            engine_req = engine_request(self._engine, request.request_id, request.params, produce_kv=True)
            async with engine_run(self._engine, engine_req, request.params) as outputs:
                async for out in outputs:
                    if out.kv_handle is not None:
                        if self._store is not None:
                            self._store.charge(out.kv_handle.transfer_id, caller, request_id=request.request_id)
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
