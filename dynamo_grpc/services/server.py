"""The gRPC server every role runs: our services plus health, reflection and one error mapping."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from dynamo_grpc import tracing
from dynamo_grpc.channels import CHANNEL_OPTIONS
from dynamo_grpc.errors import DynamoError

log = logging.getLogger(__name__)


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

    async def stop(self, grace_s: float = 5.0) -> None:
        """Report NOT_SERVING first so balancers drain us, then stop accepting and finish in-flight calls."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)


async def start_server(bindings: list[ServiceBinding], *, host: str, port: int) -> RunningServer:
    server = grpc.aio.server(interceptors=[ErrorInterceptor(), *tracing.server_interceptors()],
                             options=CHANNEL_OPTIONS)
    for binding in bindings:
        binding.add_to_server(binding.servicer, server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    names = tuple(b.service_name for b in bindings)
    reflection.enable_server_reflection((*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                                         reflection.SERVICE_NAME), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}: address in use or not available; pick another --port")
    await server.start()
    for name in ("", *names):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(server, bound, health, names)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turns `DynamoError` into its status + ErrorInfo, and anything unexpected into a logged INTERNAL."""

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _guard_unary(handler.unary_unary, method),
                request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _guard_stream(handler.unary_stream, method),
                request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                _guard_stream(handler.stream_stream, method),
                request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
        return handler


async def _abort(context: grpc.aio.ServicerContext, error: Exception, method: str) -> None:
    if isinstance(error, DynamoError):
        log.info("%s failed for request %s: %s %s", method, error.request_id or "-", error.code.name, error.message)
        await context.abort_with_status(error.to_status())
    log.exception("%s failed unexpectedly", method, exc_info=error)
    await context.abort_with_status(DynamoError("internal error; see the server log").to_status())


def _guard_unary(behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as error:  # noqa: BLE001 - every failure must leave as a status
            await _abort(context, error, method)

    return guarded


def _guard_stream(behavior: Callable[..., Any], method: str) -> Callable[..., AsyncIterator[Any]]:
    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for response in behavior(request, context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as error:  # noqa: BLE001 - every failure must leave as a status
            await _abort(context, error, method)

    return guarded
