"""The OpenAI surface on real engines: the `openai` SDK against a disaggregated vLLM-CPU deployment (a prefill
and a decode worker with our KV connector, the router, the frontend). One deployment for the module.

Logprobs are checked against HF transformers' own log-softmax, stop strings against the greedy output.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from dynamo_grpc.client import params
from dynamo_grpc.config import ServerConfig, WorkerConfig
from dynamo_grpc.engine.vllm_engine import VllmEngineConfig
from dynamo_grpc.frontend.openai_protocol import load_chat_template
from dynamo_grpc.registry import MemoryRegistry
from dynamo_grpc.v1 import decode_pb2 as decode_pb
from dynamo_grpc.v1 import prefill_pb2 as prefill_pb
from tests.cluster import Served, deployed, openai_frontend
from tests.hf_reference import hf_logprobs, hf_tokens
from tests.real_engine import ONE_DEPLOYMENT_PER_MODULE

pytestmark = ONE_DEPLOYMENT_PER_MODULE

MODEL = "tiny-llama"
BLOCK_SIZE = 32
GREEDY: dict[str, Any] = {"temperature": 0.0, "extra_body": {"ignore_eos": True, "return_token_ids": True}}
LOGPROB_TOLERANCE = 1e-3  # float32 on both sides, different kernels


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Served]:
    os.environ.setdefault("VLLM_CACHE_ROOT", str(tmp_path_factory.mktemp("vllm-cache")))
    registry = MemoryRegistry()
    engine = VllmEngineConfig(model_path=str(tiny_model_dir))
    config = WorkerConfig(server=ServerConfig(port=0), engine=engine)
    try:
        async with (deployed(config, registry) as stubs,
                    openai_frontend(stubs, chat_template=load_chat_template(tiny_model_dir)) as served):
            yield served
    finally:
        await registry.close()


async def test_logprobs_are_the_models_own(served: Served, tiny_model_dir: Path) -> None:
    prompt = "The river crosses the ancient city"
    reply = await served.client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, logprobs=3,
                                                   **GREEDY)
    choice, logprobs = reply.choices[0], reply.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == reply.usage.completion_tokens == 10
    expected = hf_logprobs(tiny_model_dir, hf_tokens(tiny_model_dir, prompt), choice.token_ids)
    assert logprobs.token_logprobs == pytest.approx(expected, abs=LOGPROB_TOLERANCE)
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        # The three most likely and the chosen one, by text (tokens with the same text share an entry).
        assert len(top) <= 4 and top[token] == logprob
        assert logprob == pytest.approx(max(top.values()), abs=1e-6)  # greedy: the chosen is the most likely
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)

    stream = await served.client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, logprobs=3,
                                                    stream=True, **GREEDY)
    parts = [chunk.choices[0].logprobs async for chunk in stream if chunk.choices[0].logprobs]
    assert [t for part in parts for t in part.tokens] == logprobs.tokens
    assert [o for part in parts for o in part.text_offset] == logprobs.text_offset
    streamed = [lp for part in parts for lp in part.token_logprobs]
    assert streamed == pytest.approx(logprobs.token_logprobs, abs=1e-5)


async def test_chat_logprobs_whole_and_streamed(served: Served) -> None:
    messages = [{"role": "user", "content": "Where is the river?"}]
    reply = await served.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8,
                                                        logprobs=True, top_logprobs=5, **GREEDY)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == 8
    for entry in content:
        assert len(entry.top_logprobs) == 5
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-6) and entry.logprob <= 0
    stream = await served.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8,
                                                         logprobs=True, top_logprobs=5, stream=True, **GREEDY)
    streamed = [entry async for chunk in stream if chunk.choices and chunk.choices[0].logprobs
                for entry in chunk.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert [len(e.top_logprobs) for e in streamed] == [5] * 8


async def test_the_prefill_worker_returns_the_first_tokens_logprobs(served: Served) -> None:
    request = params("A prompt for the prefill worker alone", model=MODEL, max_tokens=4, ignore_eos=True)
    request.sampling.logprobs = 2
    prefilled = await served.stubs.prefill.Prefill(prefill_pb.PrefillRequest(request_id="first",
                                                                             params=request))
    first = prefilled.first_token_logprob
    assert len(first.top_logprobs) == 2 and first.top_logprobs[0].token_id == prefilled.first_token_id
    assert first.logprob == pytest.approx(first.top_logprobs[0].logprob, abs=1e-6) and first.logprob < 0
    # The decode worker takes the KV: moved tokens, not prefix-cache hits (the prompt is new to it).
    tokens, completion = [], None
    async def start() -> AsyncIterator[decode_pb.DecodeRequest]:
        yield decode_pb.DecodeRequest(request_id="first", start=decode_pb.DecodeStart(
            params=request, kv_handle=prefilled.kv_handle))

    async for response in served.stubs.decode.Decode(start()):
        if response.HasField("tokens"):
            tokens += response.tokens.token_ids
            assert len(response.tokens.logprobs) == len(response.tokens.token_ids)
        else:
            completion = response.completion
    assert completion is not None and tokens[0] == prefilled.first_token_id
    assert completion.usage.cached_tokens == 0
    moved = completion.usage.kv_transferred_tokens
    assert moved == prefilled.kv_handle.num_tokens == prefilled.usage.prompt_tokens


async def test_a_stop_string_across_token_batches_cuts_the_text(served: Served, tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    prompt = "Every teacher in the garden"
    stream = await served.client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, stream=True,
                                                    **GREEDY)
    batches = [(chunk.choices[0].text, chunk.choices[0].token_ids) async for chunk in stream]
    text = "".join(t for t, _ in batches)
    reference_ids = [i for _, ids in batches for i in ids]
    # A stop string made of the end of one batch and the start of the next, where it first appears.
    ends = [len("".join(t for t, _ in batches[:i + 1])) for i in range(len(batches) - 1)]
    stop = next(text[end - 2:end + 2] for end in ends
                if text[end - 2:end + 2].strip() and text.find(text[end - 2:end + 2]) == end - 2)
    reply = await served.client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, stop=[stop],
                                                   **GREEDY)
    assert reply.choices[0].text == text[:text.index(stop)] and reply.choices[0].finish_reason == "stop"
    # Usage counts the tokens made up to the one that completed the stop string.
    made = reply.choices[0].token_ids
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert made == reference_ids[:len(made)] and reply.usage.completion_tokens == len(made) < 40
    assert stop in tokenizer.decode(made) and stop not in tokenizer.decode(made[:-1])


async def test_n_choices_with_a_seed_are_distinct_and_reproducible(served: Served) -> None:
    sampled = {"temperature": 1.0, "seed": 7, "max_tokens": 12, "extra_body": {"ignore_eos": True}}
    reply = await served.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}], n=3, **sampled)
    texts = [c.message.content for c in reply.choices]
    assert [c.index for c in reply.choices] == [0, 1, 2] and len(set(texts)) == 3
    assert reply.usage.completion_tokens == 3 * 12
    again = await served.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}], n=3, **sampled)
    assert [c.message.content for c in again.choices] == texts
    one = await served.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}], **sampled)
    assert one.choices[0].message.content == texts[0]


async def test_echo(served: Served) -> None:
    plain = await served.client.completions.create(model=MODEL, prompt="Seven eight nine", max_tokens=6,
                                                   **GREEDY)
    echoed = await served.client.completions.create(model=MODEL, prompt="Seven eight nine", max_tokens=6,
                                                    echo=True, **GREEDY)
    assert echoed.choices[0].text == "Seven eight nine" + plain.choices[0].text


async def test_cached_tokens_count_prefix_cache_hits_only(served: Served) -> None:
    cold = await served.client.completions.create(model=MODEL, prompt="A cold start", max_tokens=2)
    details = cold.usage.prompt_tokens_details
    assert (details.cached_tokens, details.kv_transferred_tokens) == (0, cold.usage.prompt_tokens)

    prompt = "A lighthouse keeper counts the ships that pass the harbour wall each evening. " * 4
    first = await served.client.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
    again = await served.client.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
    prompt_tokens = again.usage.prompt_tokens
    assert prompt_tokens > 2 * BLOCK_SIZE and first.usage.prompt_tokens_details.cached_tokens == 0
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert cached == (prompt_tokens - 1) // BLOCK_SIZE * BLOCK_SIZE  # whole blocks the prefill worker kept
    assert again.usage.prompt_tokens_details.kv_transferred_tokens == prompt_tokens
