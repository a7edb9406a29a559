"""DecodeService: generate tokens, with the prompt's KV pulled from a prefill worker or computed here."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator

import grpc

from dynamo_grpc import metrics
from dynamo_grpc.engine.base import Engine, EngineOutput
from dynamo_grpc.errors import DynamoError
from dynamo_grpc.services.engine_calls import completion_of, engine_request, engine_run
from dynamo_grpc.services.latency import LatencyWindow
from dynamo_grpc.services.stop_strings import cut_at_stop_strings
from dynamo_grpc.services.streams import background, coalesce, first_message, watch_for_cancel
from dynamo_grpc.v1 import common_pb2 as pb
from dynamo_grpc.v1 import decode_pb2 as decode_pb
from dynamo_grpc.v1 import decode_pb2_grpc as decode_grpc

log = logging.getLogger(__name__)

# Failures of the pull itself, after which prefilling locally can still answer the request.
PULL_FAILURES = frozenset({"KV_HANDLE_NOT_FOUND", "KV_HANDLE_EXPIRED", "BAD_PULL_TOKEN", "KV_TRANSFER_CORRUPT",
                           "KV_TRANSFER_FAILED", "KV_PULL_TIMEOUT", "ENGINE_FINGERPRINT_MISMATCH"})


class DecodeServicer(decode_grpc.DecodeServiceServicer):
    def __init__(self, engine: Engine, *, worker_id: str, local_prefill_on_pull_failure: bool = False,
                 stream_interval_s: float) -> None:
        self._engine = engine
        self._worker_id = worker_id
        self._local_prefill_on_pull_failure = local_prefill_on_pull_failure
        self._stream_interval_s = stream_interval_s
        self._ttft = LatencyWindow()
        self._itl = LatencyWindow()
        self._metrics = metrics.worker("decode", worker_id)

    async def Decode(self, request_iterator: AsyncIterator[decode_pb.DecodeRequest],
                     context: grpc.aio.ServicerContext) -> AsyncIterator[decode_pb.DecodeResponse]:
        opening = await first_message(request_iterator, "start")
        rid, start = opening.request_id, opening.start
        handle = start.kv_handle if start.HasField("kv_handle") else None
        resume = tuple(start.resume_token_ids)
        with self._metrics.request() as timer:
            first, tokens = 0.0, 0
            outputs = self._outputs(rid, start.params, handle, resume, tuple(start.kv_transports))
            if start.params.sampling.stop:
                stops = tuple(start.params.sampling.stop)
                outputs = cut_at_stop_strings(outputs, stops, lambda: self._engine.abort(rid))
            async with (background(watch_for_cancel(request_iterator, rid, lambda: self._engine.abort(rid))),
                        contextlib.aclosing(coalesce(outputs, self._stream_interval_s)) as batches):
                async for out in batches:
                    last_tokens = None
                    if out.token_ids:
                        if not tokens:
                            first = time.perf_counter()
                            self._ttft.add((first - timer.started) * 1e3)
                            self._metrics.ttft.observe(first - timer.started)
                        tokens += len(out.token_ids)
                        batch = pb.TokenBatch(token_ids=out.token_ids, text=out.text, logprobs=out.logprobs)
                        if out.finish_reason is not None and start.last_tokens_in_completion:
                            last_tokens = batch  # one message for the last tokens and the end
                        else:
                            yield decode_pb.DecodeResponse(request_id=rid, tokens=batch)
                    if out.finish_reason is not None:
                        timer.outcome = self._finished(out.finish_reason, first, tokens)
                        pulled = out.kv_transfer is not None and out.kv_transfer.path
                        if pulled and handle is not None and out.usage is not None:
                            out.usage.kv_transferred_tokens = handle.num_tokens
                        yield decode_pb.DecodeResponse(request_id=rid, completion=completion_of(
                            out, prefill_worker_id=start.prefill_worker_id if pulled else "",
                            decode_worker_id=self._worker_id, last_tokens=last_tokens))

    def _finished(self, reason: int, first: float, tokens: int) -> str:
        """Observe a finished request once: its tokens and mean inter-token gap; its outcome label."""
        self._metrics.generated.inc(tokens)
        if tokens > 1:
            itl = (time.perf_counter() - first) / (tokens - 1)
            self._itl.add(itl * 1e3)
            self._metrics.itl.observe(itl)
        return metrics.finish_label(reason)

    async def _outputs(self, rid: str, params: pb.GenerationParams, handle: pb.KvHandle | None,
                       resume: tuple[int, ...], transports: tuple[int, ...]) -> AsyncIterator[EngineOutput]:
        """The engine's outputs; if the KV pull fails and this worker may, it prefills the prompt itself."""
        produced = False
        try:
            async with engine_run(self._engine, engine_request(self._engine, rid, params, kv_handle=handle,
                                                               resume=resume, kv_transports=transports),
                                  params) as outputs:
                async for out in outputs:
                    produced = True
                    yield out
            return
        except DynamoError as error:
            if produced or handle is None or not self._local_prefill_on_pull_failure or \
                    error.reason not in PULL_FAILURES:
                raise
            log.warning("request %s: KV pull failed (%s: %s); prefilling locally", rid, error.reason, error)
        async with engine_run(self._engine, engine_request(self._engine, rid, params), params) as outputs:
            async for out in outputs:
                yield out

    async def GetDecodeStats(self, request: decode_pb.GetDecodeStatsRequest, context: grpc.aio.ServicerContext
                             ) -> decode_pb.GetDecodeStatsResponse:
        stats = self._engine.stats()
        stats.ttft_p90_ms, stats.itl_p90_ms = self._ttft.p90(), self._itl.p90()
        return decode_pb.GetDecodeStatsResponse(stats=stats)

