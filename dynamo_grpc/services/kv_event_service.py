"""KvEventService: a worker's prefix-cache contents and their changes, for routers to index."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from dynamo_grpc.kv.events import KvEventLog
from dynamo_grpc.v1 import kv_events_pb2 as events_pb
from dynamo_grpc.v1 import kv_events_pb2_grpc as events_grpc


class KvEventServicer(events_grpc.KvEventServiceServicer):
    def __init__(self, events: KvEventLog) -> None:
        self._events = events

    async def WatchKvEvents(self, request: events_pb.WatchKvEventsRequest, context: grpc.aio.ServicerContext
                            ) -> AsyncIterator[events_pb.WatchKvEventsResponse]:
        async for change in self._events.watch():
            yield change
