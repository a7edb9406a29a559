"""Where the frontend's generations run: the router in the frontend's own process (the default: one hop
fewer), or a RouterService over gRPC (`--router host:port`).

Both give the same stream for a request: token batches, then a completion (whose `last_tokens`, when set,
come before it), or a `DynamoError` with the reason a RouterService client would get.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from dynamo_grpc import tracing
from dynamo_grpc.client import GenerateStream, RouterClient
from dynamo_grpc.errors import from_rpc_error
from dynamo_grpc.routing.router import PickedPair, Router
from dynamo_grpc.security import Tls
from dynamo_grpc.services.streams import CancelSignal
from dynamo_grpc.v1 import common_pb2 as pb


@dataclass(frozen=True)
class Generation:
    """One running generation."""

    request_id: str
    responses: AsyncIterator[Any]
    """`DecodeResponse`s (in process) or `GenerateResponse`s (remote): tokens, or a completion."""
    cancel: Callable[[], None]
    """Stops the generation in-band: its stream then ends with a CANCELLED completion."""


class Backend(Protocol):
    description: str
    """Where generations run, for logs."""

    def open(self, request_id: str, params: pb.GenerationParams, picked: PickedPair | None = None
             ) -> Generation:
        """Start a generation; `picked` is the pair an endpoint picker in front chose for it."""
        ...


class EmbeddedRouter:
    """The router runs in this process; `router` stays its owner's to close."""

    description = "routing in this process"

    def __init__(self, router: Router) -> None:
        self.router = router

    def open(self, request_id: str, params: pb.GenerationParams, picked: PickedPair | None = None
             ) -> Generation:
        cancelled = CancelSignal()
        responses = self.router.generate(request_id, params, cancelled, picked)
        return Generation(request_id, responses, cancelled.set)


class RemoteRouter:
    """Forwards every generation to the RouterService at `endpoint` (TLS with `tls`, and `token` as the bearer
    token where the router requires one); `close()` closes the channel."""

    def __init__(self, endpoint: str, *, tls: Tls | None = None, token: str | None = None) -> None:
        self.description = f"forwarding to the router at {endpoint}"
        self._client = RouterClient(endpoint, tls=tls, token=token)

    def open(self, request_id: str, params: pb.GenerationParams, picked: PickedPair | None = None
             ) -> Generation:
        """`picked` is not followed: RouterService picks again (an endpoint picker needs the frontend to
        route in its own process)."""
        metadata = tracing.metadata()
        if self._client.metadata is not None:
            metadata = (*(metadata or ()), *self._client.metadata)
        stream = GenerateStream(self._client.stub, request_id, params, metadata=metadata)
        return Generation(request_id, _with_our_errors(stream), stream.cancel)

    async def close(self) -> None:
        await self._client.channel.close()


async def _with_our_errors(stream: GenerateStream) -> AsyncIterator[Any]:
    try:
        async for response in stream:
            yield response
    except grpc.aio.AioRpcError as error:
        raise from_rpc_error(error) from None
