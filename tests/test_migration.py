"""Migration: when a decode worker dies mid-stream, another resumes the request and the client's stream
continues with no token lost or repeated."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator

import grpc
import pytest

from control_plane.deployment import start_all_in_one
from dynamo_grpc import metrics
from dynamo_grpc.client import GenerateStream, params
from dynamo_grpc.config import ServerConfig
from dynamo_grpc.frontend.backends import EmbeddedRouter
from dynamo_grpc.registry import MemoryRegistry
from dynamo_grpc.roles import RunningRole, start_decode
from dynamo_grpc.v1 import common_pb2 as pb
from dynamo_grpc.v1 import decode_pb2 as decode_pb
from dynamo_grpc.v1 import decode_pb2_grpc as decode_grpc
from tests import scrape
from tests.cluster import FRONTEND_MODES, MODEL, Served, Stubs, openai_frontend, rpc_failure, worker_config
from tests.waiting import eventually

PROMPT, MAX_TOKENS = "migrate me, please", 150


async def busy_worker(*roles: RunningRole) -> RunningRole:
    """The decode worker running our one request."""
    for role in roles:
        async with grpc.aio.insecure_channel(role.endpoint) as channel:
            stats = await decode_grpc.DecodeServiceStub(channel).GetDecodeStats(decode_pb.GetDecodeStatsRequest())
        if stats.stats.active_requests:
            return role
    raise AssertionError("no decode worker is running the request")


@contextlib.asynccontextmanager
async def two_decode_workers() -> AsyncIterator[tuple[Stubs, RunningRole]]:
    """A deployment with a spare decode worker that the router knows of, and the spare."""
    registry = MemoryRegistry()
    config = worker_config(decode_step_s=0.004)
    deployment = await start_all_in_one(config, registry)
    spare = await start_decode(dataclasses.replace(config, server=ServerConfig(port=0)), registry)

    async def router_sees_both() -> bool:
        assert deployment.router.fleet is not None
        return {spare.worker_id, deployment.decode.worker_id} <= set(deployment.router.fleet.workers)

    stubs = Stubs(deployment)
    try:
        await eventually(router_sees_both, 5.0, "the router to see the second decode worker")
        yield stubs, spare
    finally:
        await stubs.close()
        await spare.stop()
        await deployment.stop()
        await registry.close()


async def test_a_request_survives_its_decode_worker_dying() -> None:
    async with two_decode_workers() as (stubs, spare):
        deployment = stubs.deployment
        expected = (await stubs.router.generate(PROMPT, model=MODEL, max_tokens=MAX_TOKENS,
                                                ignore_eos=True).collect()).token_ids
        migrations = scrape.value(metrics.exposition().decode(), "dynamo_router_migrations_total")
        stream = stubs.router.generate(PROMPT, model=MODEL, max_tokens=MAX_TOKENS, ignore_eos=True)
        tokens: list[int] = []
        completion = None
        lost = None
        async for response in stream:
            if response.HasField("completion"):
                completion = response.completion
                continue
            tokens += response.tokens.token_ids
            if lost is None and len(tokens) >= 20:
                lost = await busy_worker(deployment.decode, spare)
                await lost.server.server.stop(0)  # dies mid-stream, still registered
        assert lost is not None and completion is not None
        assert tokens == expected  # nothing lost, nothing repeated
        assert completion.usage.completion_tokens == MAX_TOKENS
        assert completion.decode_worker_id not in ("", lost.worker_id)
        assert scrape.value(metrics.exposition().decode(), "dynamo_router_migrations_total") == migrations + 1
        # With no worker left to resume on, the loss itself is reported.
        survivor = spare if lost is deployment.decode else deployment.decode
        stream = stubs.router.generate(PROMPT, model=MODEL, max_tokens=MAX_TOKENS, ignore_eos=True)

        async def kill_after_first_tokens() -> None:
            async for response in stream:
                if response.HasField("tokens"):
                    await survivor.server.server.stop(0)

        code, _ = await rpc_failure(kill_after_first_tokens())
        assert code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


async def test_stop_strings_still_cut_the_text_after_a_migration() -> None:
    async with two_decode_workers() as (stubs, spare):
        full = await stubs.router.generate(PROMPT, model=MODEL, max_tokens=MAX_TOKENS,
                                           ignore_eos=True).collect()
        stop = full.text[100:103]
        request = params(PROMPT, model=MODEL, max_tokens=MAX_TOKENS, ignore_eos=True)
        request.sampling.stop.append(stop)
        tokens: list[int] = []
        text, completion, lost = "", None, None
        async for response in GenerateStream(stubs.router.stub, "stop-after-migration", request):
            if response.HasField("completion"):
                completion = response.completion
                continue
            tokens += response.tokens.token_ids
            text += response.tokens.text
            if lost is None and len(tokens) >= 20:
                lost = await busy_worker(stubs.deployment.decode, spare)
                await lost.server.server.stop(0)
        assert lost is not None and completion is not None and completion.decode_worker_id != lost.worker_id
        # The resuming worker matches on its own text; what was relayed before could not start a match.
        assert text == full.text[:full.text.index(stop)] and completion.finish_reason == pb.FINISH_REASON_STOP
        assert tokens == full.token_ids[:len(tokens)] and completion.usage.completion_tokens == len(tokens)


@pytest.mark.parametrize("mode", FRONTEND_MODES)
async def test_an_http_stream_survives_its_decode_worker_dying(mode: str) -> None:
    async with two_decode_workers() as (stubs, spare), openai_frontend(stubs, mode=mode) as served:
        expected = (await stubs.router.generate(PROMPT, model=MODEL, max_tokens=MAX_TOKENS,
                                                ignore_eos=True).collect()).token_ids
        if mode == "embedded":  # the frontend's own router must know the spare to resume there
            await eventually(lambda: _knows(served, spare.worker_id), 5.0, "the frontend's router to see the spare")
        stream = await served.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS,
                                                        stream=True, temperature=0.0,
                                                        stream_options={"include_usage": True},
                                                        extra_body={"ignore_eos": True, "return_token_ids": True})
        tokens: list[int] = []
        usage, lost = None, None
        async for chunk in stream:
            usage = chunk.usage or usage
            tokens += [t for c in chunk.choices for t in c.token_ids or ()]
            if lost is None and len(tokens) >= 20:
                lost = await busy_worker(stubs.deployment.decode, spare)
                await lost.server.server.stop(0)  # dies mid-stream, still registered
        assert lost is not None and usage is not None
        assert tokens == expected and usage.completion_tokens == MAX_TOKENS  # nothing lost, nothing repeated


async def _knows(served: Served, worker_id: str) -> bool:
    backend = served.frontend.frontend.backend
    assert isinstance(backend, EmbeddedRouter)
    return worker_id in backend.router.fleet.workers
