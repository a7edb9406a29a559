"""OpenTelemetry tracing, the `otel` extra: one trace per request, frontend -> router -> prefill -> KV
transfer -> decode (README: Observability).

Off unless `configure` turned it on (the CLI does when an OTLP endpoint is given) and OpenTelemetry is
installed; while off, every hook below is one function call that returns at once, and servers get no
interceptor. The W3C `traceparent` travels in gRPC metadata on every call of a request (Prefill, Decode,
PullKv, ReleaseKv, and Generate from a frontend to a remote router); the HTTP frontend takes it from its
clients' headers.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any

import grpc

log = logging.getLogger(__name__)

TRACED_METHODS = frozenset({
    "/dynamo_grpc.v1.RouterService/Generate",
    "/dynamo_grpc.v1.PrefillService/Prefill",
    "/dynamo_grpc.v1.DecodeService/Decode",
    "/dynamo_grpc.v1.KvTransferService/PullKv",
    "/dynamo_grpc.v1.KvTransferService/ReleaseKv",
})
"""The calls a request makes; stats polls, KV events and health checks are left out."""

_tracer: Any = None
"""The tracer while tracing is on; None while off."""
_NOT_TRACING = contextlib.nullcontext()


def enabled() -> bool:
    return _tracer is not None


def configure(service_name: str, *, endpoint: str = "", provider: Any = None) -> bool:
    """Trace this process's requests as `service_name`: to the OTLP/gRPC collector at `endpoint`, or into
    `provider` (a TracerProvider of one's own, e.g. with an in-memory exporter). False, and tracing stays
    off, when OpenTelemetry is not installed."""
    global _tracer
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning("tracing asked for, but OpenTelemetry is not installed: pip install 'dynamo-grpc[otel]'")
        return False
    if provider is None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        name = os.environ.get("OTEL_SERVICE_NAME", service_name)
        provider = TracerProvider(resource=Resource.create({"service.name": name}))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        trace.set_tracer_provider(provider)
        log.info("tracing requests to the OTLP collector at %s as %s", endpoint, name)
    _tracer = provider.get_tracer("dynamo_grpc")
    return True


def disable() -> None:
    """Stop tracing (servers started meanwhile keep their interceptor, which then passes calls through)."""
    global _tracer
    _tracer = None


def span(name: str, **attributes: Any) -> contextlib.AbstractContextManager[Any]:
    """A span of this process's part of the request, current inside `with`; nothing while off."""
    if _tracer is None:
        return _NOT_TRACING
    return _tracer.start_as_current_span(name, attributes=attributes)


def http_span(method: str, path: str, headers: Mapping[str, str]) -> contextlib.AbstractContextManager[Any]:
    """The frontend's span of an HTTP request, continuing the client's trace when it sent `traceparent`."""
    if _tracer is None:
        return _NOT_TRACING
    from opentelemetry import propagate, trace

    return _tracer.start_as_current_span(f"{method} {path}", context=propagate.extract(headers),
                                         kind=trace.SpanKind.SERVER,
                                         attributes={"http.request.method": method, "url.path": path})


def metadata() -> tuple[tuple[str, str], ...] | None:
    """gRPC metadata carrying the current span (`traceparent`); None while off."""
    if _tracer is None:
        return None
    from opentelemetry import propagate

    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple(carrier.items())


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """What a server needs to continue its callers' traces: nothing while off."""
    return [TracingInterceptor()] if _tracer is not None else []


class TracingInterceptor(grpc.aio.ServerInterceptor):
    """Each traced call runs in a server span whose parent is the caller's `traceparent`."""

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method not in TRACED_METHODS:
            return handler
        name = method.rpartition(".")[2]  # "DecodeService/Decode"
        carrier = {key: value for key, value in handler_call_details.invocation_metadata or ()
                   if isinstance(value, str)}
        kinds = ("unary_unary", "unary_stream", "stream_stream")
        for kind in kinds:
            behavior = getattr(handler, kind)
            if behavior is not None:
                wrap = _traced_unary if kind == "unary_unary" else _traced_stream
                make = getattr(grpc, f"{kind}_rpc_method_handler")
                return make(wrap(behavior, name, carrier), request_deserializer=handler.request_deserializer,
                            response_serializer=handler.response_serializer)
        return handler


@contextlib.contextmanager
def _server_span(name: str, carrier: dict[str, str]) -> Iterator[Any]:
    if _tracer is None:
        yield None
        return
    from opentelemetry import propagate, trace

    with _tracer.start_as_current_span(name, context=propagate.extract(carrier), kind=trace.SpanKind.SERVER,
                                       attributes={"rpc.system": "grpc", "rpc.method": name}) as current:
        yield current


def _traced_unary(behavior: Callable[..., Any], name: str, carrier: dict[str, str]) -> Callable[..., Any]:
    async def traced(request: Any, context: grpc.aio.ServicerContext) -> Any:
        with _server_span(name, carrier):
            return await behavior(request, context)

    return traced


def _traced_stream(behavior: Callable[..., Any], name: str, carrier: dict[str, str]
                   ) -> Callable[..., AsyncIterator[Any]]:
    async def traced(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        with _server_span(name, carrier):
            async for response in behavior(request, context):
                yield response

    return traced
