"""One request through Router -> Prefill -> KvTransfer -> Decode over real sockets (in-memory registry)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator

import grpc
import pytest

from control_plane.deployment import start_all_in_one
from dynamo_grpc.client import params
from dynamo_grpc.kv.nixl_transport import DEFAULT_NIXL_MIN_BYTES, nixl_installed
from dynamo_grpc.registry import MemoryRegistry
from dynamo_grpc.routing.fleet import DisaggregationPolicy
from dynamo_grpc.v1 import common_pb2 as pb
from dynamo_grpc.v1 import decode_pb2 as decode_pb
from tests.cluster import MODEL, Stubs, deployed, running, text_of, worker_config
from tests.waiting import eventually


@pytest.fixture
async def cluster() -> AsyncIterator[Stubs]:
    async with running() as stubs:
        yield stubs


async def aggregated(stubs: Stubs, prompt: str | list[int], max_tokens: int) -> list[int]:
    """What the decode worker generates when it prefills locally (no KV handle)."""
    async def requests():
        yield decode_pb.DecodeRequest(request_id=f"agg-{prompt!r}"[:60], start=decode_pb.DecodeStart(
            params=params(prompt, model=MODEL, max_tokens=max_tokens, ignore_eos=True)))

    responses = [response async for response in stubs.decode.Decode(requests())]
    completion = responses[-1].completion
    assert completion.usage.completion_tokens == max_tokens and completion.kv_transfer.bytes == 0
    return [token for response in responses for token in response.tokens.token_ids]


PROMPTS = ["Hi", "x" * 32, "The quick brown fox jumps over the lazy dog. " * 5, "y" * 100, "shared prefix: one",
           "shared prefix: two", list(range(1, 200)), "z" * 257]


async def test_disaggregated_output_equals_aggregated(cluster: Stubs) -> None:
    # (1) Run every prompt concurrently through the router: prefill on one worker, decode on the other.
    results = await asyncio.gather(*(
        cluster.router.generate(p, model=MODEL, max_tokens=24, ignore_eos=True, request_id=f"r{i}").collect()
        for i, p in enumerate(PROMPTS)))
    prefill_id = cluster.deployment.prefill.worker_id
    for prompt, result in zip(PROMPTS, results):
        completion = result.completion
        prompt_tokens = len(prompt.encode()) if isinstance(prompt, str) else len(prompt)
        # (2) The KV really crossed: the decode worker took all of it from the prefill worker, by the pair's
        #     first transport (a simulated prefill holds its KV in process memory: no shm segment), NIXL
        #     only from DEFAULT_NIXL_MIN_BYTES up.
        assert completion.prefill_worker_id == prefill_id
        assert completion.decode_worker_id == cluster.deployment.decode.worker_id
        assert completion.kv_transfer.bytes == prompt_tokens * 4096
        large = completion.kv_transfer.bytes >= DEFAULT_NIXL_MIN_BYTES
        assert completion.kv_transfer.path == ("nixl" if nixl_installed() and large else "grpc")
        assert not completion.kv_transfer.fallbacks
        assert completion.usage.prompt_tokens == prompt_tokens
        # Moved, not found in a cache: every prompt is new to the prefill worker (none shares a whole block).
        assert (completion.usage.cached_tokens, completion.usage.kv_transferred_tokens) == (0, prompt_tokens)
        assert completion.usage.completion_tokens == 24 == len(result.token_ids)
        assert completion.finish_reason == pb.FINISH_REASON_LENGTH
        assert result.text == text_of(result.token_ids)
        # (3) Token for token what the decode worker computes on its own.
        assert result.token_ids == await aggregated(cluster, prompt, 24)
    # (4) Nothing left behind on either side.
    await cluster.assert_no_leaks()
    stats = await cluster.prefill_stats()
    assert stats.transfers_completed == len(PROMPTS) and stats.transfers_expired == 0


WITHOUT_NIXL = textwrap.dedent("""
    import asyncio, json, sys
    sys.modules["nixl"] = None  # as if the nixl extra were not installed: importing it fails
    import dataclasses
    from dynamo_grpc.config import ConfigError
    from dynamo_grpc.v1 import common_pb2 as pb
    from tests.cluster import MODEL, running, worker_config

    async def main():
        try:
            dataclasses.replace(worker_config(), kv_transports=("nixl",))
            refused = ""
        except ConfigError as error:
            refused = str(error)
        async with running() as stubs:
            result = await stubs.router.generate("no nixl here", model=MODEL, max_tokens=4).collect()
            workers = await stubs.deployment.decode.registry.list_workers(pb.WORKER_ROLE_PREFILL)
            await stubs.assert_no_leaks()
        print(json.dumps({"path": result.completion.kv_transfer.path, "tokens": len(result.token_ids),
                          "offered": [list(w.kv_transports) for w in workers], "refused": refused}))

    asyncio.run(main())
