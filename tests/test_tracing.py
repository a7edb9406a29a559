"""OpenTelemetry tracing: one trace per request across frontend, router, prefill, KV transfer and decode.

The roles run in this process (with the in-memory exporter), but every hop between them is a real gRPC call
over a socket, so each link below is a `traceparent` that travelled in gRPC metadata; only the frontend's
embedded router is linked through the process's own context.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Iterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from dynamo_grpc import tracing
from dynamo_grpc.client import RouterClient
from dynamo_grpc.registry import MemoryRegistry
from tests.cluster import FRONTEND_MODES, MODEL, Stubs, deployed, openai_frontend, worker_config
from tests.waiting import eventually

CLIENT_TRACE = 0x0AF7651916CD43DD8448EB211C80319C
CLIENT_SPAN = 0xB7AD6B7169203331
TRACEPARENT = f"00-{CLIENT_TRACE:032x}-{CLIENT_SPAN:016x}-01"
REQUEST_SPANS = ("POST /v1/completions", "route", "PrefillService/Prefill", "DecodeService/Decode",
                 "kv.transfer", "KvTransferService/PullKv")


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    assert tracing.configure("dynamo-grpc-test", provider=provider)
    try:
        yield spans
    finally:
        tracing.disable()
        provider.shutdown()


@contextlib.asynccontextmanager
async def traced_deployment() -> AsyncIterator[Stubs]:
    """Started while tracing is on, so its servers continue their callers' traces. KV moves over gRPC (the
    transport every host has): ranged pulls that free the transfer once sent, so no ReleaseKv follows."""
    registry = MemoryRegistry()
    try:
        async with deployed(dataclasses.replace(worker_config(), kv_transports=("grpc",)), registry) as stubs:
            assert await stubs.deployment.router.fleet.until_paired(timeout=10.0)
            yield stubs
    finally:
        await registry.close()


def of_trace(exporter: InMemorySpanExporter, trace_id: int) -> dict[str, ReadableSpan]:
    spans = [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]
    by_name = {s.name: s for s in spans}
    assert len(by_name) == len(spans), [s.name for s in spans]  # each step once
    return by_name


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


@pytest.mark.parametrize("mode", FRONTEND_MODES)
async def test_one_trace_per_request_from_the_http_client_to_decode(exporter: InMemorySpanExporter,
                                                                    mode: str) -> None:
    async with traced_deployment() as stubs, openai_frontend(stubs, mode=mode) as served:
        reply = await served.http.post("/v1/completions", headers={"traceparent": TRACEPARENT}, json={
            "model": MODEL, "prompt": "trace me", "max_tokens": 4, "ignore_eos": True})
        assert reply.status_code == 200
        assert reply.json()["usage"]["prompt_tokens_details"]["kv_transferred_tokens"] > 0
        names = REQUEST_SPANS + (("RouterService/Generate",) if mode == "remote" else ())

        async def all_ended() -> bool:
            return set(of_trace(exporter, CLIENT_TRACE)) >= set(names)

        await eventually(all_ended, 20.0, "every span of the request to end")
    spans = of_trace(exporter, CLIENT_TRACE)
    assert set(spans) == set(names)
    http, route = spans["POST /v1/completions"], spans["route"]
    # The frontend continues the client's trace; the router runs under the frontend's span, in this process
    # (embedded) or behind RouterService (remote, its traceparent in the Generate call's metadata).
    assert parent_of(http) == CLIENT_SPAN
    if mode == "remote":
        assert parent_of(spans["RouterService/Generate"]) == http.context.span_id
        assert parent_of(route) == spans["RouterService/Generate"].context.span_id
    else:
        assert parent_of(route) == http.context.span_id
    # The router's calls carry its span to both workers; the decode worker's KV pull carries the transfer's.
    assert parent_of(spans["PrefillService/Prefill"]) == route.context.span_id
    assert parent_of(spans["DecodeService/Decode"]) == route.context.span_id
    transfer = spans["kv.transfer"]
    assert parent_of(transfer) == spans["DecodeService/Decode"].context.span_id
    assert transfer.attributes["kv.transport"] == "grpc" and transfer.attributes["kv.bytes"] > 0
    assert parent_of(spans["KvTransferService/PullKv"]) == transfer.context.span_id
    # Each step starts within its parent.
    for span in spans.values():
        parent = next((p for p in spans.values() if p.context.span_id == parent_of(span)), None)
        if parent is not None:
            assert parent.start_time <= span.start_time and span.end_time <= parent.end_time + 10**9


async def test_a_grpc_request_without_a_trace_starts_one_at_the_router(exporter: InMemorySpanExporter) -> None:
    async with traced_deployment() as stubs, RouterClient(stubs.deployment.router.endpoint) as client:
        result = await client.generate("no trace yet", model=MODEL, max_tokens=3, ignore_eos=True).collect()
        assert result.completion is not None and result.completion.kv_transfer.bytes > 0

        def generate_spans() -> list[ReadableSpan]:
            return [s for s in exporter.get_finished_spans() if s.name == "RouterService/Generate"]

        async def ended() -> bool:
            return bool(generate_spans()) and "DecodeService/Decode" in of_trace(
                exporter, generate_spans()[0].context.trace_id)

        await eventually(ended, 20.0, "the request's spans to end")
    [root] = generate_spans()
    assert root.parent is None
    assert set(of_trace(exporter, root.context.trace_id)) == {"RouterService/Generate", *REQUEST_SPANS[1:]}


def test_tracing_off_adds_nothing() -> None:
    assert not tracing.enabled()
    assert tracing.server_interceptors() == [] and tracing.metadata() is None
    assert tracing.span("route") is tracing.span("kv.transfer")  # one shared no-op, nothing allocated
    assert tracing.http_span("POST", "/v1/completions", {"traceparent": TRACEPARENT}) is tracing.span("route")


async def test_turned_off_servers_pass_calls_through_untraced(exporter: InMemorySpanExporter) -> None:
    async with traced_deployment() as stubs, openai_frontend(stubs) as served:
        tracing.disable()
        reply = await served.http.post("/v1/completions", headers={"traceparent": TRACEPARENT}, json={
            "model": MODEL, "prompt": "untraced", "max_tokens": 2})
        assert reply.status_code == 200
    assert exporter.get_finished_spans() == ()


async def test_a_malformed_traceparent_starts_a_new_trace(exporter: InMemorySpanExporter) -> None:
    async with traced_deployment() as stubs, openai_frontend(stubs) as served:
        reply = await served.http.post("/v1/completions", headers={"traceparent": "00-not-a-trace"}, json={
            "model": MODEL, "prompt": "fresh trace", "max_tokens": 2})
        assert reply.status_code == 200
    [http] = [s for s in exporter.get_finished_spans() if s.name == "POST /v1/completions"]
    assert http.parent is None and http.context.trace_id != CLIENT_TRACE
