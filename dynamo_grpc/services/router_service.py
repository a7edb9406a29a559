"""RouterService: the typed entry point; one bidirectional stream per request."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator

import grpc

from dynamo_grpc.routing.router import Router
from dynamo_grpc.services.streams import CancelSignal, background, first_message, watch_for_cancel
from dynamo_grpc.v1 import router_pb2 as router_pb
from dynamo_grpc.v1 import router_pb2_grpc as router_grpc


class RouterServicer(router_grpc.RouterServiceServicer):
    def __init__(self, router: Router) -> None:
        self._router = router

    async def Generate(self, request_iterator: AsyncIterator[router_pb.GenerateRequest],
                       context: grpc.aio.ServicerContext) -> AsyncIterator[router_pb.GenerateResponse]:
        opening = await first_message(request_iterator, "start")
        request_id = opening.request_id or uuid.uuid4().hex
        cancelled = CancelSignal()

        async def cancel() -> None:
            cancelled.set()

        async with (background(watch_for_cancel(request_iterator, request_id, cancel)),
                    contextlib.aclosing(self._router.generate(request_id, opening.start, cancelled)) as events):
            async for event in events:
                if event.HasField("tokens"):
                    yield router_pb.GenerateResponse(request_id=request_id, tokens=event.tokens)
                    continue
                completion = event.completion
                if completion.HasField("last_tokens"):  # the contract: token batches, then the completion
                    yield router_pb.GenerateResponse(request_id=request_id, tokens=completion.last_tokens)
                    completion.ClearField("last_tokens")
                yield router_pb.GenerateResponse(request_id=request_id, completion=completion)
