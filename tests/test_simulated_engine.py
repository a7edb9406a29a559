"""The simulated engine: deterministic, KV-dependent tokens; bounded paged KV; abort frees everything."""

from __future__ import annotations

import asyncio

import pytest

from dynamo_grpc.engine import EngineRequest, FinishReason, Sampling, SimulatedEngine, SimulatedEngineConfig
from dynamo_grpc.engine.simulated import synthesize_kv
from dynamo_grpc.errors import AlreadyExists, InvalidArgument, ResourceExhausted

FAST = SimulatedEngineConfig(decode_step_s=0.0005, prefill_s_per_token=0.0, num_blocks=64)


async def run(engine: SimulatedEngine, prompt, *, request_id: str = "r", **sampling) -> tuple[list[int], FinishReason]:
    tokens: list[int] = []
    finish = None
    async for out in engine.generate(EngineRequest(request_id, prompt, Sampling(temperature=0.0, **sampling))):
        tokens += out.token_ids
        finish = out.finish_reason or finish
    assert finish is not None
    return tokens, finish


async def test_greedy_output_is_a_function_of_the_prompt() -> None:
    engine = SimulatedEngine(FAST)
    first, finish = await run(engine, "The quick brown fox", max_tokens=20, ignore_eos=True)
    again, _ = await run(engine, "The quick brown fox", max_tokens=20, ignore_eos=True)
    other, _ = await run(engine, "The quick brown cat", max_tokens=20, ignore_eos=True)
    assert first == again and first != other
    assert len(first) == 20 and finish is FinishReason.LENGTH
    assert engine.stats().used_kv_blocks == 0 and engine.stats().active_requests == 0


def test_kv_bytes_depend_on_the_whole_prefix() -> None:
    a = synthesize_kv(tuple(range(70)), block_size=32, bytes_per_token=8)
    b = synthesize_kv((1,) + tuple(range(1, 70)), block_size=32, bytes_per_token=8)
    assert len(a) == 70 * 8
    assert all(a[i * 256:(i + 1) * 256] != b[i * 256:(i + 1) * 256] for i in range(2))


async def test_stop_token_ends_generation() -> None:
    engine = SimulatedEngine(FAST)
    tokens, _ = await run(engine, "stop here", max_tokens=30, ignore_eos=True)
    stop_at = tokens[5]
    stopped, finish = await run(engine, "stop here", max_tokens=30, ignore_eos=True, stop_token_ids=(stop_at,))
    assert finish is FinishReason.STOP and stopped == tokens[:tokens.index(stop_at) + 1]


async def test_abort_ends_the_stream_cancelled_and_frees_blocks() -> None:
    engine = SimulatedEngine(FAST)
    request = EngineRequest("long", "a long generation", Sampling(max_tokens=1000, ignore_eos=True))
    outputs = []
    async for out in engine.generate(request):
        outputs.append(out)
        if len(outputs) == 3:
            assert engine.stats().used_kv_blocks > 0
            await engine.abort("long")
    assert outputs[-1].finish_reason is FinishReason.CANCELLED
    assert outputs[-1].usage.completion_tokens == 3
    assert engine.stats().used_kv_blocks == 0 and engine.stats().active_requests == 0


async def test_closing_the_stream_frees_blocks() -> None:
    engine = SimulatedEngine(FAST)
    stream = engine.generate(EngineRequest("r", "abandoned", Sampling(max_tokens=1000, ignore_eos=True)))
    await anext(stream)
    await stream.aclose()
    await asyncio.sleep(0)
    assert engine.stats().used_kv_blocks == 0 and engine.stats().active_requests == 0


async def test_requests_wait_for_free_blocks() -> None:
    engine = SimulatedEngine(SimulatedEngineConfig(decode_step_s=0.001, prefill_s_per_token=0, num_blocks=2,
                                                   block_size=32))
    # Each request needs both blocks, so the second runs only after the first frees them.
    results = await asyncio.gather(run(engine, "x" * 40, request_id="a", max_tokens=20, ignore_eos=True),
                                   run(engine, "y" * 40, request_id="b", max_tokens=20, ignore_eos=True))
    assert [len(tokens) for tokens, _ in results] == [20, 20]
    assert engine.stats().used_kv_blocks == 0


async def test_bad_requests_are_refused_before_taking_resources() -> None:
    engine = SimulatedEngine(SimulatedEngineConfig(num_blocks=2, block_size=32, max_model_len=100))
    with pytest.raises(InvalidArgument) as empty:
        await run(engine, "")
    assert empty.value.reason == "EMPTY_PROMPT"
    with pytest.raises(InvalidArgument) as long:  # no room left for a generated token
        await run(engine, "x" * 100)
    assert long.value.reason == "CONTEXT_TOO_LONG"
    with pytest.raises(InvalidArgument) as vocab:
        await run(engine, (1, 2, 99999))
    assert vocab.value.reason == "TOKEN_OUT_OF_VOCABULARY"
    with pytest.raises(InvalidArgument) as stop:
        await run(engine, "x", stop_token_ids=(99999,))
    assert stop.value.reason == "BAD_SAMPLING_PARAMS"
    with pytest.raises(ResourceExhausted) as full:
        await run(engine, "x" * 70, max_tokens=10)
    assert full.value.reason == "KV_CACHE_TOO_SMALL"
    assert engine.stats().used_kv_blocks == 0