""")


def test_without_the_nixl_extra_workers_offer_shm_and_grpc_and_kv_moves_over_grpc() -> None:
    run = subprocess.run([sys.executable, "-c", WITHOUT_NIXL], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen["offered"] == [[pb.KV_TRANSPORT_SHM, pb.KV_TRANSPORT_GRPC]]
    assert (seen["path"], seen["tokens"]) == ("grpc", 4)  # a simulated prefill holds its KV in process memory
    assert "pip install 'dynamo-grpc[nixl]'" in seen["refused"]


async def test_tokens_stream_in_batches_before_the_end(cluster: Stubs) -> None:
    stream = cluster.router.generate("stream me", model=MODEL, max_tokens=50, ignore_eos=True)
    responses = [response async for response in stream]
    *batches, last = responses
    assert len(batches) >= 2 and all(b.HasField("tokens") and b.tokens.token_ids for b in batches)
    assert last.completion.usage.completion_tokens == 50 == sum(len(b.tokens.token_ids) for b in batches)


async def test_cancel_stops_decode_and_frees_kv_everywhere(cluster: Stubs) -> None:
    stream = cluster.router.generate("cancel me", model=MODEL, max_tokens=5000, ignore_eos=True, request_id="c1")
    received = 0
    completion = None
    async for response in stream:
        if response.HasField("tokens"):
            received += len(response.tokens.token_ids)
            if received >= 5:
                stream.cancel()
        else:
            completion = response.completion
    assert completion is not None and completion.finish_reason == pb.FINISH_REASON_CANCELLED
    assert 5 <= completion.usage.completion_tokens < 5000
    await cluster.assert_no_leaks()


async def test_cancel_during_prefill_releases_the_held_kv() -> None:
    # A slow prefill (0.5 s) gives the cancel time to arrive before decode starts.
    async with running(prefill_s_per_token=0.05) as stubs:
        stream = stubs.router.generate("0123456789", model=MODEL, max_tokens=10, request_id="c2")
        await eventually(stubs.prefilling, 2.0, "the prefill to start")
        stream.cancel()
        result = await stream.collect()
        assert result.completion.finish_reason == pb.FINISH_REASON_CANCELLED
        assert result.token_ids == []
        await stubs.assert_no_leaks()
        assert (await stubs.prefill_stats()).transfers_completed == 1


async def test_client_disconnect_aborts_the_request(cluster: Stubs) -> None:
    stream = cluster.router.generate("going away", model=MODEL, max_tokens=5000, ignore_eos=True)
    responses = aiter(stream)
    while not (await anext(responses)).HasField("tokens"):
        pass
    assert await cluster.decoding()
    stream.call.cancel()
    await cluster.until_idle(3.0)  # 5000 tokens would take 5 s
    await cluster.assert_no_leaks()


async def test_prefill_worker_gone_falls_back_to_local_prefill(cluster: Stubs) -> None:
    expected = await aggregated(cluster, "no prefill", 8)
    await cluster.deployment.prefill.server.server.stop(0)
    result = await cluster.router.generate("no prefill", model=MODEL, max_tokens=8, ignore_eos=True).collect()
    assert result.token_ids == expected
    assert result.completion.prefill_worker_id == "" and result.completion.kv_transfer.bytes == 0


async def test_request_id_is_assigned_and_echoed(cluster: Stubs) -> None:
    assigned = [r async for r in cluster.router.generate("ids", model=MODEL, max_tokens=2)]
    mine = [r async for r in cluster.router.generate("ids", model=MODEL, max_tokens=2, request_id="mine")]
    for responses in (assigned, mine):
        assert len(responses) >= 2 and responses[-1].completion.usage.completion_tokens == 2
    assigned_ids = {r.request_id for r in assigned}
    assert len(assigned_ids) == 1 and len(assigned_ids.pop()) == 32
    assert {r.request_id for r in mine} == {"mine"}


async def test_health_reports_serving_then_not_serving() -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    registry = MemoryRegistry()
    deployment = await start_all_in_one(worker_config(), registry)
    async with grpc.aio.insecure_channel(deployment.decode.endpoint) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        check = await health.Check(health_pb2.HealthCheckRequest(service="dynamo_grpc.v1.DecodeService"))
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        await deployment.decode.server.health.enter_graceful_shutdown()
        check = await health.Check(health_pb2.HealthCheckRequest(service="dynamo_grpc.v1.DecodeService"))
        assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
    await deployment.stop()
    assert await registry.list_workers() == []
    await registry.close()


async def test_control_plane_watch_follows_the_fleet() -> None:
    from dynamo_grpc.v1 import control_plane_pb2 as cp_pb
    from dynamo_grpc.v1 import control_plane_pb2_grpc as cp_grpc

    registry = MemoryRegistry()
    deployment = await start_all_in_one(worker_config(), registry)
    async with grpc.aio.insecure_channel(deployment.control_plane.endpoint) as channel:
        control = cp_grpc.ControlPlaneServiceStub(channel)
        watch = control.WatchPairings(cp_pb.WatchPairingsRequest())
        # (1) The current table first: the one compatible same-host pair.
        first = (await anext(aiter(watch))).table
        assert [(p.prefill_worker_id, p.decode_worker_id, p.same_host) for p in first.pairings] == [
            (deployment.prefill.worker_id, deployment.decode.worker_id, True)]
        # (2) The decode worker leaves: a new version without pairs follows.
        await deployment.decode.stop()
        second = (await asyncio.wait_for(anext(aiter(watch)), 5)).table
        assert second.version > first.version and not second.pairings
        assert (await control.GetPairings(cp_pb.GetPairingsRequest())).table == second
        watch.cancel()
    for role in (deployment.router, deployment.prefill, deployment.control_plane):
        await role.stop()
    await registry.close()


async def test_short_prompts_and_a_saturated_prefill_worker_prefill_on_decode() -> None:
    registry = MemoryRegistry()
    policy = DisaggregationPolicy(min_prompt_tokens=16, max_prefill_queue=1)
    async with deployed(worker_config(prefill_s_per_token=0.002), registry, policy=policy) as stubs:
        short = await stubs.router.generate("tiny", model=MODEL, max_tokens=4).collect()
        assert short.completion.prefill_worker_id == "" and short.completion.kv_transfer.bytes == 0
        # Two long prompts at once: the first takes the prefill worker, the second finds it saturated.
        results = await asyncio.gather(*(stubs.router.generate("x" * 400 + str(i), model=MODEL, max_tokens=4)
                                         .collect() for i in range(2)))
        moved = sorted(r.completion.kv_transfer.bytes > 0 for r in results)
        assert moved == [False, True]
    await registry.close()
