"""Routing: workers stream their prefix-cache changes and the router sends each request where its prompt
is already cached; every router counts the load other routers put on a worker (real etcd, real gRPC,
simulated engines)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import random
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from dynamo_grpc.client import RouterClient, params
from dynamo_grpc.config import ServerConfig
from dynamo_grpc.engine.vllm_kv_events import EventTranslator
from dynamo_grpc.kv.events import KvEventLog, PrefixIndex, block_hashes, chain_hash
from dynamo_grpc.registry import EtcdRegistry
from dynamo_grpc.roles import RunningRole, start_decode, start_prefill, start_router
from dynamo_grpc.routing.fleet import DisaggregationPolicy, Fleet
from dynamo_grpc.routing.prompt_tokens import PromptTokenizer
from dynamo_grpc.v1 import common_pb2 as pb
from dynamo_grpc.v1 import decode_pb2 as decode_pb
from dynamo_grpc.v1 import decode_pb2_grpc as decode_grpc
from dynamo_grpc.v1 import kv_events_pb2 as events_pb
from dynamo_grpc.v1 import kv_events_pb2_grpc as events_grpc
from dynamo_grpc.v1 import prefill_pb2 as prefill_pb
from dynamo_grpc.v1 import prefill_pb2_grpc as prefill_grpc
from tests.cluster import MODEL, worker_config
from tests.etcd_server import EtcdServer

BLOCK = 32


def test_block_hashes_follow_the_documented_chain() -> None:
    # kv_events.proto defines the hash for clients in any language; recompute it from that text alone.
    tokens = list(range(1000, 1000 + 3 * BLOCK + 5))
    expected, parent = [], b""
    for start in range(0, 3 * BLOCK, BLOCK):
        digest = hashlib.blake2b(parent + struct.pack(f"<{BLOCK}I", *tokens[start:start + BLOCK]), digest_size=8)
        parent = digest.digest()
        expected.append(int.from_bytes(parent, "little"))
    assert block_hashes(tokens, BLOCK) == expected  # the partial last block is not named
    # A hash names the whole prefix: continuing a chain gives the same names, another first block other names.
    assert block_hashes(tokens[BLOCK:], BLOCK, parent=expected[0]) == expected[1:]
    assert chain_hash(None, tokens[:BLOCK]) == expected[0]
    assert set(block_hashes([7, *tokens[1:]], BLOCK)).isdisjoint(expected)


async def test_a_watcher_gets_the_cache_then_its_changes_and_a_snapshot_when_too_slow() -> None:
    log = KvEventLog(BLOCK)
    log.stored([1, 2])
    watch = log.watch()
    first = await anext(watch)
    assert first.reset and list(first.stored_block_hashes) == [1, 2] and first.block_size == BLOCK
    log.stored([2, 3])  # 2 is already cached: only 3 is news
    log.removed([1, 99])  # 99 was never cached
    assert list((await anext(watch)).stored_block_hashes) == [3]
    assert list((await anext(watch)).removed_block_hashes) == [1]
    for h in range(10, 5000):  # more changes than a watcher may queue
        log.stored([h])
    caught_up = await anext(watch)
    assert caught_up.reset and len(caught_up.stored_block_hashes) == len(log) == 2 + 4990
    await watch.aclose()


def test_the_index_finds_each_workers_longest_cached_prefix() -> None:
    prompt = list(range(5 * BLOCK))
    hashes = block_hashes(prompt, BLOCK)
    index = PrefixIndex()
    index.apply("a", events_pb.WatchKvEventsResponse(reset=True, stored_block_hashes=hashes[:4], block_size=BLOCK))
    index.apply("b", events_pb.WatchKvEventsResponse(stored_block_hashes=[hashes[0], hashes[2]], block_size=BLOCK))
    assert index.cached_tokens(prompt, ["a", "b", "c"]) == {"a": 4 * BLOCK, "b": BLOCK}
    index.apply("a", events_pb.WatchKvEventsResponse(removed_block_hashes=[hashes[1]], block_size=BLOCK))
    assert index.cached_tokens(prompt, ["a"]) == {"a": BLOCK}
    index.apply("a", events_pb.WatchKvEventsResponse(reset=True, block_size=BLOCK))
    index.forget("b")
    assert index.cached_tokens(prompt, ["a", "b"]) == {} and index.blocks_held("a") == 0


@contextlib.asynccontextmanager
async def fleet_of(etcd: EtcdServer, prefills: int, decodes: int, **engine: object
                   ) -> AsyncIterator[tuple[EtcdRegistry, list[RunningRole], list[RunningRole]]]:
    # These pools are a few prompts deep, and one router is every prefill worker's only caller: the bounds on
    # unpulled KV (against rogue callers: a share of the pool in all, and per caller) would send prompts to
    # decode whenever a pull lags.
    config = dataclasses.replace(worker_config(block_size=BLOCK, **engine), server=ServerConfig(port=0),
                                 kv_held_fraction=1.0, kv_caller_fraction=1.0)
    registry = EtcdRegistry([etcd.endpoint], namespace="prefix-routing")
    await registry.connect()
    roles: list[RunningRole] = []
    try:
        roles += await asyncio.gather(*(start_prefill(config, registry) for _ in range(prefills)))
        roles += await asyncio.gather(*(start_decode(config, registry) for _ in range(decodes)))
        yield registry, roles[:prefills], roles[prefills:]
    finally:
        for role in reversed(roles):
            await role.stop()
        await registry.close()


async def decode_stats(role: RunningRole) -> pb.WorkerStats:
    async with grpc.aio.insecure_channel(role.endpoint) as channel:
        return (await decode_grpc.DecodeServiceStub(channel).GetDecodeStats(decode_pb.GetDecodeStatsRequest())).stats


async def prefill_stats(role: RunningRole) -> pb.WorkerStats:
    async with grpc.aio.insecure_channel(role.endpoint) as channel:
        stub = prefill_grpc.PrefillServiceStub(channel)
        return (await stub.GetPrefillStats(prefill_pb.GetPrefillStatsRequest())).stats


async def eventually(check, timeout: float = 5.0) -> None:  # noqa: ANN001
    for _ in range(int(timeout / 0.02)):
        if check():
            return
        await asyncio.sleep(0.02)
    assert check()


@pytest.mark.etcd
async def test_the_router_indexes_every_workers_cache_and_forgets_a_worker_that_leaves(etcd: EtcdServer) -> None:
    async with fleet_of(etcd, prefills=2, decodes=1) as (registry, prefills, _):
        fleet = Fleet(registry, routing="kv_aware")
        await fleet.start()
        try:
            prompt = [t % 250 for t in range(300)]  # 9 full blocks
            async with grpc.aio.insecure_channel(prefills[0].endpoint) as channel:
                await prefill_grpc.PrefillServiceStub(channel).Prefill(prefill_pb.PrefillRequest(
                    request_id="warm", params=pb.GenerationParams(
                        model=MODEL, prompt=pb.Prompt(token_ids=pb.TokenIds(ids=prompt)))))
                # The worker's own feed, as any client sees it: its first message is the whole cache.
                feed = events_grpc.KvEventServiceStub(channel).WatchKvEvents(events_pb.WatchKvEventsRequest())
                first = await anext(aiter(feed))
                feed.cancel()
            assert first.reset and set(block_hashes(prompt, BLOCK)) <= set(first.stored_block_hashes)
            first_id, second_id = prefills[0].worker_id, prefills[1].worker_id
            await eventually(lambda: fleet.prefix_index.cached_tokens(prompt, [first_id, second_id])
                             == {first_id: 9 * BLOCK})
            route = fleet.route(MODEL, "r", prompt=prompt)
            assert route.prefill is not None and route.prefill.worker_id == first_id
            await prefills[0].stop()
            await eventually(lambda: fleet.prefix_index.blocks_held(first_id) == 0)
            assert fleet.route(MODEL, "r", prompt=prompt).prefill.worker_id == second_id
        finally:
            await fleet.stop()


async def prefill_hit_rate(etcd: EtcdServer, routing: str) -> float:
    """Share of prompt tokens the prefill workers found cached, for a shared-prefix workload."""
    # 8 system prompts of 16 blocks, each asked 6 times with its own question, in a shuffled order.
    # A prefill worker's cache holds 64 blocks: about 4 of the 8 prefixes.
    rng = random.Random(7)
    prefixes = ["".join(rng.choice("abcdefghij ") for _ in range(16 * BLOCK)) for _ in range(8)]
    prompts = [f"{prefix}question {rng.randrange(10**6):06d}" for prefix in prefixes for _ in range(6)]
    rng.shuffle(prompts)
    async with fleet_of(etcd, prefills=4, decodes=2, num_blocks=64) as (registry, prefills, _):
        router = await start_router(ServerConfig(port=0), registry, routing=routing)
        try:
            async with RouterClient(router.endpoint) as client:
                pending = asyncio.Semaphore(3)

                async def ask(prompt: str) -> None:
                    async with pending:
                        result = await client.generate(prompt, model=MODEL, max_tokens=2).collect()
                        assert result.completion.prefill_worker_id  # every request was disaggregated

                await asyncio.gather(*(ask(p) for p in prompts))
        finally:
            await router.stop()
        stats = [await prefill_stats(role) for role in prefills]
    return sum(s.prefix_cache_hit_tokens for s in stats) / sum(s.prompt_tokens for s in stats)


@pytest.mark.etcd
@pytest.mark.slow
async def test_prefix_aware_routing_hits_the_cache_far_more_than_round_robin(etcd: EtcdServer) -> None:
    kv_aware = await prefill_hit_rate(etcd, "kv_aware")
    round_robin = await prefill_hit_rate(etcd, "round_robin")
    print(f"prefill cache hit rate: kv_aware {kv_aware:.2f}, round_robin {round_robin:.2f}")
    # Best case: 40 of 48 requests find their 512-token prefix (of 529-530 tokens): 0.81.
    assert kv_aware > 0.7
    assert kv_aware > round_robin + 0.3


@pytest.mark.etcd
async def test_a_prompt_the_decode_worker_has_cached_prefills_there(etcd: EtcdServer) -> None:
    async with fleet_of(etcd, prefills=1, decodes=1) as (registry, _, _):
        router = await start_router(ServerConfig(port=0), registry, routing="kv_aware",
                                    policy=DisaggregationPolicy(min_prompt_tokens=100))
        try:
            async with RouterClient(router.endpoint) as client:
                prompt = "x" * 600
                first = await client.generate(prompt, model=MODEL, max_tokens=4).collect()
                assert first.completion.prefill_worker_id  # 600 uncached tokens: disaggregated
                # The decode worker now holds 18 of the prompt's blocks; once the router's index has heard
                # so (a KV event away), the 24 uncached tokens stay local.
                for _ in range(50):
                    again = await client.generate(prompt, model=MODEL, max_tokens=4).collect()
                    if not again.completion.prefill_worker_id:
                        break
                    await asyncio.sleep(0.05)
                assert again.completion.prefill_worker_id == ""
                assert again.token_ids == first.token_ids
                other = await client.generate("y" * 600, model=MODEL, max_tokens=4).collect()
                assert other.completion.prefill_worker_id
        finally:
            await router.stop()


def test_vllm_block_names_become_ours_through_their_parents() -> None:
    prompt = [t % 250 for t in range(4 * BLOCK + 3)]
    ours = block_hashes(prompt, BLOCK)
    translator = EventTranslator()
    # vLLM stores the first two blocks, then two more chained to the second: named like the router names them.
    assert translator.stored(["v0", "v1"], None, prompt[:2 * BLOCK], BLOCK) == ours[:2]
    assert translator.stored(["v2", "v3"], "v1", prompt[2 * BLOCK:4 * BLOCK], BLOCK) == ours[2:]
    assert translator.removed(["v3", "unknown"]) == [ours[3]]
    # A batch whose parent was never seen (events were lost) cannot be named and is skipped.
    assert translator.stored(["v9"], "lost", prompt[:BLOCK], BLOCK) == [] and translator.skipped == 1
    translator.cleared()
    assert len(translator) == 0 and translator.removed(["v0"]) == []


@pytest.mark.etcd
async def test_routers_see_the_load_other_routers_put_on_a_worker(etcd: EtcdServer) -> None:
    async with fleet_of(etcd, prefills=1, decodes=2, decode_step_s=0.005) as (registry, _, decodes):
        first, second = [await start_router(ServerConfig(port=0), registry, routing="least_loaded",
                                            load_poll_s=0.05) for _ in range(2)]
        try:
            async with RouterClient(first.endpoint) as one, RouterClient(second.endpoint) as other:
                long = one.generate("a long answer", model=MODEL, max_tokens=2000, ignore_eos=True)
                stream = aiter(long)
                await anext(stream)  # running on one decode worker, sent there by the first router
                busy = None
                for _ in range(100):
                    busy = [role.worker_id for role in decodes if (await decode_stats(role)).active_requests]
                    if busy:
                        break
                    await asyncio.sleep(0.02)
                assert busy and len(busy) == 1
                # The second router has polled that load once it routes around the busy worker on either
                # worker's turn (equals take turns).
                assert second.fleet is not None
                await eventually(lambda: all(second.fleet.route(MODEL, "probe").decode.worker_id != busy[0]
                                             for _ in range(2)))
                for index in range(4):
                    result = await other.generate(f"short {index}", model=MODEL, max_tokens=2).collect()
                    assert result.completion.decode_worker_id != busy[0]
                long.cancel()
                async for _ in stream:
                    pass
        finally:
            for router in (first, second):
                await router.stop()


def test_text_longer_than_any_context_is_routed_without_tokenizing(tiny_model_dir: Path) -> None:
    """Tokenizing megabytes of text would stall the router's event loop for seconds; such a prompt is
    refused by the worker anyway (CONTEXT_TOO_LONG), so it is routed by load alone."""
    tokenizer = PromptTokenizer(str(tiny_model_dir))
    assert tokenizer.token_ids(params("hello world", model=MODEL), "vllm")
    assert tokenizer.token_ids(params("hello world " * 1_000_000, model=MODEL), "vllm") is None
