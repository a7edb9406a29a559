"""Where the frontend's generations run: the router in the frontend's own process (the default: one hop
fewer), or RouterServices over gRPC (`--router host:port[,host:port...]`).

Both give the same stream for a request: token batches, then a completion (whose `last_tokens`, when set,
come before it), or a `DynamoError` with the reason a RouterService client would get.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from dynamo_grpc import tracing
from dynamo_grpc.client import GenerateStream, RouterClient
from dynamo_grpc.errors import from_rpc_error
from dynamo_grpc.routing.fleet import Fleet
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
    fleet: Fleet | None
    """The view of the fleet it routes over, when it routes in this process."""

    def open(self, request_id: str, params: pb.GenerationParams, picked: PickedPair | None = None
             ) -> Generation:
        """Start a generation; `picked` is the pair an endpoint picker in front chose for it."""
        ...


class EmbeddedRouter:
    """The router runs in this process; `router` stays its owner's to close."""

    description = "routing in this process"

    def __init__(self, router: Router) -> None:
        self.router = router
        self.fleet: Fleet | None = router.fleet

    def open(self, request_id: str, params: pb.GenerationParams, picked: PickedPair | None = None
             ) -> Generation:
        cancelled = CancelSignal()
        responses = self.router.generate(request_id, params, cancelled, picked)
        return Generation(request_id, responses, cancelled.set)


class RemoteRouter:
    """Forwards every generation to a RouterService (TLS with `tls`, and `token` as the bearer token where
    the routers require one); `close()` closes the channels.

    With several router endpoints, requests take turns among them, and one that fails UNAVAILABLE before
    its first response (its router is down or restarting) goes to the next router with the same request id;
    after a response it is never retried (the router may have generated, and the stream would repeat)."""

    fleet: Fleet | None = None

    def __init__(self, endpoints: str | Sequence[str], *, tls: Tls | None = None, token: str | None = None) -> None:
        endpoints = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        if not endpoints:
            raise ValueError("a remote router needs at least one host:port")
        routers = "routers" if len(endpoints) > 1 else "router"
        self.description = f"forwarding to the {routers} at {', '.join(endpoints)}"
        self._clients = [RouterClient(endpoint, tls=tls, token=token) for endpoint in endpoints]
        self._turn = itertools.count()
        # Each other router once at once, then two more tries with a short backoff (a lone router restarting).
        self._retries = len(endpoints) + 1

    def open(self, request_id: str, params: pb.GenerationParams, picked: PickedPair | None = None
             ) -> Generation:
        """`picked` is not followed: RouterService picks again (an endpoint picker needs the frontend to
        route in its own process)."""
        first = next(self._turn) % len(self._clients)
        stubs = [client.stub for client in self._clients[first:] + self._clients[:first]]
        metadata = tracing.metadata()
        if self._clients[0].metadata is not None:
            metadata = (*(metadata or ()), *self._clients[0].metadata)
        stream = GenerateStream(stubs[0], request_id, params, metadata=metadata,
                                retries=self._retries, fallbacks=stubs[1:])
        return Generation(request_id, _with_our_errors(stream), stream.cancel)

    async def close(self) -> None:
        for client in self._clients:
            await client.channel.close()


async def _with_our_errors(stream: GenerateStream) -> AsyncIterator[Any]:
    try:
        async for response in stream:
            yield response
    except grpc.aio.AioRpcError as error:
        raise from_rpc_error(error) from None
