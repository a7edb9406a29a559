"""The gRPC server every role runs: our services plus health, reflection and one error mapping.

grpc.health.v1 reports each service and the server as a whole ("") SERVING only while it can take calls:
a worker's services stay NOT_SERVING until its engine is up (its port opens first, so probes and
balancers get an answer while weights load), and every service turns NOT_SERVING when the server drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection as grpc_reflection

from dynamo_grpc import tracing
from dynamo_grpc.channels import CHANNEL_OPTIONS
from dynamo_grpc.errors import DynamoError, InvalidArgument, Unauthenticated, Unavailable
from dynamo_grpc.security import Tls, bearer_matches, listen

log = logging.getLogger(__name__)

FIRST_MESSAGE_WAIT_S = 1.0
HEALTH_PREFIX = "/grpc.health.v1.Health/"


@dataclass(frozen=True)
class ServiceBinding:
    """A servicer and how to add it: the generated `add_*_to_server` and its service descriptor."""

    servicer: Any
    add_to_server: Callable[[Any, grpc.aio.Server], None]
    service_name: str


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: HealthServicer
    service_names: tuple[str, ...]
    late: LateServices

    async def serve_late(self, bindings: list[ServiceBinding]) -> None:
        """Take calls for the services `start_server` was told are `starting`, and report SERVING."""
        self.late.bind(bindings)
        for name in (*(b.service_name for b in bindings), ""):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace_s: float = 5.0) -> None:
        """Report NOT_SERVING first so balancers drain us, then stop accepting and finish in-flight calls."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)


async def start_server(bindings: list[ServiceBinding], *, host: str, port: int, starting: tuple[str, ...] = (),
                       tls: Tls | None = None, token: str | None = None, reflection: bool = True
                       ) -> RunningServer:
    """Serve `bindings` at once; the services named in `starting` answer NOT_SERVING (health) and
    UNAVAILABLE (calls) until `serve_late` binds them, and the server as a whole is NOT_SERVING till then.
    `tls`: TLS, mutual where it names a CA; `token`: every call but health checks needs it as a bearer token
    (no interceptor without one); `reflection` off hides the services from grpcurl and the like."""
    interceptors = [ErrorInterceptor(), *tracing.server_interceptors()]
    if token is not None:
        interceptors.insert(0, TokenInterceptor(token))
    server = grpc.aio.server(interceptors=interceptors, options=CHANNEL_OPTIONS)
    for binding in bindings:
        binding.add_to_server(binding.servicer, server)
    late = LateServices(starting)
    server.add_generic_rpc_handlers((late,))
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    names = tuple(b.service_name for b in bindings)
    health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    if reflection:
        grpc_reflection.enable_server_reflection((*names, *starting, health_name, grpc_reflection.SERVICE_NAME),
                                                 server)
    bound = listen(server, host, port, tls)
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}: address in use or not available; pick another --port")
    for name in starting:
        await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await health.set("", health_pb2.HealthCheckResponse.NOT_SERVING if starting else
                     health_pb2.HealthCheckResponse.SERVING)
    await server.start()
    for name in names:
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(server, bound, health, (*names, *starting), late)


class LateServices(grpc.GenericRpcHandler):
    """Services bound after the server started. Until then a call to one of them fails with UNAVAILABLE
    (reason `NOT_READY`), which clients retry, rather than UNIMPLEMENTED."""

    def __init__(self, starting: tuple[str, ...]) -> None:
        self._starting = frozenset(starting)
        self._handlers: list[grpc.GenericRpcHandler] = []

    def bind(self, bindings: list[ServiceBinding]) -> None:
        for binding in bindings:
            binding.add_to_server(binding.servicer, self)
        self._starting = frozenset()

    def add_generic_rpc_handlers(self, handlers: tuple[grpc.GenericRpcHandler, ...]) -> None:
        """What the generated `add_*_to_server` calls on a server."""
        self._handlers.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        """Also called by the generated code; the generic handlers already route these methods."""

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        for handlers in self._handlers:
            handler = handlers.service(handler_call_details)
            if handler is not None:
                return handler
        if handler_call_details.method.rpartition("/")[0].lstrip("/") in self._starting:
            return grpc.stream_stream_rpc_method_handler(_not_ready)
        return None


