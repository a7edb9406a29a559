"""grpc.health.v1 per service, as balancers and probes see it: NOT_SERVING while a worker's engine loads and
while a process drains on SIGTERM, SERVING in between; Watch streams each change; grpcurl reads it too."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dynamo_grpc.client import params
from dynamo_grpc.errors import error_reason
from dynamo_grpc.v1 import decode_pb2 as decode_pb
from dynamo_grpc.v1 import decode_pb2_grpc as decode_grpc
from tests.processes import RoleProcess
from tests.test_grpcurl import grpcurl

pytestmark = pytest.mark.slow

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
DECODE = "dynamo_grpc.v1.DecodeService"
MODEL = "sim-tiny"


class Watcher:
    """Every status one `Health.Watch` stream reports, in order."""

    def __init__(self, channel: grpc.aio.Channel, service: str) -> None:
        self.statuses: list[int] = []
        self._call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=service),
                                                               wait_for_ready=True)
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for reply in self._call:
                self.statuses.append(reply.status)
        except grpc.aio.AioRpcError:
            pass  # the server went away: the statuses so far are the record

    async def until(self, status: int, timeout_s: float = 20.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not self.statuses or self.statuses[-1] != status:
            assert asyncio.get_running_loop().time() < deadline, f"statuses so far: {self.statuses}"
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        self._call.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def decode_stream(stub: decode_grpc.DecodeServiceStub, request_id: str, max_tokens: int
                        ) -> AsyncIterator[decode_pb.DecodeResponse]:
    async def requests() -> AsyncIterator[decode_pb.DecodeRequest]:
        yield decode_pb.DecodeRequest(request_id=request_id, start=decode_pb.DecodeStart(
            params=params("health", model=MODEL, max_tokens=max_tokens, ignore_eos=True)))
    async for response in stub.Decode(requests()):
        yield response


@pytest.fixture
async def loading_decode(etcd, tmp_path: Path) -> AsyncIterator[RoleProcess]:
    """A decode worker whose engine loads for 10 s (long enough to be seen loading); steps of 10 ms."""
    worker = RoleProcess("decode", "--etcd", etcd.endpoint, "--engine", "simulated", "--model", MODEL,
                         "--load-s", "10", "--decode-step-s", "0.01", log_dir=tmp_path)
    yield worker
    worker.stop()


async def test_a_worker_is_not_serving_until_its_engine_is_up_then_drains_on_sigterm(
        loading_decode: RoleProcess) -> None:
    async with grpc.aio.insecure_channel(loading_decode.endpoint) as channel:
        # (1) While the engine loads: the port answers, the worker and its services say NOT_SERVING, and a
        # call to a service gets UNAVAILABLE (retryable), not UNIMPLEMENTED.
        overall, decode = Watcher(channel, ""), Watcher(channel, DECODE)
        await overall.until(NOT_SERVING)
        await decode.until(NOT_SERVING)
        checked = json.loads(await grpcurl("-d", json.dumps({"service": DECODE}), loading_decode.endpoint,
                                           "grpc.health.v1.Health/Check"))
        stub = decode_grpc.DecodeServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in decode_stream(stub, "early", 4):
                pass
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_reason(refused.value) == "NOT_READY"
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.GetDecodeStats(decode_pb.GetDecodeStatsRequest())
        assert (refused.value.code(), error_reason(refused.value)) == (grpc.StatusCode.UNAVAILABLE, "NOT_READY")
        assert checked == {"status": "NOT_SERVING"}, "the engine loaded before the check: raise --load-s"

        # (2) The engine is up: SERVING, and Watch saw the change without polling.
        await decode.until(SERVING)
        await overall.until(SERVING)
        assert decode.statuses == [NOT_SERVING, SERVING] and overall.statuses == [NOT_SERVING, SERVING]
        events = await grpcurl("-d", json.dumps({"service": "dynamo_grpc.v1.KvEventService"}),
                               loading_decode.endpoint, "grpc.health.v1.Health/Check")
        assert json.loads(events) == {"status": "SERVING"}

        # (3) SIGTERM with a generation in flight: NOT_SERVING at once, and the generation still finishes.
        responses = decode_stream(stub, "in-flight", 150)
        first = await anext(responses)
        assert first.HasField("tokens")
        loading_decode.signal(signal.SIGTERM)
        await decode.until(NOT_SERVING, timeout_s=20)
        await overall.until(NOT_SERVING, timeout_s=20)
        last = [r async for r in responses][-1]
        assert last.completion.usage.completion_tokens == 150
        assert await asyncio.to_thread(loading_decode.wait_exit) == 0
        await overall.close()
        await decode.close()


async def test_a_router_reports_serving_then_not_serving_when_it_drains(etcd, tmp_path: Path) -> None:
    router = RoleProcess("router", "--etcd", etcd.endpoint, log_dir=tmp_path)
    try:
        await router.wait_serving()
        async with grpc.aio.insecure_channel(router.endpoint) as channel:
            watcher = Watcher(channel, "dynamo_grpc.v1.RouterService")
            await watcher.until(SERVING)
            router.signal(signal.SIGTERM)
            await watcher.until(NOT_SERVING, timeout_s=20)
            await watcher.close()
        assert await asyncio.to_thread(router.wait_exit) == 0
    finally:
        router.stop()
