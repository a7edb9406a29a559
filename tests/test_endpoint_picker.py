"""The router as a Gateway API Inference Extension endpoint picker: a gRPC client plays Envoy's part of the
External Processing API (request headers, body, the header mutation and metadata it gets back), over a fleet
of two hosts (127.0.0.1 and 127.0.0.2, a prefill and a decode worker on each); the OpenAI frontend then runs
a request on the pair the picker named."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from envoy.config.core.v3 import base_pb2 as core_pb
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as mode_pb
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_grpc
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dynamo_grpc.config import EndpointPickerConfig, ServerConfig
from dynamo_grpc.frontend.backends import EmbeddedRouter
from dynamo_grpc.frontend.http import start_frontend
from dynamo_grpc.registry import MemoryRegistry
from dynamo_grpc.roles import RunningRole, start_decode, start_prefill, start_router
from dynamo_grpc.routing.router import open_router
from dynamo_grpc.v1 import common_pb2 as pb
from dynamo_grpc.v1 import decode_pb2 as decode_pb
from dynamo_grpc.v1 import decode_pb2_grpc as decode_grpc
from dynamo_grpc.v1 import prefill_pb2 as prefill_pb
from dynamo_grpc.v1 import prefill_pb2_grpc as prefill_grpc
from tests.cluster import MODEL, worker_config
from tests.processes import RoleProcess, free_port

HOSTS = {"127.0.0.1": "node-a", "127.0.0.2": "node-b"}
PICKER_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
TARGET_PORT = 8000


@dataclass
class Fleet:
    prefill: dict[str, RunningRole]
    """By host."""
    decode: dict[str, RunningRole]
    router: RunningRole
    picker: ext_grpc.ExternalProcessorStub
    picker_port: int
    registry: MemoryRegistry

    def host_of(self, worker_id: str) -> str:
        return next(host for roles in (self.prefill, self.decode) for host, role in roles.items()
                    if role.worker_id == worker_id)


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    registry = MemoryRegistry()
    roles: list[RunningRole] = []
    try:
        prefill, decode = {}, {}
        for host, node in HOSTS.items():
            config = dataclasses.replace(worker_config(decode_step_s=0.005), server=ServerConfig(
                host=host, port=0, node_name=node))
            prefill[host] = await start_prefill(config, registry)
            decode[host] = await start_decode(config, registry)
            roles += [prefill[host], decode[host]]
        port = free_port()
        picker = EndpointPickerConfig(port, TARGET_PORT)
        router = await start_router(ServerConfig(port=0), registry, ext_proc=picker)
        roles.append(router)
        assert router.fleet is not None and await router.fleet.until_paired(timeout=10.0)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield Fleet(prefill, decode, router, ext_grpc.ExternalProcessorStub(channel), port, registry)
    finally:
        for role in reversed(roles):
            await role.stop()
        await registry.close()


def headers(path: str, *, end_of_stream: bool = False, **extra: str) -> ext_pb.HttpHeaders:
    pairs = {":method": "POST" if not end_of_stream else "GET", ":path": path, ":authority": "gateway",
             "content-type": "application/json", **extra}
    return ext_pb.HttpHeaders(headers=core_pb.HeaderMap(headers=[
        core_pb.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()]),
        end_of_stream=end_of_stream)


def completion_body(prompt: str, **fields: object) -> bytes:
    return json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": 8, **fields}).encode()


class Envoy:
    """One ext_proc stream, as Envoy drives it for one request."""

    def __init__(self, stub: ext_grpc.ExternalProcessorStub) -> None:
        self.call = stub.Process()

    async def send(self, **fields: object) -> None:
        await self.call.write(ext_pb.ProcessingRequest(**fields))

    async def receive(self) -> ext_pb.ProcessingResponse:
        return await self.call.read()

    def close(self) -> None:
        self.call.cancel()


@contextlib.asynccontextmanager
async def buffered_pick(fleet: Fleet, body: bytes, path: str = "/v1/completions",
                        metadata: core_pb.Metadata | None = None) -> AsyncIterator[ext_pb.ProcessingResponse]:
    """Headers, then the whole body (BUFFERED); yields the answer to the body, the stream held open (the
    request running) until the block ends."""
    envoy = Envoy(fleet.picker)
    try:
        await envoy.send(request_headers=headers(path), metadata_context=metadata or core_pb.Metadata())
        assert (await envoy.receive()).HasField("request_headers")
        await envoy.send(request_body=ext_pb.HttpBody(body=body, end_of_stream=True))
        yield await envoy.receive()
    finally:
        envoy.close()


def set_headers(mutation: ext_pb.HeaderMutation) -> dict[str, str]:
    return {h.header.key: h.header.raw_value.decode() for h in mutation.set_headers}


def lb_endpoint(response: ext_pb.ProcessingResponse) -> str:
    return response.dynamic_metadata["envoy.lb"]["x-gateway-destination-endpoint"]


async def test_the_pick_names_the_frontend_beside_the_decode_worker_and_a_same_host_prefill_worker(
        fleet: Fleet) -> None:
    async with buffered_pick(fleet, completion_body("a first prompt " * 8)) as answer:
        common = answer.request_body.response
        picked = set_headers(common.header_mutation)
        decode_host = fleet.host_of(picked["x-dynamo-decode-worker"])
        # (1) Envoy's header and metadata name one endpoint: the decode worker's host, the target port.
        endpoint = picked["x-gateway-destination-endpoint"]
        assert endpoint == f"{decode_host}:{TARGET_PORT}" == lb_endpoint(answer)
        assert common.clear_route_cache
        # (2) The prefill worker travels along: the router's same-host pairing.
        assert fleet.host_of(picked["x-dynamo-prefill-worker"]) == decode_host
        # (3) While this request runs (its stream open), the next ones go to the other, idle pair (equal
        # pairs would take turns).
        for i in range(8):
            async with buffered_pick(fleet, completion_body(f"another prompt {i} " * 8)) as later:
                other = set_headers(later.request_body.response.header_mutation)
                assert fleet.host_of(other["x-dynamo-decode-worker"]) != decode_host
                assert fleet.host_of(other["x-dynamo-prefill-worker"]) != decode_host


async def test_full_duplex_streaming_answers_the_headers_after_the_whole_body_and_passes_it_on(
        fleet: Fleet) -> None:
    body = completion_body("streamed in two chunks " * 4)
    envoy = Envoy(fleet.picker)
    try:
        duplex = ext_pb.ProtocolConfiguration(request_body_mode=mode_pb.ProcessingMode.FULL_DUPLEX_STREAMED)
        await envoy.send(request_headers=headers("/v1/completions"), protocol_config=duplex)
        await envoy.send(request_body=ext_pb.HttpBody(body=body[:20]))
        await envoy.send(request_body=ext_pb.HttpBody(body=body[20:], end_of_stream=True))
        to_headers, to_body = await envoy.receive(), await envoy.receive()
        picked = set_headers(to_headers.request_headers.response.header_mutation)
        assert picked["x-gateway-destination-endpoint"] == lb_endpoint(to_headers)
        assert fleet.host_of(picked["x-dynamo-decode-worker"]) in HOSTS
        streamed = to_body.request_body.response.body_mutation.streamed_response
        assert (streamed.body, streamed.end_of_stream) == (body, True)
        # The response phase streams through unchanged.
        await envoy.send(response_headers=ext_pb.HttpHeaders(headers=core_pb.HeaderMap()))
        assert (await envoy.receive()).HasField("response_headers")
        await envoy.send(response_body=ext_pb.HttpBody(body=b"data: [DONE]\n\n", end_of_stream=True))
        passed = (await envoy.receive()).response_body.response.body_mutation.streamed_response
        assert (passed.body, passed.end_of_stream) == (b"data: [DONE]\n\n", True)
    finally:
        envoy.close()

    # A body that ends with trailers: the answer comes with them, the body goes back still open.
    envoy = Envoy(fleet.picker)
    try:
        await envoy.send(request_headers=headers("/v1/completions"), protocol_config=duplex)
        await envoy.send(request_body=ext_pb.HttpBody(body=body))
        await envoy.send(request_trailers=ext_pb.HttpTrailers())
        answers = [await envoy.receive() for _ in range(3)]
        assert [a.WhichOneof("response") for a in answers] == ["request_headers", "request_body",
                                                               "request_trailers"]
        streamed = answers[1].request_body.response.body_mutation.streamed_response
        assert (streamed.body, streamed.end_of_stream) == (body, False)
    finally:
        envoy.close()


async def test_the_gateways_subset_hint_limits_the_pick_and_bad_requests_are_answered_for_envoy(
        fleet: Fleet) -> None:
    only_b = core_pb.Metadata()
    hint = struct_pb2.Struct()
    hint.update({"x-gateway-destination-endpoint-subset": [f"127.0.0.2:{TARGET_PORT}"]})
    only_b.filter_metadata["envoy.lb.subset_hint"].CopyFrom(hint)
    for _ in range(3):
        async with buffered_pick(fleet, completion_body("subset"), metadata=only_b) as answer:
            assert lb_endpoint(answer) == f"127.0.0.2:{TARGET_PORT}"

    nowhere = core_pb.Metadata()
    hint.update({"x-gateway-destination-endpoint-subset": ["10.9.9.9:8000"]})
    nowhere.filter_metadata["envoy.lb.subset_hint"].CopyFrom(hint)
    refusals = {}
    for name, body, metadata in (("subset", completion_body("x"), nowhere),
                                 ("model", json.dumps({"model": "no-such", "prompt": "x"}).encode(), None),
                                 ("json", b"{not json", None)):
        async with buffered_pick(fleet, body, metadata=metadata) as answer:
            refusals[name] = (answer.immediate_response.status.code,
                              json.loads(answer.immediate_response.body)["error"]["code"])
    assert refusals == {"subset": (503, "no_workers"), "model": (404, "model_not_found"),
                        "json": (400, "invalid_json")}

    # A request without a body (GET /v1/models) still gets an endpoint, at once.
    envoy = Envoy(fleet.picker)
    try:
        await envoy.send(request_headers=headers("/v1/models", end_of_stream=True))
        answer = await envoy.receive()
        picked = set_headers(answer.request_headers.response.header_mutation)
        assert picked["x-gateway-destination-endpoint"] in {f"{host}:{TARGET_PORT}" for host in HOSTS}
    finally:
        envoy.close()


async def test_the_frontend_runs_a_request_on_the_pair_the_picker_named(fleet: Fleet) -> None:
    # The frontend a gateway would reach on the picked endpoint, routing in its own process.
    router = await open_router(fleet.registry)
    frontend = await start_frontend(EmbeddedRouter(router), fleet.registry, host="127.0.0.1", port=0)
    try:
        async with buffered_pick(fleet, completion_body("run me where you picked " * 4)) as answer:
            picked = set_headers(answer.request_body.response.header_mutation)
        # Cross-host on purpose: a pair the frontend's own router would not choose on an idle fleet.
        decode_id = picked["x-dynamo-decode-worker"]
        prefill_id = next(role.worker_id for host, role in fleet.prefill.items()
                          if host != fleet.host_of(decode_id))
        before = await stats(fleet)
        async with httpx.AsyncClient(base_url=frontend.url, timeout=30) as http:
            reply = await http.post("/v1/completions",
                                    content=completion_body("run me where you picked " * 4),
                                    headers={"content-type": "application/json",
                                             "x-dynamo-decode-worker": decode_id,
                                             "x-dynamo-prefill-worker": prefill_id})
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["prompt_tokens_details"]["kv_transferred_tokens"] > 0
        after = await stats(fleet)
        finished = {worker: after[worker].requests_finished - before[worker].requests_finished
                    for worker in after}
        assert finished == {worker: int(worker in (decode_id, prefill_id)) for worker in after}
    finally:
        await frontend.stop()
        await router.close()


async def stats(fleet: Fleet) -> dict[str, pb.WorkerStats]:
    found = {}
    for roles, stub, call, request in ((fleet.prefill, prefill_grpc.PrefillServiceStub, "GetPrefillStats",
                                        prefill_pb.GetPrefillStatsRequest()),
                                       (fleet.decode, decode_grpc.DecodeServiceStub, "GetDecodeStats",
                                        decode_pb.GetDecodeStatsRequest())):
        for role in roles.values():
            async with grpc.aio.insecure_channel(role.endpoint) as channel:
                found[role.worker_id] = (await getattr(stub(channel), call)(request)).stats
    return found


async def test_the_picker_reports_its_health_under_the_ext_proc_service_name(fleet: Fleet) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{fleet.picker_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=PICKER_SERVICE))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.slow
async def test_the_router_command_serves_the_picker_on_its_ext_proc_port(etcd, tmp_path: Path) -> None:
    port = free_port()
    router = RoleProcess("router", "--etcd", etcd.endpoint, "--ext-proc-port", str(port), log_dir=tmp_path)
    try:
        await router.wait_serving()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service=PICKER_SERVICE),
                                       wait_for_ready=True)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            # No workers registered yet: the gateway is told 503, in OpenAI's error shape.
            envoy = Envoy(ext_grpc.ExternalProcessorStub(channel))
            try:
                await envoy.send(request_headers=headers("/v1/completions"))
                await envoy.receive()
                await envoy.send(request_body=ext_pb.HttpBody(body=completion_body("hi"), end_of_stream=True))
                refused = (await envoy.receive()).immediate_response
            finally:
                envoy.close()
        assert (refused.status.code, json.loads(refused.body)["error"]["code"]) == (503, "no_workers")
    finally:
        router.stop()