async def test_max_tokens_are_clamped_to_the_context_left() -> None:
    engine = SimulatedEngine(SimulatedEngineConfig(decode_step_s=0.0005, prefill_s_per_token=0, max_model_len=100))
    tokens, finish = await run(engine, "x" * 90, max_tokens=50, ignore_eos=True)
    assert (len(tokens), finish) == (10, FinishReason.LENGTH)
    assert engine.stats().used_kv_blocks == 0


async def test_duplicate_live_request_id_is_refused() -> None:
    engine = SimulatedEngine(FAST)
    first = engine.generate(EngineRequest("same", "one", Sampling(max_tokens=100, ignore_eos=True)))
    await anext(first)
    with pytest.raises(AlreadyExists):
        await run(engine, "two", request_id="same")
    await first.aclose()


class RecordingCost:
    """A step cost that remembers every step it priced."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, int, int, int]] = []

    def step_ms(self, prefill_tokens: int, prefill_context: int, decode_batch: int, decode_context: int) -> float:
        self.steps.append((prefill_tokens, prefill_context, decode_batch, decode_context))
        return 1.0


async def test_steps_carry_decodes_and_one_prefill_chunk_at_a_time() -> None:
    cost = RecordingCost()
    engine = SimulatedEngine(SimulatedEngineConfig(num_blocks=64, max_num_batched_tokens=100), cost=cost)
    decoding = asyncio.ensure_future(run(engine, "d" * 10, request_id="d", max_tokens=40, ignore_eos=True))
    while not any(batch for _, _, batch, _ in cost.steps):  # until "d" is decoding
        await asyncio.sleep(0.001)
    long, _ = await run(engine, "p" * 250, request_id="p", max_tokens=2, ignore_eos=True)
    await decoding
    chunks = [(p, ctx, b) for p, ctx, b, _ in cost.steps if p > 1 and p != 10]
    # 250 prompt tokens in chunks within the step budget, each step also carrying the running decode...
    assert sum(p for p, _, _ in chunks) == 250 and len(chunks) == 3
    assert all(p + b <= 100 and b == 1 for p, _, b in chunks)
    # ...and each chunk attends to everything before it.
    assert [ctx for _, ctx, _ in chunks] == [99, 198, 250]
    assert len(long) == 2


async def test_time_scale_runs_the_clock_faster() -> None:
    engine = SimulatedEngine(SimulatedEngineConfig(num_blocks=64, decode_step_s=0.02, time_scale=1000))
    loop = asyncio.get_running_loop()
    started = loop.time()
    tokens, _ = await run(engine, "fast", max_tokens=50, ignore_eos=True)
    assert len(tokens) == 50 and engine.steps == 50
    assert loop.time() - started < 0.5  # 50 steps of 20 simulated ms = 1 s of simulated time


async def test_prefix_cache_skips_blocks_earlier_requests_computed() -> None:
    cost = RecordingCost()
    engine = SimulatedEngine(SimulatedEngineConfig(num_blocks=64), cost=cost)

    async def usage_of(prompt: str, rid: str, engine: SimulatedEngine = engine) -> tuple[list[int], int]:
        tokens, cached = [], -1
        async for out in engine.generate(EngineRequest(rid, prompt, Sampling(max_tokens=3, temperature=0.0,
                                                                             ignore_eos=True))):
            tokens += out.token_ids
            cached = out.usage.cached_tokens if out.usage else cached
        return tokens, cached

    shared = "s" * 64
    first, cached_first = await usage_of(shared + "tail one", "a")
    again, cached_again = await usage_of(shared + "tail one", "b")
    other, cached_other = await usage_of(shared + "another", "c")
    assert (cached_first, cached_again, cached_other) == (0, 64, 64)  # two full 32-token blocks
    assert again == first  # reused KV gives the same tokens
    assert sum(p for p, _, _, _ in cost.steps) == 72 + 8 + 7  # later prompts computed only past the cache
    off = SimulatedEngine(SimulatedEngineConfig(num_blocks=64, prefix_caching=False))
    await usage_of(shared + "tail one", "d", off)
    assert (await usage_of(shared + "tail one", "e", off))[1] == 0


async def test_synthetic_logprobs_are_self_consistent() -> None:
    engine = SimulatedEngine(FAST)

    async def logprobs(request_id: str, **sampling) -> list:
        request = EngineRequest(request_id, "log me", Sampling(max_tokens=40, ignore_eos=True, **sampling))
        entries = []
        async for out in engine.generate(request):
            assert out.logprobs is None or len(out.logprobs) == len(out.token_ids)
            entries += zip(out.token_ids, out.logprobs or [])
        return entries

    greedy = await logprobs("g", temperature=0.0, logprobs=5)
    assert len(greedy) == 40 and greedy == await logprobs("g2", temperature=0.0, logprobs=5)
    for token, entry in greedy:
        top = entry.top_logprobs
        assert len(top) == 5 and len({t.token_id for t in top}) == 5
        assert [t.logprob for t in top] == sorted([t.logprob for t in top], reverse=True)
        assert top[0].logprob <= 0
        assert (top[0].token_id, top[0].logprob, top[0].token) == (token, entry.logprob, entry.token)
    sampled = await logprobs("s", temperature=1.0, seed=3, logprobs=1)
    assert all(entry.logprob <= entry.top_logprobs[0].logprob for _, entry in sampled)
    assert any(token != entry.top_logprobs[0].token_id for token, entry in sampled)  # sampling left the top
    assert await logprobs("none", temperature=0.0) == []  # not asked for: none made
