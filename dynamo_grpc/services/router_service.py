"""RouterService: the typed entry point; one bidirectional stream per request."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import grpc

from dynamo_grpc.routing.router import Router
from dynamo_grpc.services.streams import background, first_message, watch_for_cancel
from dynamo_grpc.v1 import router_pb2 as router_pb
from dynamo_grpc.v1 import router_pb2_grpc as router_grpc


class RouterServicer(router_grpc.RouterServiceServicer):
    def __init__(self, router: Router) -> None:
        self._router = router

    async def Generate(self, request_iterator: AsyncIterator[router_pb.GenerateRequest],
                       context: grpc.aio.ServicerContext) -> AsyncIterator[router_pb.GenerateResponse]:
        opening = await first_message(request_iterator, "start")
        request_id = opening.request_id or uuid.uuid4().hex
        cancelled = asyncio.Event()

        async def cancel() -> None:
            cancelled.set()

        async with (background(watch_for_cancel(request_iterator, request_id, cancel)),
                    contextlib.aclosing(self._router.generate(request_id, opening.start, cancelled)) as responses):
            async for response in responses:
                yield response