async def _not_ready(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
    # Take the client's first message before refusing: a refusal sent while the client is still writing it
    # reaches a Python aio client as a failed send (INTERNAL), not as our status.
    with contextlib.suppress(asyncio.TimeoutError, StopAsyncIteration):
        await asyncio.wait_for(anext(aiter(requests)), FIRST_MESSAGE_WAIT_S)
    raise Unavailable("this worker's engine is still starting; retry shortly", reason="NOT_READY")
    yield  # a stream handler, so it answers every kind of call


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without `authorization: Bearer <token>` (UNAUTHENTICATED); health checks stay open, so
    probes and balancers need no secret."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        if handler_call_details.method.startswith(HEALTH_PREFIX):
            return await continuation(handler_call_details)
        given = next((value for key, value in handler_call_details.invocation_metadata or ()
                      if key == "authorization"), None)
        if bearer_matches(given if isinstance(given, str) else None, self._token):
            return await continuation(handler_call_details)
        if given is None:
            refusal = Unauthenticated("this server requires a bearer token: send `authorization: Bearer <token>` "
                                      "metadata", reason="MISSING_TOKEN")
        else:
            refusal = Unauthenticated("the bearer token is not valid for this server", reason="BAD_TOKEN")
        return grpc.stream_stream_rpc_method_handler(functools.partial(_refuse, refusal))


async def _refuse(refusal: DynamoError, requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
    # As _not_ready: take the first message, so the client reads our status rather than a failed send.
    with contextlib.suppress(asyncio.TimeoutError, StopAsyncIteration):
        await asyncio.wait_for(anext(aiter(requests)), FIRST_MESSAGE_WAIT_S)
    await context.abort_with_status(refusal.to_status())
    yield  # a stream handler, so it answers every kind of call


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turns `DynamoError` into its status + ErrorInfo, and anything unexpected into a logged INTERNAL."""

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        parse = handler.request_deserializer
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _guard_unary(handler.unary_unary, method),
                request_deserializer=_marking_undecodable(parse), response_serializer=handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _guard_stream(handler.unary_stream, method),
                request_deserializer=_marking_undecodable(parse), response_serializer=handler.response_serializer)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                _guard_stream(handler.stream_stream, method),
                request_deserializer=_refusing_undecodable(parse), response_serializer=handler.response_serializer)
        return handler


class _Undecodable:
    """A single request message that did not parse: gRPC parses it before our handler runs, and a parse
    error there leaves as UNKNOWN, so the guard refuses this stand-in instead."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _undecodable(error: Exception) -> InvalidArgument:
    return InvalidArgument(f"the request message does not parse as this method's request type ({error}); "
                           "send a message serialized from the proto", reason="UNDECODABLE_REQUEST")


def _marking_undecodable(parse: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if parse is None:
        return None

    def parse_or_mark(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as error:  # noqa: BLE001 - the client's bytes, refused by the guard
            return _Undecodable(error)

    return parse_or_mark


def _refusing_undecodable(parse: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """A stream's messages are parsed as the handler reads them: the refusal leaves through the guard."""
    if parse is None:
        return None

    def parse_or_refuse(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as error:  # noqa: BLE001 - the client's bytes
            raise _undecodable(error) from None

    return parse_or_refuse


async def _abort(context: grpc.aio.ServicerContext, error: Exception, method: str) -> None:
    if isinstance(error, DynamoError):
        log.info("%s failed for request %s: %s %s", method, error.request_id or "-", error.code.name, error.message)
        await context.abort_with_status(error.to_status())
    log.exception("%s failed unexpectedly", method, exc_info=error)
    await context.abort_with_status(DynamoError("internal error; see the server log").to_status())


def _guard_unary(behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            if type(request) is _Undecodable:
                raise _undecodable(request.error)
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as error:  # noqa: BLE001 - every failure must leave as a status
            await _abort(context, error, method)

    return guarded


def _guard_stream(behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
    if not inspect.isasyncgenfunction(behavior):  # it writes with context.write (Health.Watch does)
        return _guard_unary(behavior, method)

    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            if type(request) is _Undecodable:
                raise _undecodable(request.error)
            async for response in behavior(request, context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as error:  # noqa: BLE001 - every failure must leave as a status
            await _abort(context, error, method)

    return guarded
