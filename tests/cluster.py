"""Test helpers: a one-host deployment over real sockets, and stubs to reach each of its services."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import openai
import pytest

from control_plane.deployment import Deployment, start_all_in_one
from dynamo_grpc.channels import CHANNEL_OPTIONS
from dynamo_grpc.client import GenerateStream, RouterClient
from dynamo_grpc.config import ServerConfig, WorkerConfig
from dynamo_grpc.engine import SimulatedEngineConfig
from dynamo_grpc.errors import error_reason
from dynamo_grpc.frontend.backends import Backend, EmbeddedRouter, RemoteRouter
from dynamo_grpc.frontend.http import RunningFrontend, start_frontend
from dynamo_grpc.kv.handle_key import KvKey
from dynamo_grpc.registry import MemoryRegistry, Registry
from dynamo_grpc.routing.router import open_router
from dynamo_grpc.v1 import common_pb2 as pb
from dynamo_grpc.v1 import decode_pb2 as decode_pb
from dynamo_grpc.v1 import decode_pb2_grpc as decode_grpc
from dynamo_grpc.v1 import kv_transfer_pb2_grpc as kv_grpc
from dynamo_grpc.v1 import prefill_pb2 as prefill_pb
from dynamo_grpc.v1 import prefill_pb2_grpc as prefill_grpc
from tests import scrape
from tests.waiting import eventually

MODEL = "sim-tiny"
FAST_ENGINE = SimulatedEngineConfig(model=MODEL, decode_step_s=0.001, prefill_s_per_token=1e-5, num_blocks=512)
KV_KEY = KvKey(b"the test deployment's KV key...." * 2)
"""The KV key of every deployment these helpers start, so tests can sign handles of their own."""


def text_of(token_ids: list[int]) -> str:
    """The simulated model's detokenizer: bytes, the end-of-sequence token (256) has no text."""
    return bytes(t for t in token_ids if t < 256).decode()


def worker_config(**engine: object) -> WorkerConfig:
    return WorkerConfig(server=ServerConfig(port=0), engine=dataclasses.replace(FAST_ENGINE, **engine),
                        kv_key=KV_KEY)


@dataclass
class Stubs:
    """Typed stubs for every service of a deployment."""

    deployment: Deployment

    def __post_init__(self) -> None:
        self._channels: list[grpc.aio.Channel] = []
        self.router = RouterClient(self.deployment.router.endpoint)
        self.prefill = prefill_grpc.PrefillServiceStub(self._channel(self.deployment.prefill.endpoint))
        self.kv = kv_grpc.KvTransferServiceStub(self._channel(self.deployment.prefill.endpoint))
        self.decode = decode_grpc.DecodeServiceStub(self._channel(self.deployment.decode.endpoint))

    def _channel(self, endpoint: str) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(endpoint, options=CHANNEL_OPTIONS)
        self._channels.append(channel)
        return channel

    async def close(self) -> None:
        await self.router.channel.close()
        for channel in self._channels:
            await channel.close()

    async def prefill_stats(self) -> pb.WorkerStats:
        return (await self.prefill.GetPrefillStats(prefill_pb.GetPrefillStatsRequest())).stats

    async def decode_stats(self) -> pb.WorkerStats:
        return (await self.decode.GetDecodeStats(decode_pb.GetDecodeStatsRequest())).stats

    async def prefilling(self) -> bool:
        """The prefill worker's engine is running a request."""
        return (await self.prefill_stats()).active_requests > 0

    async def decoding(self) -> bool:
        """The decode worker's engine is running a request."""
        return (await self.decode_stats()).active_requests > 0

    async def until_idle(self, timeout_s: float) -> None:
        """Wait until neither engine runs a request; fail if that takes over `timeout_s`."""
        async def idle() -> bool:
            return not await self.prefilling() and not await self.decoding()

        await eventually(idle, timeout_s, "both engines to be idle")

    async def assert_no_leaks(self) -> None:
        """Both engines, the prefill's KV store and both NIXL agents hold nothing."""
        prefill, decode = await self.prefill_stats(), await self.decode_stats()
        assert (prefill.active_requests, prefill.used_kv_blocks, prefill.held_transfers,
                prefill.nixl_registrations) == (0, 0, 0, 0), prefill
        assert (decode.active_requests, decode.used_kv_blocks, decode.nixl_registrations) == (0, 0, 0), decode


@contextlib.asynccontextmanager
async def deployed(config: WorkerConfig, registry: Registry, **settings: Any) -> AsyncIterator[Stubs]:
    """A one-host deployment (`start_all_in_one` with `settings`) and stubs to reach it, stopped after."""
    deployment = await start_all_in_one(config, registry, **settings)
    stubs = Stubs(deployment)
    try:
        yield stubs
    finally:
        await stubs.close()
        await deployment.stop()


@contextlib.asynccontextmanager
async def running(**engine: object) -> AsyncIterator[Stubs]:
    """A one-host deployment on the fast simulated engine (with `engine` settings changed), stopped after."""
    registry = MemoryRegistry()
    try:
        async with deployed(worker_config(**engine), registry) as stubs:
            yield stubs
    finally:
        await registry.close()


async def cancel_after_first_tokens(stream: GenerateStream) -> pb.Completion:
    """Cancel `stream` in-band once its first tokens arrive; the completion it then ends with."""
    responses = aiter(stream)
    while not (await anext(responses)).HasField("tokens"):
        pass
    stream.cancel()
    return [r async for r in responses][-1].completion


async def rpc_failure(awaitable) -> tuple[grpc.StatusCode, str]:
    """The status code and ErrorInfo reason a call fails with."""
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await awaitable
    return failure.value.code(), error_reason(failure.value)


@dataclass
class Served:
    """A deployment behind the OpenAI frontend, with the `openai` SDK and an HTTP client pointed at it."""

    stubs: Stubs
    frontend: RunningFrontend
    client: openai.AsyncOpenAI
    http: httpx.AsyncClient
    mode: str
    """Where the frontend's router runs (FRONTEND_MODES)."""

    async def metric(self, series: str) -> float:
        """One series' value from /metrics (0 while it does not exist yet)."""
        return scrape.value((await self.http.get("/metrics")).text, series)


FRONTEND_MODES = ("embedded", "remote")
"""The frontend routes in its own process (the default), or forwards to the deployment's RouterService."""


@contextlib.asynccontextmanager
async def openai_frontend(stubs: Stubs, chat_template: str | None = None, *, mode: str = "embedded"
                          ) -> AsyncIterator[Served]:
    """The OpenAI frontend in front of `stubs`' workers, stopped after: with a router of its own following the
    registry (`embedded`, as `dynamo-grpc frontend --etcd` runs), or forwarding to the deployment's router."""
    registry = stubs.deployment.router.registry
    async with contextlib.AsyncExitStack() as stack:
        backend: Backend
        if mode == "embedded":
            router = await open_router(registry)
            stack.push_async_callback(router.close)
            backend = EmbeddedRouter(router)
        else:
            backend = remote = RemoteRouter(stubs.deployment.router.endpoint)
            stack.push_async_callback(remote.close)
        frontend = await start_frontend(backend, registry, host="127.0.0.1", port=0, chat_template=chat_template)
        stack.push_async_callback(frontend.stop)
        client = openai.AsyncOpenAI(base_url=f"{frontend.url}/v1", api_key="unused", max_retries=0)
        stack.push_async_callback(client.close)
        http = httpx.AsyncClient(base_url=frontend.url)
        stack.push_async_callback(http.aclose)
        yield Served(stubs, frontend, client, http, mode)
