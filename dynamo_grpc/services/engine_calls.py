"""What prefill and decode servicers share: turning a GenerationParams into an engine run."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from dynamo_grpc.engine.base import Engine, EngineOutput, EngineRequest, FinishReason
from dynamo_grpc.errors import DeadlineExceeded, InvalidArgument, NotFound
from dynamo_grpc.params import check_request_id, deadline_timer, prompt_of, sampling_of, seconds_left
from dynamo_grpc.v1 import common_pb2 as pb


def engine_request(engine: Engine, request_id: str, params: pb.GenerationParams, *,
                   produce_kv: bool = False, kv_handle: pb.KvHandle | None = None,
                   resume: tuple[int, ...] = (), kv_transports: tuple[int, ...] = ()) -> EngineRequest:
    """Validate a request against this worker's engine and build the engine's view of it."""
    check_request_id(request_id)
    if params.model != engine.model:
        raise NotFound(f"model {params.model!r} is not served here; this worker serves {engine.model!r}",
                       request_id=request_id, reason="MODEL_NOT_FOUND")
    sampling = sampling_of(params, request_id)
    if resume and (kv_handle is not None or len(resume) >= sampling.max_tokens):
        raise InvalidArgument(f"resume_token_ids ({len(resume)}) must be fewer than max_tokens "
                              f"({sampling.max_tokens}) and cannot come with a KV handle",
                              request_id=request_id, reason="BAD_RESUME")
    return EngineRequest(request_id=request_id, prompt=prompt_of(params, request_id), sampling=sampling,
                         produce_kv=produce_kv, kv_handle=kv_handle, resume=resume,
                         kv_transports=kv_transports)


@contextlib.asynccontextmanager
async def engine_run(engine: Engine, request: EngineRequest, params: pb.GenerationParams
                     ) -> AsyncIterator[AsyncIterator[EngineOutput]]:
    """The engine's output stream, bounded by the request's deadline; leaving the block aborts the request."""
    rid = request.request_id
    outputs = engine.generate(request)
    with deadline_timer(seconds_left(params, rid), lambda: asyncio.ensure_future(engine.abort(rid))) as expired:

        async def checked() -> AsyncIterator[EngineOutput]:
            async for out in outputs:
                if expired.is_set() and out.finish_reason is FinishReason.CANCELLED:
                    raise DeadlineExceeded("the request's deadline passed before it finished", request_id=rid)
                yield out

        try:
            yield checked()
        finally:
            await engine.abort(rid)
            await outputs.aclose()  # type: ignore[attr-defined]


def completion_of(out: EngineOutput, *, prefill_worker_id: str, decode_worker_id: str,
                  last_tokens: pb.TokenBatch | None = None) -> pb.Completion:
    return pb.Completion(finish_reason=int(out.finish_reason or 0), usage=out.usage, kv_transfer=out.kv_transfer,
                         prefill_worker_id=prefill_worker_id, decode_worker_id=decode_worker_id,
                         last_tokens=last_tokens)
